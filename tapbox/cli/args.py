"""argv -> RunOptions: the `tapbox [options] -- CMD [ARGS...]` command line, translated.

How this works: argparse reads the options (their spellings, help and usage are here); `_FLAGS`
says which RunOptions field each one sets, and to what. parse_args() stacks the layers -- the
-p profiles in order, then the command line -- and RunOptions.from_layers() validates the
result, so the same checks apply however the options were given. The command line adds to a
profile's allowlist rules and files and replaces its other values. A problem with the command
line is a usage error (argparse's message, exit 125); a problem in a profile is reported as
`FILE:LINE: what is wrong` (tapbox.profile).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from tapbox.errors import UsageError
from tapbox.options import AllowRule, Layer, Origin, PathRule, RunOptions

USAGE = """tapbox [-F FILE]... [--allow RULE]... [options] -- CMD [ARGS...]
       tapbox log show FILE [--denied] [--domain NAME] [--flows]
       tapbox changes [ID|DIR [--diff] [PATH...]]
       tapbox commit ID|DIR [PATH...] [--force]
       tapbox discard ID|DIR"""
EPILOG = """\
Rules (one per line in a file): example.com, *.example.com, 192.0.2.10, 198.51.100.0/24,
[2001:db8::1], each optionally with :PORT or :LOW-HIGH. Nothing is allowed unless a rule
says so. Exit status: CMD's own; 128+N if CMD died of signal N; 124 if --timeout ran
out; 125 if tapbox failed; 126/127 if CMD could not be run / was not found. A command
literally named "log", "changes", "commit" or "discard" is run as `tapbox -- log ...`
(without "--", "tapbox log ..." reads an event log, "tapbox changes ..." the layers of
--fs overlay).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tapbox", usage=USAGE, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a command with only the network its allowlist admits, in a "
                    "read-only view of your files (docs/isolation.md).")
    parser.add_argument("-F", "--file", dest="files", action="append", default=[],
                        metavar="FILE", help="allowlist file (may repeat; rules merge)")
    parser.add_argument("--allow", dest="rules", action="append", default=[], metavar="RULE",
                        help="one allowlist rule (may repeat)")
    parser.add_argument("-p", "--profile", dest="profiles", action="append", default=[],
                        metavar="FILE",
                        help="options from a TOML profile (docs/profiles.md; may repeat): "
                             "command-line rules and files add to its own, other options "
                             "replace its values")
    parser.add_argument("--dns-upstream", action="append", default=[], metavar="ADDR[:PORT]",
                        help="DNS server to resolve allowed names with (default: the host's "
                             "resolv.conf)")
    parser.add_argument("--mtu", type=int, help="MTU of tap0 (default 65520)")
    parser.add_argument("--ipv6", choices=("auto", "on", "off"),
                        help="IPv6 in the sandbox (fd00::100/64) and AAAA answers: auto = only "
                             "when the host can reach IPv6 destinations (default)")
    parser.add_argument("--root", action="store_true",
                        help="run CMD as uid/gid 0 inside the sandbox (fakeroot)")
    parser.add_argument("-n", "--no-network", action="store_true",
                        help="no network at all: CMD gets only a loopback interface")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="report every connection and DNS decision, and the sandbox's "
                             "mounts, on stderr")
    files = parser.add_argument_group(
        "files (docs/isolation.md; the path options may repeat and apply in order, later wins)")
    files.add_argument("--fs", choices=("project", "host", "overlay"),
                       help="project (default): the host read-only, the working directory "
                            "writable, $HOME copy-on-write (discarded), private /tmp, secrets "
                            "hidden; host: the host's files as they are; overlay: every write "
                            "goes to a kept layer, reviewed and committed afterwards "
                            "(docs/overlay.md)")
    files.add_argument("--changes-dir", metavar="DIR",
                       help="with --fs overlay: keep the layer in DIR (default "
                            "$XDG_DATA_HOME/tapbox/changes/ID); a DIR holding a layer is "
                            "continued")
    files.add_argument("--on-exit", choices=("ask", "commit", "keep", "discard"),
                       help="with --fs overlay: what to do with the layer when the command "
                            "ends (default ask: a prompt on a terminal, else keep)")
    for flag, action, text in (
            ("--write", "write", "make PATH writable in the sandbox (the real PATH)"),
            ("--read", "read", "make PATH visible read-only (also shows a hidden secret)"),
            ("--hide", "hide", "make PATH empty and inaccessible"),
            ("--tmpfs", "tmpfs", "an empty, writable PATH, discarded at exit")):
        files.add_argument(flag, dest="paths", action="append", metavar="PATH", help=text,
                           type=lambda path, action=action: PathRule(action, path))
    env = parser.add_argument_group("environment")
    env.add_argument("--setenv", action="append", default=[], metavar="VAR=VALUE",
                     help="set VAR in the command's environment")
    env.add_argument("--unsetenv", action="append", default=[], metavar="VAR",
                     help="remove VAR from the command's environment")
    env.add_argument("--clearenv", action="store_true",
                     help="start from an empty environment, keeping only PATH, HOME, TERM, "
                          "LANG, LC_*, USER, SHELL and TZ")
    record = parser.add_argument_group("auditing (docs/audit.md)")
    record.add_argument("--log", metavar="FILE",
                        help="write every DNS query and flow to FILE, one JSON line each, with "
                             "the process that opened each flow")
    record.add_argument("--log-limit", metavar="SIZE",
                        help="stop the log when FILE reaches SIZE; its last line then says so "
                             "(default 100M)")
    record.add_argument("--audit", action="store_true",
                        help="block nothing: record what the allowlist would deny (summary at "
                             "exit)")
    record.add_argument("--learn", metavar="FILE",
                        help="audit mode, then write to FILE (or merge into it) an allowlist "
                             "that admits what the command used")
    record.add_argument("--pcap", metavar="FILE",
                        help="capture the sandbox's frames (tap0, both directions) to FILE")
    record.add_argument("--pcap-limit", metavar="SIZE",
                        help="stop capturing when FILE reaches SIZE (default 100M)")
    record.add_argument("--summary", action="store_true",
                        help="always print the summary table at exit (default: only when "
                             "something was denied, or in audit mode)")
    record.add_argument("-q", "--quiet", action="store_true",
                        help="no summary and no per-connection lines on stderr")
    confine = parser.add_argument_group("confinement (docs/isolation.md)")
    confine.add_argument("--syscalls", choices=("default", "strict", "off"),
                         help="system-call policy: default refuses what a sandboxed program "
                              "has no business doing (keyrings, bpf, io_uring...); strict "
                              "allows computing only (no files, sockets, exec; violations "
                              "kill); off keeps only the terminal guard")
    confine.add_argument("--syscall-allow", action="append", default=[], metavar="NAME",
                         help="also allow a system call, or a group such as @io_uring or "
                              "@files_read (may repeat)")
    confine.add_argument("--no-nest", action="store_true",
                         help="no user namespaces inside: no sandbox (tapbox, bubblewrap, a "
                              "browser's) can be created in this one")
    confine.add_argument("--landlock", action="store_true",
                         help="also enforce the read-only parts of the view with Landlock, "
                              "where the kernel has it (a landlocked sandbox cannot mount, so "
                              "no tapbox can run inside it)")
    limits = parser.add_argument_group("resource limits (default: none)")
    limits.add_argument("--timeout", metavar="DURATION",
                        help="kill the whole sandbox after DURATION (30s, 10m, 2h) and exit 124")
    limits.add_argument("--memory", metavar="SIZE",
                        help="memory limit (e.g. 512M, 2G): for the sandbox as a whole with a "
                             "delegated cgroup, else per process (RLIMIT_DATA)")
    limits.add_argument("--max-procs", type=int, metavar="N",
                        help="at most N processes and threads (besides tapbox's init)")
    limits.add_argument("--max-files", type=int, metavar="N",
                        help="at most N open files per process")
    parser.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


