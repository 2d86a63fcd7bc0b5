"""System-call policies: the default deny list, strict, off, the builder, named violations.

Policies are checked as data (tapbox.isolate.syscalls), then for real: a small probe
(tests/sandbox_tools/syscall_probe.py) makes each call inside the sandbox, through the CLI, and
the JSONL log says which calls tapbox's supervisor named.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import TESTS_DIR, RunTapbox

from tapbox.isolate import Sandbox, SandboxConfig
from tapbox.isolate import seccomp as sc
from tapbox.isolate import syscalls as pol
from tapbox.isolate.supervisor import Violation

PY = sys.executable
PROBE = TESTS_DIR / "sandbox_tools" / "syscall_probe.py"
SHORT = 60.0
LIB = sc.Libseccomp()


def nr(name: str) -> int:
    number = LIB.syscall_number(name)
    assert number is not None and number >= 0, f"{name} is not a native system call here"
    return number


def probe_args(*calls: tuple[str, str]) -> list[str]:
    """("keyctl", "0,-3,0") -> "keyctl=250:0,-3,0"; names not native here are left out."""
    out = []
    for name, args in calls:
        number = LIB.syscall_number(name)
        if number is not None and number >= 0:
            out.append(f"{name}={number}" + (f":{args}" if args else ""))
    return out


def log_events(path: Path, kind: str) -> list[dict[str, object]]:
    events = [json.loads(line) for line in path.read_text().splitlines()]
    return [e for e in events if e["event"] == kind]


# ------------------------------------------------------------------------------------------------
# The policies as data


def test_every_default_refusal_says_why() -> None:
    for rule in pol.DEFAULT_POLICY.rules:
        assert rule.why, rule
        assert rule.action in (pol.EPERM, pol.ENOSYS), rule
    denied = {r.syscall for r in pol.DEFAULT_POLICY.rules}
    for name in ("keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
                 "kexec_load", "kexec_file_load", "init_module", "finit_module",
                 "delete_module", "open_by_handle_at", "personality", "io_uring_setup",
                 "io_uring_enter", "io_uring_register", "fsopen", "fsconfig", "fsmount",
                 "fspick", "ioctl"):
        assert name in denied, name
    # What nesting and debuggers need stays allowed.
    for name in ("ptrace", "process_vm_readv", "unshare", "clone", "clone3", "setns", "mount",
                 "pivot_root", "open_tree", "move_mount", "seccomp"):
        assert name not in denied, name


@pytest.mark.parametrize(("value", "allowed"), [
    (0xFFFFFFFF, True),  # the query
    (0x0, True), (0x8, True),  # PER_LINUX, PER_LINUX32
    (0x20000, True), (0x20008, True),  # UNAME26
    (0x40000, False),  # ADDR_NO_RANDOMIZE
    (0x400000, False), (0x100000, False), (0x200000, False), (0x8000000, False),
    (0x1, False), (0x10, False),  # other execution domains
    (0x80000000, False), (0xFFFFFFFE, False), (0x80040000, False),
    (0x1_0004_0000, False),  # high bits the kernel drops do not hide ADDR_NO_RANDOMIZE
    (0x1_FFFF_FFFF, True),  # ... nor turn the query into something else
])
def test_personality_rules(value: int, allowed: bool) -> None:
    action = pol.DEFAULT_POLICY.decide("personality", [value, 0, 0, 0, 0, 0])
    assert (action == pol.Allow()) is allowed, (hex(value), action)


def test_ioctl_guard_reads_the_low_32_bits() -> None:
    for request in (pol.TIOCSTI, pol.TIOCSTI | 1 << 32, pol.TIOCLINUX):
        assert pol.DEFAULT_POLICY.decide("ioctl", [0, request, 0, 0, 0, 0]) == pol.EPERM
    assert pol.DEFAULT_POLICY.decide("ioctl", [0, pol.TIOCGWINSZ, 0, 0, 0, 0]) == pol.Allow()


def test_builder_later_statements_replace_earlier_ones() -> None:
    policy = (pol.PolicyBuilder()
              .allow("@exit", "read", "write")
              .deny("write", errno=errno.EACCES)
              .kill("read")
              .allow("read")
              .build())
    assert policy.default == pol.KILL and policy.is_allow_list
    assert policy.decide("exit_group", [0] * 6) == pol.Allow()
    assert policy.decide("write", [0] * 6) == pol.Errno(errno.EACCES)
    assert policy.decide("read", [0] * 6) == pol.Allow()
    assert policy.decide("openat", [0] * 6) == pol.KILL
    # A rule that says what the default says is left out (libseccomp refuses it).
    assert not any(r.syscall == "openat" for r in policy.rules)


def test_builder_allow_if_and_groups() -> None:
    policy = (pol.PolicyBuilder(pol.Errno(errno.EPERM))
              .allow("@read_write")
              .allow_if("socket", pol.ArgCmp.eq(0, 1), why="AF_UNIX only")
              .build())
    assert policy.decide("socket", [1, 1, 0, 0, 0, 0]) == pol.Allow()
    assert policy.decide("socket", [2, 1, 0, 0, 0, 0]) == pol.EPERM
    assert policy.decide("ioctl", [0, pol.TCGETS, 0, 0, 0, 0]) == pol.Allow()
    assert policy.decide("ioctl", [0, pol.TIOCSTI, 0, 0, 0, 0]) == pol.EPERM
    with pytest.raises(ValueError, match="unknown system-call group '@nope'"):
        pol.PolicyBuilder().allow("@nope")
    with pytest.raises(ValueError, match="invalid system-call name"):
        pol.PolicyBuilder().deny("rm -rf")


def test_allowing_ioctl_keeps_the_terminal_guard() -> None:
    policy = pol.policy_for("default", ["ioctl", "@io_uring"])
    assert policy.decide("ioctl", [0, pol.TIOCSTI, 0, 0, 0, 0]) == pol.EPERM
    assert policy.decide("io_uring_setup", [0] * 6) == pol.Allow()
    assert policy.decide("keyctl", [0] * 6) == pol.EPERM


def test_strict_allows_computing_only() -> None:
    strict = pol.strict_policy()
    assert strict.name == "strict" and strict.default == pol.KILL
    for name in ("read", "write", "mmap", "futex", "exit_group", "getrandom", "clock_gettime"):
        assert strict.decide(name, [0] * 6) == pol.Allow(), name
    for name in ("openat", "open", "socket", "connect", "execve", "fork", "ptrace", "mount",
                 "memfd_create", "pidfd_getfd", "unshare", "io_uring_setup"):
        assert strict.decide(name, [0] * 6) == pol.KILL, name
    assert strict.decide("clone", [pol.CLONE_THREAD | 0x3D0F00, 0, 0, 0, 0, 0]) == pol.Allow()
    assert strict.decide("clone", [0x11, 0, 0, 0, 0, 0]) == pol.KILL  # a fork
    assert strict.decide("clone3", [0] * 6) == pol.ENOSYS
    widened = pol.policy_for("strict", ["@files_read"])
    assert widened.decide("openat", [0, 0, os.O_RDONLY, 0, 0, 0]) == pol.Allow()
    assert widened.decide("openat", [0, 0, os.O_WRONLY, 0, 0, 0]) == pol.KILL
    assert widened.decide("openat", [0, 0, os.O_RDONLY | os.O_CREAT, 0, 0, 0]) == pol.KILL
    assert widened.decide("openat", [0, 0, os.O_RDONLY | os.O_TRUNC, 0, 0, 0]) == pol.KILL


def test_unknown_allow_names_are_skipped_but_unknown_refusals_are_errors() -> None:
    allow = pol.PolicyBuilder().allow("exit_group", "no_such_call_xyz").build()
    sc.compile_filter(allow).release()  # left out: the call stays refused
    deny = pol.Policy(pol.Allow(), (pol.Rule("no_such_call_xyz", pol.EPERM),))
    with pytest.raises(sc.SetupError, match="does not know the system call"):
        sc.compile_filter(deny)


# ------------------------------------------------------------------------------------------------
# The default policy, for real


def test_each_denied_call_fails_and_is_named(run_tapbox: RunTapbox, tmp_path: Path) -> None:
    calls = [("keyctl", "0,-3,0"), ("add_key", ""), ("request_key", ""), ("bpf", ""),
             ("perf_event_open", ""), ("userfaultfd", ""), ("kexec_load", ""),
             ("kexec_file_load", ""), ("init_module", ""), ("finit_module", "-1"),
             ("delete_module", ""), ("open_by_handle_at", "-1"), ("io_uring_setup", "1"),
             ("io_uring_enter", "-1"), ("io_uring_register", "-1"), ("syslog", ""),
             ("acct", ""), ("quotactl", ""), ("swapon", ""), ("swapoff", ""), ("reboot", ""),
             ("iopl", "0"), ("ioperm", ""), ("uselib", ""), ("modify_ldt", "")]
    enosys = [("fsopen", ""), ("fsconfig", "-1"), ("fsmount", "-1"), ("fspick", "-1")]
    control = [("getppid", "")]
    log = tmp_path / "run.jsonl"
    proc = run_tapbox("--log", str(log), cmd=[PY, str(PROBE), *probe_args(
        *calls, *enosys, *control)], timeout=SHORT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    denied = {name for name, _ in calls if name in result}
    assert len(denied) >= 20, result  # most are native everywhere
    for name in denied:
        assert result[name] == "EPERM", (name, result)
    for name, _ in enosys:
        assert result[name] == "ENOSYS", (name, result)
    assert result["getppid"] == "ok"
    named = log_events(log, "syscall")
    assert {e["syscall"] for e in named} == denied  # ENOSYS is a fallback answer: not named
    for event in named:
        assert event["action"] == "EPERM" and event["pid"] == 2 and event["policy"] == "default"
        assert event["cmdline"] == [PY, str(PROBE), *probe_args(*calls, *enosys, *control)]
    exit_event = log_events(log, "exit")[0]
    assert exit_event["syscalls_refused"] == len(denied)
    # stderr names each (process and call) once, within the rate limit for such lines
    for name in ("keyctl", "bpf", "perf_event_open"):
        assert proc.stderr.count(f"system call {name} by pid 2 (") == 1, proc.stderr
    assert "more lines about connections, DNS and system calls not shown" in proc.stderr


def test_personality_weakening_aslr_is_refused_for_real(run_tapbox: RunTapbox) -> None:
    values = {"query": "0xffffffff", "linux": "0x0", "uname26": "0x20000",
              "no_randomize": "0x40000", "read_implies_exec": "0x400000",
              "top_bit": "0x80040000"}
    number = nr("personality")
    proc = run_tapbox("-n", cmd=[PY, str(PROBE), *(f"{k}={number}:{v}"
                                                   for k, v in values.items())], timeout=SHORT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"query": "ok", "linux": "ok", "uname26": "ok",
                                       "no_randomize": "EPERM", "read_implies_exec": "EPERM",
                                       "top_bit": "EPERM"}


def test_off_keeps_only_the_terminal_guard(run_tapbox: RunTapbox) -> None:
    proc = run_tapbox("-n", "--syscalls", "off", cmd=[PY, str(PROBE), *probe_args(
        ("keyctl", "0,-3,0"), ("fsopen", ""), ("ioctl", f"0,{pol.TIOCSTI},0"))],
        timeout=SHORT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["keyctl"] != "EPERM" and result["fsopen"] != "ENOSYS", result
    assert result["ioctl"] == "EPERM"  # TIOCSTI on stdin: refused in every mode
    assert "system call keyctl" not in proc.stderr


def test_io_uring_can_be_allowed(run_tapbox: RunTapbox) -> None:
    args = probe_args(("io_uring_setup", "1"))  # entries=1, params=NULL: fails if let through
    base = run_tapbox("-n", cmd=[PY, str(PROBE), *args], timeout=SHORT)
    opened = run_tapbox("-n", "--syscall-allow", "@io_uring", cmd=[PY, str(PROBE), *args],
                        timeout=SHORT)
    assert json.loads(base.stdout) == {"io_uring_setup": "EPERM"}, base.stderr
    assert json.loads(opened.stdout)["io_uring_setup"] in ("EFAULT", "EINVAL"), opened.stderr
    assert "system call io_uring_setup" in base.stderr
    assert "system call io_uring_setup" not in opened.stderr


def test_a_bad_syscall_allow_is_a_usage_error(run_tapbox: RunTapbox) -> None:
    proc = run_tapbox("-n", "--syscall-allow", "@io-urin", cmd=["true"], timeout=SHORT)
    assert proc.returncode == 125
    assert "unknown system-call group '@io-urin'" in proc.stderr


def test_violation_names_are_escaped(run_tapbox: RunTapbox, tmp_path: Path) -> None:
    """The process name is the sandbox's to choose: it reaches stderr escaped."""
    evil = tmp_path / "ev\x1b[2Jil"
    evil.symlink_to(PY)
    os.chmod(tmp_path, 0o755)
    proc = run_tapbox("-n", "--read", str(tmp_path), cmd=[str(evil), str(PROBE),
                      *probe_args(("keyctl", "0,-3,0"))], timeout=SHORT)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stderr
    assert "system call keyctl by pid 2 (ev\\x1b[2Jil): refused with EPERM" in proc.stderr


