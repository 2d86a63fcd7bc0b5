"""`tapbox [options] -- CMD [ARGS...]`: parse the command line, then hand over to `runner`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from tapbox.errors import SetupError

EXIT_TAPBOX_FAILED = 125

USAGE = """tapbox [-F FILE]... [--allow RULE]... [options] -- CMD [ARGS...]
       tapbox log show FILE [--denied] [--domain NAME] [--flows]"""
EPILOG = """\
Rules (one per line in a file): example.com, *.example.com, 192.0.2.10, 198.51.100.0/24,
[2001:db8::1], each optionally with :PORT or :LOW-HIGH. Nothing is allowed unless a rule
says so. Exit status: CMD's own; 128+N if CMD died of signal N; 125 if tapbox failed;
126/127 if CMD could not be run / was not found. A command literally named "log" is run
as `tapbox -- log ...` (without "--", "tapbox log ..." reads an event log).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tapbox", usage=USAGE, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a command with only the network its allowlist admits.")
    parser.add_argument("-F", "--file", dest="files", action="append", default=[],
                        metavar="FILE", help="allowlist file (may repeat; rules merge)")
    parser.add_argument("--allow", dest="rules", action="append", default=[], metavar="RULE",
                        help="one allowlist rule (may repeat)")
    parser.add_argument("--dns-upstream", action="append", default=[], metavar="ADDR[:PORT]",
                        help="DNS server to resolve allowed names with (default: the host's "
                             "resolv.conf)")
    parser.add_argument("--mtu", type=int, default=65520, help="MTU of tap0 (default 65520)")
    parser.add_argument("--ipv6", choices=("auto", "on", "off"), default="auto",
                        help="IPv6 in the sandbox (fd00::100/64) and AAAA answers: auto = only "
                             "when the host can reach IPv6 destinations (default)")
    parser.add_argument("--root", action="store_true",
                        help="run CMD as uid/gid 0 inside the sandbox (fakeroot)")
    parser.add_argument("-n", "--no-network", action="store_true",
                        help="no network at all: CMD gets only a loopback interface")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="report every connection and DNS decision on stderr")
    record = parser.add_argument_group("auditing (docs/audit.md)")
    record.add_argument("--log", metavar="FILE",
                        help="write every DNS query and flow to FILE, one JSON line each, with "
                             "the process that opened each flow")
    record.add_argument("--log-limit", metavar="SIZE", default="100M",
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
    record.add_argument("--pcap-limit", metavar="SIZE", default="100M",
                        help="stop capturing when FILE reaches SIZE (default 100M)")
    record.add_argument("--summary", action="store_true",
                        help="always print the summary table at exit (default: only when "
                             "something was denied, or in audit mode)")
    record.add_argument("-q", "--quiet", action="store_true",
                        help="no summary and no per-connection lines on stderr")
    parser.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        parser.error("no command given (usage: " + USAGE.splitlines()[0] + ")")
    if not 576 <= args.mtu <= 65520:
        parser.error(f"--mtu {args.mtu}: must be between 576 and 65520")
    if args.no_network:
        used = [flag for flag, value in (("--log", args.log), ("--audit", args.audit),
                                         ("--learn", args.learn), ("--pcap", args.pcap))
                if value]
        if used:
            parser.error(f"{used[0]} needs the network: it cannot be used with -n")
    if args.summary and args.quiet:
        parser.error("--summary and -q contradict each other: choose one")
    from tapbox.pcap import parse_size

    try:
        args.pcap_limit = parse_size(args.pcap_limit)
    except ValueError as exc:
        parser.error(f"--pcap-limit: {exc}")
    from tapbox.eventlog import MIN_LOG_LIMIT

    try:
        args.log_limit = parse_size(args.log_limit)
    except ValueError as exc:
        parser.error(f"--log-limit: {exc}")
    if args.log_limit < MIN_LOG_LIMIT:
        parser.error(f"--log-limit: at least {MIN_LOG_LIMIT} bytes")
    args.command = command
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "log":  # `tapbox log show FILE`; a command named log: tapbox -- log
        from tapbox.logcmd import main as log_main

        return log_main(argv[1:])
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors are tapbox's own failure
        code = exc.code if isinstance(exc.code, int) else EXIT_TAPBOX_FAILED
        return EXIT_TAPBOX_FAILED if code == 2 else code
    from tapbox.runner import run

    try:
        status = run(args)
    except SetupError as exc:
        from tapbox.textescape import escape

        text = escape(exc)  # it may quote a line of a file the sandbox could have written
        print(text if text.startswith("tapbox:") else f"tapbox: {text}", file=sys.stderr)
        status = EXIT_TAPBOX_FAILED
    return status


def entry() -> None:
    """The `tapbox` command: run, then leave without the interpreter's teardown (module
    clean-up and garbage collection cost tens of milliseconds on every sandboxed command;
    everything tapbox writes is flushed or closed by then)."""
    status = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)