# How each option fills RunOptions: argparse dest, field, how messages name the option, and the
# value it sets given the option's own (lists become tuples). An option not given sets nothing.
# Two options that set one field to different values contradict each other (--summary, -q).
_FLAGS: list[tuple[str, str, str, Callable[[Any], Any]]] = [
    ("files", "network.allowlists", "-F", tuple),
    ("rules", "network.allow", "--allow", lambda rules: tuple(AllowRule(r) for r in rules)),
    ("dns_upstream", "network.dns_upstream", "--dns-upstream", tuple),
    ("mtu", "network.mtu", "--mtu", int),
    ("ipv6", "network.ipv6", "--ipv6", str),
    ("no_network", "network.enabled", "-n", lambda _: False),
    ("root", "environment.root", "--root", bool),
    ("setenv", "environment.setenv", "--setenv", tuple),
    ("unsetenv", "environment.unsetenv", "--unsetenv", tuple),
    ("clearenv", "environment.clearenv", "--clearenv", bool),
    ("fs", "filesystem.view", "--fs", str),
    ("paths", "filesystem.paths", "--write/--read/--hide/--tmpfs", tuple),
    ("changes_dir", "filesystem.changes_dir", "--changes-dir", str),
    ("on_exit", "filesystem.on_exit", "--on-exit", str),
    ("verbose", "record.verbose", "-v", bool),
    ("log", "record.log", "--log", str),
    ("audit", "record.audit", "--audit", bool),
    ("learn", "record.learn", "--learn", str),
    ("pcap", "record.pcap", "--pcap", str),
    ("pcap_limit", "record.pcap_limit", "--pcap-limit", int),
    ("log_limit", "record.log_limit", "--log-limit", int),
    ("summary", "record.report", "--summary", lambda _: "summary"),
    ("quiet", "record.report", "-q", lambda _: "quiet"),
    ("syscalls", "process.syscalls", "--syscalls", str),
    ("syscall_allow", "process.syscall_allow", "--syscall-allow", tuple),
    ("no_nest", "process.nest", "--no-nest", lambda _: False),
    ("landlock", "process.landlock", "--landlock", bool),
    ("timeout", "limits.timeout", "--timeout", float),
    ("memory", "limits.memory", "--memory", int),
    ("max_procs", "limits.max_procs", "--max-procs", int),
    ("max_files", "limits.max_files", "--max-files", int),
]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line as argparse reads it, plus `command` (CMD and its arguments) and
    `options` (RunOptions from the profiles and the options). A usage error exits through
    argparse (SystemExit 2); a profile that cannot be used raises ProfileError."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        parser.error("no command given (usage: " + USAGE.splitlines()[0] + ")")
    for dest, option in (("pcap_limit", "--pcap-limit"), ("log_limit", "--log-limit"),
                         ("memory", "--memory")):
        if getattr(args, dest) is not None:
            from tapbox.pcap import parse_size

            try:
                setattr(args, dest, parse_size(getattr(args, dest)))
            except ValueError as exc:
                parser.error(f"{option}: {exc}")
    if args.timeout is not None:
        from tapbox.options import parse_duration

        try:
            args.timeout = parse_duration(args.timeout)
        except ValueError as exc:
            parser.error(f"--timeout: {exc}")
    layers = []
    if args.profiles:
        from tapbox.profile import load_profile

        layers = [load_profile(path) for path in args.profiles]
    try:
        args.options = RunOptions.from_layers(*layers, command_line_layer(args))
    except UsageError as exc:
        parser.error(str(exc))
    args.command = command
    return args


def command_line_layer(args: argparse.Namespace) -> Layer:
    """The fields the options in `args` set; UsageError if two of them contradict."""
    layer = Layer()
    for dest, path, flag, value_of in _FLAGS:
        given = getattr(args, dest)
        if given is None or given is False or given == []:
            continue
        value = value_of(given)
        if path in layer.values and layer.values[path] != value:
            raise UsageError(f"{layer.origins[path].name} and {flag} contradict each other: "
                             "choose one", option=path)
        layer.set(path, value, Origin(flag))
    return layer