# ------------------------------------------------------------------------------------------------
# strict


def test_strict_kills_a_dynamic_program_at_its_first_file(run_tapbox: RunTapbox) -> None:
    """`true` is killed when its loader reaches for its first file, and the call is named."""
    proc = run_tapbox("-n", "--syscalls", "strict", cmd=["true"], timeout=SHORT)
    assert proc.returncode == 128 + signal.SIGKILL, proc.stderr
    assert "by pid 2 (true): killed it (--syscalls strict)" in proc.stderr, proc.stderr


def test_strict_with_files_read_runs_python_but_no_sockets(run_tapbox: RunTapbox,
                                                           tmp_path: Path) -> None:
    script = "import sys; print(sum(range(10))); sys.stdout.flush(); import socket; " \
             "socket.socket(); print('not reached')"
    log = tmp_path / "run.jsonl"
    proc = run_tapbox("--log", str(log), "--syscalls", "strict", "--syscall-allow",
                      "@files_read", cmd=[PY, "-S", "-c", script], timeout=SHORT)
    assert proc.stdout == "45\n", proc.stderr
    assert proc.returncode == 128 + signal.SIGKILL, proc.stderr
    assert "system call socket by pid 2 (" in proc.stderr and "killed it" in proc.stderr
    [event] = log_events(log, "syscall")
    assert (event["syscall"], event["action"], event["policy"]) == ("socket", "killed", "strict")


@pytest.mark.parametrize("what", ["exec", "write-open", "fork"])
def test_strict_refuses_exec_writing_and_forking(run_tapbox: RunTapbox, what: str,
                                                 tmp_path: Path) -> None:
    action = {"exec": "os.execv('/bin/true', ['true'])",
              "write-open": f"open({str(tmp_path / 'x')!r}, 'w')",
              "fork": "os.fork()"}[what]
    proc = run_tapbox("-n", "--write", str(tmp_path), "--syscalls", "strict",
                      "--syscall-allow", "@files_read",
                      cmd=[PY, "-S", "-c", f"import os; {action}; print('not reached')"],
                      timeout=SHORT)
    assert proc.returncode == 128 + signal.SIGKILL, proc.stderr
    assert "not reached" not in proc.stdout and "killed it" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_strict_in_this_process_with_the_builder(tmp_path: Path) -> None:
    """What tapbox.call will do: a forked Python child loads an allow list and computes."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            os.set_inheritable(w, False)
            from tapbox.isolate.libc import PR_SET_NO_NEW_PRIVS, Libc

            Libc().prctl(PR_SET_NO_NEW_PRIVS, 1)
            sc.install(pol.strict_policy(), notify=False)
            os.write(w, str(sum(i * i for i in range(100))).encode())
            open(tmp_path / "nope", "w")  # noqa: SIM115 - killed here
            os.write(w, b" not reached")
        finally:
            os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        assert f.read() == "328350"
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS
    assert not (tmp_path / "nope").exists()


def test_strict_through_the_api_names_violations(tmp_path: Path) -> None:
    seen: list[Violation] = []
    sb = Sandbox.spawn(SandboxConfig(["true"], network=False, syscalls=pol.strict_policy()),
                       on_violation=seen.append)
    sb.start()
    assert sb.wait_status() == 128 + signal.SIGKILL
    sb.close()
    assert [(v.pid, v.comm, v.action, v.policy) for v in seen] == [
        (2, "true", "killed", "strict")]
    assert seen[0].syscall in ("access", "openat", "open", "newfstatat")


# ------------------------------------------------------------------------------------------------
# A filter whose listener cannot be had (a sandbox inside another) refuses, unnamed


def test_inner_sandbox_refuses_without_naming(run_tapbox: RunTapbox) -> None:
    inner = [PY, "-m", "tapbox", "-n", "-v", "--", PY, str(PROBE),
             *probe_args(("keyctl", "0,-3,0"))]
    proc = run_tapbox("-n", cmd=inner, timeout=SHORT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"keyctl": "EPERM"}
    assert "refused calls are not named (another seccomp supervisor is in charge here" \
        in proc.stderr, proc.stderr


def test_inner_strict_kills_unnamed_and_says_so(run_tapbox: RunTapbox) -> None:
    inner = [PY, "-m", "tapbox", "-n", "--syscalls", "strict", "--", "true"]
    proc = run_tapbox("-n", cmd=inner, timeout=SHORT)
    assert proc.returncode == 128 + signal.SIGSYS, proc.stderr
    assert "killed by SIGSYS: it made a system call that --syscalls strict forbids; the call " \
        "could not be named (another seccomp supervisor" in proc.stderr, proc.stderr


def test_every_syscall_name_in_the_groups_is_plausible() -> None:
    """A misspelt name in a group would silently allow nothing: every name must be known to
    libseccomp (on some architecture), apart from the newest calls an old libseccomp lacks."""
    newer = {"futex_waitv", "clock_gettime64", "clock_getres_time64",
             "clock_nanosleep_time64", "rt_sigtimedwait_time64", "ppoll_time64",
             "pselect6_time64", "futex_time64", "epoll_pwait2", "close_range", "faccessat2",
             "mlock2", "statx", "preadv2", "pwritev2", "rseq"}
    for group, entries in pol.GROUPS.items():
        for entry in entries:
            name = entry.syscall if isinstance(entry, pol.Rule) else entry
            assert LIB.syscall_number(name) is not None or name in newer, (group, name)


def test_probe_tool_is_what_the_tests_think(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import subprocess, sys, json
        out = subprocess.run([sys.executable, {str(PROBE)!r}, "getppid={nr('getppid')}",
                              "close={nr('close')}:-1"], capture_output=True, text=True)
        print(out.stdout)
    """)
    import subprocess

    proc = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=30)
    assert json.loads(proc.stdout) == {"getppid": "ok", "close": "EBADF"}


def test_a_flood_of_refusals_is_counted_and_bounded(run_tapbox: RunTapbox, fakenet: object,
                                                    tmp_path: Path) -> None:
    """A hostile loop of refused calls: each is answered, stderr says it once, the count is
    exact, the network still works, and nothing the loop makes tapbox hold grows unbounded."""
    count = 20000
    script = textwrap.dedent(f"""
        import ctypes, subprocess, sys
        libc = ctypes.CDLL(None, use_errno=True)
        for _ in range({count}):
            libc.syscall({nr('keyctl')}, 0, -3, 0)
        print(ctypes.get_errno())
        subprocess.run([sys.executable, {str(TESTS_DIR / 'client.py')!r}, "hello",
                        "api.example.test", "80"], check=True)
    """)
    log = tmp_path / "run.jsonl"
    proc = run_tapbox("--log", str(log), "--log-limit", "20M", cmd=[PY, "-c", script],
                      allow=["api.example.test:80"], timeout=SHORT * 2)
    assert proc.returncode == 0, proc.stderr
    first, hello = proc.stdout.splitlines()
    assert first == str(errno.EPERM) and "hello from 192.0.2.10:80" in hello
    assert proc.stderr.count("system call keyctl by pid 2") == 1, proc.stderr
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert events[-1]["event"] == "exit" and events[-1]["syscalls_refused"] == count
    logged = sum(1 for e in events if e["event"] == "syscall")
    assert logged <= count
    if logged < count:  # some came faster than the loop took them: said once
        assert f"{count - logged} refused system calls came too fast" in proc.stderr


def test_the_32_bit_abi_meets_the_same_policy(run_tapbox: RunTapbox, tmp_path: Path) -> None:
    """`int 0x80` (the i386 ABI, open to a 64-bit process) is no way around the filter, and
    the refusal is named with its ABI."""
    import platform
    import shutil
    import subprocess

    if platform.machine() != "x86_64":
        pytest.skip("int 0x80 (the i386 ABI) exists on x86_64 only")
    assert shutil.which("cc"), "a C compiler is needed (apt-get install gcc)"
    src = tmp_path / "i386.c"
    src.write_text('#include <stdio.h>\nint main(void) { long ret;\n'
                   '  __asm__ volatile ("int $0x80" : "=a"(ret) : "a"(288L), "b"(0L), "c"(-3L),'
                   ' "d"(0L) : "memory");  /* keyctl on i386 */\n'
                   '  printf("%ld\\n", ret); return 0; }\n')
    binary = tmp_path / "i386"
    subprocess.run(["cc", "-o", str(binary), str(src)], check=True, timeout=60)
    log = tmp_path / "run.jsonl"
    proc = run_tapbox("--log", str(log), "--read", str(tmp_path), cmd=[str(binary)],
                      timeout=SHORT)
    assert proc.stdout == f"{-errno.EPERM}\n", proc.stderr
    [event] = log_events(log, "syscall")
    assert (event["syscall"], event["arch"], event["action"]) == ("keyctl", "x86", "EPERM")


def test_strict_exec_rule_cannot_be_reused(run_tapbox: RunTapbox) -> None:
    """The one exec strict allows goes through a descriptor number the program cannot put a
    file at (just beyond its RLIMIT_NOFILE); any other exec kills."""
    script = ("import os, resource\n"
              "soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]\n"
              "fd = os.open('/bin/true', os.O_RDONLY)\n"
              "try:\n"
              "    os.dup2(fd, soft)\n"
              "    print('dup2 ok', flush=True)\n"
              "except OSError as e:\n"
              "    print('dup2', e.strerror, flush=True)\n"
              "os.execve(fd, ['true'], {})\n")
    proc = run_tapbox("-n", "--syscalls", "strict", "--syscall-allow", "@files_read",
                      cmd=[PY, "-S", "-c", script], timeout=SHORT)
    assert proc.stdout == "dup2 Bad file descriptor\n", proc.stderr
    assert proc.returncode == 128 + signal.SIGKILL
    assert "system call execveat by pid 2" in proc.stderr and "killed it" in proc.stderr


def test_the_exec_descriptor_is_put_out_of_reach() -> None:
    import resource

    from tapbox.isolate.reaper import _out_of_reach

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fd = os.open("/bin/true", os.O_PATH | os.O_CLOEXEC)
    moved = _out_of_reach(fd)
    try:
        # The first number nothing can be dup'ed to: the soft limit, lowered by one to make
        # room where it was the hard limit.
        expected = soft if soft < hard else hard - 1
        assert moved == expected
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (expected, hard)
        with pytest.raises(OSError) as info:
            os.dup2(0, expected)
        assert info.value.errno == errno.EBADF
        assert os.readlink(f"/proc/self/fd/{moved}") == os.path.realpath("/bin/true")
    finally:
        os.close(moved)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_quiet_hides_refusals_but_not_kills(run_tapbox: RunTapbox) -> None:
    quiet = run_tapbox("-n", "-q", cmd=[PY, str(PROBE), *probe_args(("keyctl", "0,-3,0"))],
                       timeout=SHORT)
    assert json.loads(quiet.stdout) == {"keyctl": "EPERM"} and quiet.stderr == ""
    killed = run_tapbox("-n", "-q", "--syscalls", "strict", cmd=["true"], timeout=SHORT)
    assert "by pid 2 (true): killed it (--syscalls strict)" in killed.stderr
