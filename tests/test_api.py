"""The Python API (tapbox.run, call, enter and their async forms), in the pytest process itself
and in fresh interpreters, against the fake internet."""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import pickle
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import HTTP_BODY, REPO_ROOT, tapbox_env
from fakenet import DNS_UPSTREAM, FakeNet

import tapbox

NET: dict[str, Any] = {"dns_upstream": DNS_UPSTREAM, "report": "quiet"}
PY = sys.executable


def connect(address: str, port: int, payload: bytes = b"HELLO\n") -> str:
    """In the sandbox: one connection, its first line, or the error's name."""
    try:
        with socket.create_connection((address, port), timeout=5) as sock:
            sock.sendall(payload)
            return sock.makefile("rb").readline().decode().strip()
    except OSError as exc:
        return type(exc).__name__


def py(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


# ------------------------------------------------------------------------------------------------
# tapbox.run: subprocess.run's interface


def test_run_captures_output_and_status() -> None:
    result = tapbox.run(["sh", "-c", "echo out; echo err >&2; exit 3"], capture_output=True,
                        network=False)
    assert (result.returncode, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
    assert result.args == ["sh", "-c", "echo out; echo err >&2; exit 3"]
    assert result.flows == () and result.dns == ()


def test_run_input_text_env_cwd_and_stderr_to_stdout(tmp_path: Path) -> None:
    (tmp_path / "here.txt").write_text("x")
    result = tapbox.run(["sh", "-c", "cat; echo \"$FOO $TAPBOX\"; ls; echo e >&2"],
                        input="typed\n", stdout=tapbox.PIPE, stderr=tapbox.STDOUT, text=True,
                        env={"FOO": "bar", "PATH": os.environ["PATH"]}, cwd=tmp_path,
                        network=False)
    assert result.stdout == "typed\nbar 1\nhere.txt\ne\n"


def test_run_passes_chosen_descriptors_only(tmp_path: Path) -> None:
    read, write = os.pipe()
    other_read, other_write = os.pipe()
    try:
        result = tapbox.run(py(f"""
            import os
            os.write({write}, b"kept\\n")
            os.write({other_write}, b"lost\\n")
        """), pass_fds=[write], capture_output=True, network=False)
        os.close(write)
        os.close(other_write)
        assert os.read(read, 100) == b"kept\n"
        assert os.read(other_read, 100) == b""  # the sandbox never had it
        assert b"Bad file descriptor" in result.stderr
    finally:
        for fd in (read, other_read):
            os.close(fd)


def test_run_records_flows_and_dns(fakenet: FakeNet) -> None:
    code = """
        import socket
        def hello(host):
            try:
                with socket.create_connection((host, 80), timeout=5) as s:
                    s.sendall(b"HELLO\\n")
                    return s.makefile().readline().strip()
            except OSError as e:
                return type(e).__name__
        print(hello("api.example.test"), hello("203.0.113.7"), hello("denied.test"))
    """
    result = tapbox.run(py(code), capture_output=True, text=True, allow=["api.example.test:80"],
                        **NET)
    assert result.stdout.split() == ["hello", "from", "192.0.2.10:80", "ConnectionRefusedError",
                                     "gaierror"], result.stderr
    allowed, denied = result.flows
    assert (allowed.verdict, allowed.dst, allowed.dport, allowed.domain) == \
        ("allowed", "192.0.2.10", 80, "api.example.test")
    assert allowed.rule == "api.example.test:80" and allowed.ending == "closed"
    assert allowed.bytes_out == len(b"HELLO\n") and allowed.process is not None
    assert (denied.verdict, denied.dst, denied.rule) == ("denied", "203.0.113.7", None)
    assert str(denied) == "tcp 203.0.113.7:80"
    names = {(q.name, q.verdict) for q in result.dns}
    assert ("api.example.test", "allowed") in names and ("denied.test", "denied") in names
    assert [str(d) for d in result.denied][:1] == ["tcp 203.0.113.7:80"]
    assert {e["event"] for e in result.events} >= {"start", "flow_start", "flow_end", "exit"}
    assert len(fakenet.connections("203.0.113.7")) == 0


def test_run_log_file_is_the_callers_and_holds_the_same_records(tmp_path: Path,
                                                                 fakenet: FakeNet) -> None:
    log = tmp_path / "run.jsonl"
    result = tapbox.run(py("import socket; socket.socket().connect_ex(('203.0.113.7', 80))"),
                        log=log, **NET)
    assert result.log == str(log)
    assert tapbox.read_log(log).flows == result.flows
    assert [f.dst for f in result.flows] == ["203.0.113.7"]


def test_check_names_denied_destinations(fakenet: FakeNet) -> None:
    with pytest.raises(tapbox.DeniedError) as caught:
        tapbox.run(py("import socket; socket.socket().connect_ex(('203.0.113.7', 443))"),
                   check=True, allow=["192.0.2.10"], **NET)
    assert "tapbox denied: tcp 203.0.113.7:443" in str(caught.value)
    assert isinstance(caught.value, tapbox.TapboxError)
    assert [f.dst for f in caught.value.denied] == ["203.0.113.7"]
    assert caught.value.result is not None and caught.value.result.returncode == 0


def test_check_raises_for_a_failed_command() -> None:
    with pytest.raises(tapbox.CommandError) as caught:
        tapbox.run(["sh", "-c", "echo no >&2; exit 4"], check=True, capture_output=True,
                   network=False)
    assert isinstance(caught.value, subprocess.CalledProcessError)  # as subprocess.run's
    assert (caught.value.returncode, caught.value.stderr) == (4, b"no\n")
    assert "exited with status 4" in str(caught.value)


def test_timeout_kills_the_whole_sandbox(tmp_path: Path) -> None:
    marker = tmp_path / "late"
    started = time.monotonic()
    with pytest.raises(tapbox.TimeoutExpired) as caught:
        tapbox.run(["sh", "-c", f"(sleep 2; touch {marker}) & echo started; sleep 60"],
                   timeout=0.5, capture_output=True, network=False)
    assert time.monotonic() - started < 10
    assert isinstance(caught.value, subprocess.TimeoutExpired)
    assert caught.value.stdout == b"started\n" and caught.value.timeout == 0.5
    time.sleep(2.5)
    assert not marker.exists()  # the background job died with the sandbox


def test_bad_options_are_usage_errors_before_anything_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    cmd = ["touch", str(marker)]
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"mtu": 70000}, tapbox.UsageError, "mtu= 70000: must be between 576 and 65520"),
        ({"allow": ["api.example.test:99999"]}, tapbox.AllowlistError,
         "allow= 'api.example.test:99999': invalid port"),
        ({"frobnicate": True}, tapbox.UsageError, "unexpected keyword argument 'frobnicate'"),
        ({"network": False, "log": str(tmp_path / "x")}, tapbox.UsageError,
         "log= needs the network"),
        ({"ipv6": "sometimes"}, tapbox.UsageError, "ipv6=: expected one of"),
        ({"write": [""]}, tapbox.UsageError, "write=: empty path"),
        ({"hide": [3]}, tapbox.UsageError, "hide=: expected paths, got int"),
        ({"fs": "everything"}, tapbox.UsageError, "fs=: expected one of 'project', 'host'"),
        ({"fs": "overlay"}, tapbox.UsageError, "not available from the Python API yet"),
        ({"setenv": {"A": 1}}, tapbox.UsageError, "setenv=: expected strings"),
        ({"setenv": ["NOEQUALS"]}, tapbox.UsageError, "setenv= 'NOEQUALS': expected VAR=VALUE"),
        ({"unsetenv": "A=B"}, tapbox.UsageError, "unsetenv= 'A=B': a variable name cannot"),
        ({"write": [str(tmp_path / "missing")]}, tapbox.SetupError, "give a path that exists"),
        ({"allowlists": [str(tmp_path / "missing.txt")]}, tapbox.AllowlistError, "missing.txt"),
        ({"profile": str(tmp_path / "missing.toml")}, tapbox.ProfileError, "missing.toml"),
        ({"cwd": str(tmp_path / "nowhere")}, tapbox.UsageError, "not a directory"),
        ({"stdout": "somewhere"}, tapbox.UsageError, "stdout=: expected"),
    ]
    for keywords, error, text in cases:
        with pytest.raises(error) as caught:
            tapbox.run(cmd, **keywords)
        assert text in str(caught.value), keywords
    assert not marker.exists()


def test_options_object_and_profile_layer_under_keywords(tmp_path: Path) -> None:
    profile = tmp_path / "p.toml"
    profile.write_text('[network]\nallow = ["192.0.2.10:80"]\nmtu = 1500\n')
    options = tapbox.RunOptions().validate()
    result = tapbox.run(["sh", "-c", "cat /sys/class/net/tap0/mtu"], options=options,
                        profile=profile, capture_output=True, allow=["192.0.2.20"], **NET)
    assert result.stdout == b"1500\n"
    start = next(e for e in result.events if e["event"] == "start")
    assert start["rules"] == 2


def test_setup_failure_is_a_setup_error(tmp_path: Path) -> None:
    with pytest.raises(tapbox.SetupError, match="working directory"):
        victim = tmp_path / "gone"
        victim.mkdir()

        def remove() -> None:
            victim.rmdir()
        # the directory exists when checked, and is gone when the sandbox enters it
        tapbox.run(["true"], cwd=victim, network=False, env=_RemoveOnCopy(remove))


class _RemoveOnCopy(dict[str, str]):
    """An env mapping whose first read (when the run is prepared) removes a directory."""

    def __init__(self, action: Any) -> None:
        super().__init__(PATH=os.environ["PATH"])
        self.action = action

    def items(self) -> Any:
        self.action()
        return super().items()


# ------------------------------------------------------------------------------------------------
# What the sandbox sees: main's filesystem view and environment, from the API's keywords

WRITE_PROBE = """
import errno, os, sys
for directory in sys.argv[1:]:
    try:
        with open(os.path.join(directory, "new"), "w") as f:
            f.write("x")
        print("written")
    except OSError as e:
        print(errno.errorcode[e.errno])
"""


@pytest.fixture
def outside() -> Iterator[Path]:
    """A directory outside the working directory that the project view shows (read-only):
    pytest's tmp_path is under /tmp, which the view replaces with the sandbox's own."""
    path = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="tapbox-api-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_run_writes_in_its_working_directory_only_unless_write(tmp_path: Path,
                                                               outside: Path) -> None:
    work, sibling = tmp_path / "work", tmp_path / "sibling"
    work.mkdir()
    sibling.mkdir()

    def attempt(**options: Any) -> list[str]:
        result = tapbox.run([PY, "-c", WRITE_PROBE, ".", str(outside), str(sibling)], cwd=work,
                            capture_output=True, text=True, network=False, **options)
        assert result.returncode == 0, result.stderr
        written = [(d / "new").exists() for d in (work, outside, sibling)]
        for d in (work, outside, sibling):
            (d / "new").unlink(missing_ok=True)
        assert written == [line == "written" for line in result.stdout.split()]
        return result.stdout.split()

    # the default (fs="project"): cwd= is the writable directory; the host is read-only, and
    # the host's /tmp is not the sandbox's
    assert attempt() == ["written", "EROFS", "ENOENT"]
    assert attempt(write=[outside, str(sibling)]) == ["written"] * 3
    assert attempt(write="../sibling") == ["written", "EROFS", "written"]  # from cwd=
    assert attempt(fs="host") == ["written"] * 3


def test_call_writes_in_its_working_directory_only_unless_write(tmp_path: Path,
                                                                outside: Path) -> None:
    def write(path: str) -> str:
        Path(path).write_text("from inside")
        return "written"

    with pytest.raises(OSError) as caught:
        tapbox.call(write, str(outside / "f"), network=False)
    assert caught.value.errno == errno.EROFS and not (outside / "f").exists()
    assert tapbox.call(write, str(outside / "f"), network=False, write=[outside]) == "written"
    assert (outside / "f").read_text() == "from inside"
    assert tapbox.call(write, str(tmp_path / "g"), network=False, cwd=tmp_path) == "written"
    assert (tmp_path / "g").read_text() == "from inside"


def test_read_hide_tmpfs_and_the_copy_on_write_home(tmp_path: Path,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    work, home = tmp_path / "work", tmp_path / "home"
    for d in (work / "docs", work / "cache", home):
        d.mkdir(parents=True)
    (work / "token").write_text("SECRET")
    (work / "cache" / "old").write_text("old")
    (home / ".bashrc").write_text("# the original\n")
    script = """
import errno, os
def attempt(what, *args):
    try:
        return repr(what(*args))
    except OSError as e:
        return errno.errorcode[e.errno]
print(attempt(lambda: open("token").read()))
print(attempt(lambda: open("docs/new", "w")))
print(attempt(os.listdir, "cache"))
open("cache/made", "w").close()
with open(os.path.expanduser("~/.bashrc"), "a") as f:
    f.write("echo pwned\\n")
print(attempt(lambda: open(os.path.expanduser("~/.bashrc")).read().count("pwned")))
"""
    result = tapbox.run([PY, "-c", script], cwd=work, capture_output=True, text=True,
                        env={"PATH": os.environ["PATH"], "HOME": str(home)}, network=False,
                        hide="token", read=[work / "docs"], tmpfs=["cache"])
    assert result.returncode == 0, result.stderr
    token, docs, cache, pwned = result.stdout.split()
    assert "SECRET" not in token and docs == "EROFS" and cache == "[]" and pwned == "1"
    assert (work / "token").read_text() == "SECRET"  # hidden inside, untouched outside
    assert os.listdir(work / "cache") == ["old"]  # the tmpfs was the sandbox's
    assert (home / ".bashrc").read_text() == "# the original\n"  # the home's writes discarded
    # said on the caller's stderr, as tapbox's other notices (report="quiet" keeps this one)
    assert "tapbox: 1 file written to ~/.bashrc was discarded" in capfd.readouterr().err


def test_environment_options(tmp_path: Path) -> None:
    base = {"PATH": os.environ["PATH"], "KEEP": "k", "DROP": "d", "SSH_AUTH_SOCK": "/agent",
            "LANG": "C.UTF-8"}
    show = ["sh", "-c", 'echo "${A-}|${KEEP-unset}|${DROP-unset}|${SSH_AUTH_SOCK-unset}|'
                        '${LANG-unset}|$TAPBOX"']

    def env(**options: Any) -> str:
        result = tapbox.run(show, env=base, capture_output=True, text=True, network=False,
                            **options)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    assert env() == "|k|d|unset|C.UTF-8|1"  # the project view drops the agent's socket
    assert env(fs="host") == "|k|d|/agent|C.UTF-8|1"
    assert env(setenv={"A": "a b"}, unsetenv=["DROP"]) == "a b|k|unset|unset|C.UTF-8|1"
    assert env(setenv=["A=x=y"], clearenv=True) == "x=y|unset|unset|unset|C.UTF-8|1"


# ------------------------------------------------------------------------------------------------
# Confinement and limits: main's process and limits options, from the API's keywords


def test_limits_and_nesting_options() -> None:
    result = tapbox.run(["sh", "-c", "ulimit -n; ulimit -d"], max_files=64, memory=256 << 20,
                        capture_output=True, text=True, network=False)
    assert result.stdout.split() == ["64", str(256 << 10)], result.stderr  # ulimit -d: KiB
    with pytest.raises(tapbox.SetupError, match="--max-procs cannot be enforced"):
        tapbox.run(["true"], max_procs=10, network=False)  # (this suite runs as root)
    assert tapbox.run(["unshare", "-U", "true"], network=False).returncode == 0
    assert tapbox.run(["unshare", "-U", "true"], nest=False, network=False,
                      stderr=tapbox.DEVNULL).returncode != 0
    with pytest.raises(tapbox.UsageError, match="max_files= 0: must be positive"):
        tapbox.run(["true"], max_files=0, network=False)


def test_strict_system_calls_are_named_in_the_records(fakenet: FakeNet) -> None:
    script = "import sys; print(6 * 7); sys.stdout.flush(); import socket; socket.socket()"
    result = tapbox.run([PY, "-S", "-c", script], syscalls="strict",
                        syscall_allow=["@files_read"], capture_output=True, text=True,
                        allow=["192.0.2.10"], **NET)
    assert result.stdout == "42\n" and result.returncode == 128 + signal.SIGKILL
    [event] = [e for e in result.events if e["event"] == "syscall"]
    assert (event["syscall"], event["action"], event["policy"]) == ("socket", "killed", "strict")


def test_call_under_strict_computes_and_dies_at_its_first_socket() -> None:
    """The strict policy is for computing on untrusted data: the function goes on under it
    (no exec to let through) and is killed, named, when it reaches further."""
    assert tapbox.call(sum, range(10), syscalls="strict", network=False) == 45

    def reach_out() -> None:
        socket.socket()

    with pytest.raises(tapbox.CrashedError, match="killed by signal 9") as caught:
        tapbox.call(reach_out, syscalls="strict", network=False, report="quiet")
    program = Path("/proc/self/comm").read_text().strip()  # (its name, not tapbox-init's)
    assert f"tapbox refused: system call socket by pid 2 ({program})" in \
        "".join(caught.value.__notes__)

    def refuse(data: bytes) -> None:
        raise ValueError(f"bad input {data!r}")

    with pytest.raises(ValueError, match="bad input b'x'") as raised:  # formatting reads no file
        tapbox.call(refuse, b"x", syscalls="strict", network=False)
    assert "in refuse" in str(raised.value.__cause__)
    proc = run_script("""
        import os, tapbox
        tapbox.enter(syscalls="strict", network=False, report="quiet")
        os.write(1, b"computed %d\\n" % sum(range(10)))
        os.open("/etc/hostname", os.O_RDONLY)
        os.write(1, b"not reached\\n")
    """)
    assert proc.stdout == "computed 45\n" and proc.returncode == 128 + signal.SIGKILL


def test_enter_timeout_is_the_whole_sandboxs_time_limit() -> None:
    proc = run_script("""
        import time, tapbox
        tapbox.enter(timeout=1, network=False)
        print("inside", flush=True)
        time.sleep(60)
        print("not reached")
    """)
    assert proc.returncode == 124 and proc.stdout == "inside\n", proc.stderr


def test_run_leaves_the_caller_as_it_was(fakenet: FakeNet) -> None:
    """No signal blocked, no limit raised, no thread or descriptor left behind."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    handler = signal.getsignal(signal.SIGINT)
    def threads_of_ours() -> list[str]:  # (trio's idle worker threads linger a while: its own)
        return sorted(t.name for t in threading.enumerate() if not t.name.startswith("Trio "))

    threads = threads_of_ours()
    fds = len(os.listdir("/proc/self/fd"))
    tapbox.run(["sh", "-c", "kill -INT $$; exit 0"], allow=["192.0.2.10"], **NET)
    tapbox.run(["true"], network=False)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == limits
    assert signal.getsignal(signal.SIGINT) is handler
    deadline = time.monotonic() + 5
    while threads_of_ours() != threads and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threads_of_ours() == threads
    assert len(os.listdir("/proc/self/fd")) == fds


def test_runs_from_several_threads_at_once(fakenet: FakeNet) -> None:
    results: dict[int, Any] = {}

    def one(i: int) -> None:
        results[i] = tapbox.run(py(f"""
            import socket
            with socket.create_connection(("192.0.2.10", 80), timeout=5) as s:
                s.sendall(b"HELLO\\n"); print({i}, s.makefile().readline().strip())
        """), capture_output=True, text=True, allow=["192.0.2.10:80"], **NET)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for i in range(4):
        assert results[i].stdout == f"{i} hello from 192.0.2.10:80\n", results[i].stderr
        assert [f.verdict for f in results[i].flows] == ["allowed"]


# ------------------------------------------------------------------------------------------------
# tapbox.call


def double(x: int) -> tuple[int, int, str | None]:
    return x * 2, os.getppid(), os.environ.get("TAPBOX")


def test_call_returns_the_value_from_inside() -> None:
    value, parent, marker = tapbox.call(double, 21, network=False)
    assert (value, parent, marker) == (42, 1, "1")  # a child of pid 1 of its PID namespace


def test_call_raises_the_exception_with_its_traceback() -> None:
    def parse(data: bytes) -> None:
        raise ValueError(f"bad input {data!r}\x1b[2J")

    with pytest.raises(ValueError, match="bad input b'xyz'") as caught:
        tapbox.call(parse, b"xyz", network=False)
    cause = caught.value.__cause__
    assert isinstance(cause, tapbox.RemoteTraceback)
    assert "in parse" in cause.text and "ValueError" in cause.text
    assert "\x1b" not in cause.text and "\\x1b[2J" in cause.text  # escaped for a terminal


def test_call_crash_kill_and_exit_are_clear_errors() -> None:
    with pytest.raises(tapbox.CrashedError, match="killed by signal 9 .SIGKILL.") as killed:
        tapbox.call(lambda: os.kill(os.getpid(), signal.SIGKILL), network=False)
    assert killed.value.returncode == 137
    with pytest.raises(tapbox.CrashedError, match="exited with status 4"):
        tapbox.call(functools.partial(os._exit, 4), network=False)
    with pytest.raises(tapbox.CallError, match="raised builtins.SystemExit: 3") as exited:
        tapbox.call(sys.exit, 3, network=False)
    assert not isinstance(exited.value, SystemExit)  # the caller's program goes on


def test_call_result_that_does_not_pickle() -> None:
    with pytest.raises(tapbox.ResultError, match="_thread.lock does not pickle"):
        tapbox.call(threading.Lock, network=False)


class Point:
    def __init__(self, x: int) -> None:
        self.x = x


def test_call_admits_only_plain_data_unless_told() -> None:
    with pytest.raises(tapbox.ResultError, match="test_api.Point, which is not admitted"):
        tapbox.call(Point, 3, network=False)
    assert tapbox.call(Point, 3, network=False, result_types=[Point]).x == 3
    assert tapbox.call(lambda: {"a": [1, 2.5, None, b"x", {3}, (True,)]}, network=False) == \
        {"a": [1, 2.5, None, b"x", {3}, (True,)]}


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


def test_call_does_not_unpickle_hostile_bytes(tmp_path: Path) -> None:
    """Whatever runs in the sandbox may write the outcome itself: a pickle that would run a
    command in the caller is refused, and the command never runs."""
    marker = tmp_path / "pwned"

    def hostile() -> None:
        data = pickle.dumps(("value", _Payload(str(marker))))
        for name in os.listdir("/proc/self/fd"):  # find the result pipe
            fd = int(name)
            if fd > 2 and os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:"):
                os.write(fd, data)
        os._exit(0)

    with pytest.raises(tapbox.ResultError, match="posix.system, which is not admitted"):
        tapbox.call(hostile, network=False)
    assert not marker.exists()


def test_call_result_size_is_bounded() -> None:
    assert tapbox.call(bytes, 3_000_000, network=False) == bytes(3_000_000)  # > a pipe's buffer
    with pytest.raises(tapbox.ResultError, match="larger than max_result"):
        tapbox.call(bytes, 1_000_000, network=False, max_result=100_000)


def test_call_descriptors_open_outside_are_gone_inside(fakenet: FakeNet) -> None:
    """A socket the caller holds (here: connected to a server outside) is /dev/null inside;
    a pipe passed on purpose is kept."""
    outside = socket.create_connection(("192.0.2.10", 80), timeout=5)
    read, write = os.pipe()
    try:
        def inside() -> tuple[str, int]:
            os.write(write, b"through")
            return os.readlink(f"/proc/self/fd/{outside.fileno()}"), outside.send(b"HELLO\n")

        with pytest.raises(OSError):  # send() on /dev/null: not a socket
            tapbox.call(inside, network=False, pass_fds=[write])
        assert os.read(read, 100) == b"through"

        assert tapbox.call(lambda: os.readlink(f"/proc/self/fd/{outside.fileno()}"),
                           network=False) == "/dev/null"
    finally:
        outside.close()
        os.close(read)
        os.close(write)


def test_call_network_policy_and_denied_note(fakenet: FakeNet) -> None:
    assert tapbox.call(connect, "192.0.2.10", 80, allow=["192.0.2.10:80"], **NET) == \
        "hello from 192.0.2.10:80"

    def must_connect() -> str:
        with socket.create_connection(("203.0.113.7", 80), timeout=5):
            return "connected"

    with pytest.raises(ConnectionRefusedError) as caught:
        tapbox.call(must_connect, allow=["192.0.2.10:80"], **NET)
    assert "tapbox denied: tcp 203.0.113.7:80" in caught.value.__notes__
    with pytest.raises(tapbox.DeniedError, match="tcp 203.0.113.7:80"):
        tapbox.call(connect, "203.0.113.7", 80, check=True, allow=["192.0.2.10:80"], **NET)
    assert not fakenet.connections("203.0.113.7")


def test_call_timeout() -> None:
    with pytest.raises(tapbox.TimeoutExpired, match="timed out after 0.3 s"):
        tapbox.call(time.sleep, 30, timeout=0.3, network=False)


def test_a_sandbox_inside_a_sandbox(fakenet: FakeNet) -> None:
    """Nesting works (the outer sandbox's files bound in stay linked while it runs): an API run
    with its own network and its own, narrower, allowlist inside a call()."""
    def inner() -> tuple[str, str]:
        result = tapbox.run([PY, "-c", "import sys; sys.path[:0] = sys.argv[1:]; "
                             "from test_api import connect; "
                             "print(connect('192.0.2.10', 80), connect('192.0.2.20', 80))",
                             str(Path(__file__).parent)],
                            allow=["192.0.2.10:80"], capture_output=True, text=True, **NET)
        return result.stdout.strip(), ", ".join(str(d) for d in result.denied)

    outer = {"allow": ["192.0.2.10:80", "192.0.2.20:80"], **NET}
    with pytest.raises(tapbox.SetupError, match="/dev/net/tun is missing here"):
        tapbox.call(inner, **outer)  # the outer sandbox must be given the TAP device
    seen, denied = tapbox.call(inner, write="/dev/net/tun", **outer)
    assert seen == "hello from 192.0.2.10:80 ConnectionRefusedError"
    assert denied == "tcp 192.0.2.20:80"
    assert tapbox.call(lambda: tapbox.run(["true"], network=False).returncode,
                       network=False) == 0


# ------------------------------------------------------------------------------------------------
# async


def test_run_async_in_asyncio_keeps_the_loop_running(fakenet: FakeNet) -> None:
    async def main() -> tuple[Any, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        result = await tapbox.run_async(["sh", "-c", "sleep 0.5; echo done"],
                                        capture_output=True, allow=["192.0.2.10"], **NET)
        task.cancel()
        return result, ticks

    result, ticks = asyncio.run(main())
    assert result.stdout == b"done\n"
    assert ticks > 10


def test_async_in_trio_and_cancellation_kills_the_sandbox(tmp_path: Path) -> None:
    marker = tmp_path / "late"

    async def main() -> Any:
        value = await tapbox.call_async(double, 4, network=False)
        with trio.move_on_after(0.5):
            await tapbox.run_async(["sh", "-c", f"sleep 2; touch {marker}"], network=False)
        return value

    assert trio.run(main)[0] == 8
    time.sleep(2.5)
    assert not marker.exists()


def test_async_without_a_loop_is_a_usage_error() -> None:
    coroutine = tapbox.run_async(["true"], network=False)
    with pytest.raises(tapbox.UsageError, match="asyncio or trio"):
        coroutine.send(None)
    coroutine.close()


# ------------------------------------------------------------------------------------------------
# tapbox.enter (in fresh interpreters: the pytest process has threads of its own)


def run_script(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, env=tapbox_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_enter_continues_inside_and_exits_with_its_status(fakenet: FakeNet) -> None:
    proc = run_script(f"""
        import os, socket, sys, tapbox
        before = os.getpid()
        print("before", flush=True)
        tapbox.enter(allow=["192.0.2.10:80"], dns_upstream="{DNS_UPSTREAM}")
        def hello(addr):
            try:
                with socket.create_connection((addr, 80), timeout=5) as s:
                    s.sendall(b"HELLO\\n"); return s.makefile().readline().strip()
            except OSError as e:
                return type(e).__name__
        print(os.getpid() != before, os.getppid(), os.environ["TAPBOX"], hello("192.0.2.10"),
              hello("203.0.113.7"))
        sys.exit(3)
    """)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "before\nTrue 1 1 hello from 192.0.2.10:80 ConnectionRefusedError\n"
    assert "denied tcp 203.0.113.7:80" in proc.stderr  # the supervisor's report
    assert not fakenet.connections("203.0.113.7")


def test_enter_signal_reaches_the_program_and_status_is_128_plus_n() -> None:
    proc = subprocess.Popen([PY, "-c", textwrap.dedent("""
        import time, tapbox
        tapbox.enter(network=False)
        print("inside", flush=True)
        time.sleep(60)
    """)], cwd=REPO_ROOT, env=tapbox_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "inside\n"
        proc.send_signal(signal.SIGTERM)  # to the supervisor: passed on to the program
        assert proc.wait(30) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()


def test_enter_refuses_threads_and_running_loops() -> None:
    proc = run_script("""
        import asyncio, threading, tapbox
        stop = threading.Event()
        thread = threading.Thread(target=stop.wait); thread.start()
        try:
            tapbox.enter(network=False)
        except tapbox.UsageError as e:
            print(e)
        stop.set(); thread.join()
        async def main():
            try:
                tapbox.enter(network=False)
            except tapbox.UsageError as e:
                print(e)
        asyncio.run(main())
        print("not entered")
    """)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "1 other thread(s) running" in lines[0]
    assert "inside a running event loop" in lines[1]
    assert lines[2] == "not entered"


def test_enter_bad_option_raises_in_the_program() -> None:
    proc = run_script("""
        import tapbox
        try:
            tapbox.enter(mtu=1)
        except tapbox.UsageError as e:
            print("refused:", e)
    """)
    assert proc.stdout == "refused: mtu= 1: must be between 576 and 65520\n", proc.stderr


def test_fake_http_serves_through_the_sandbox(fake_http: str) -> None:
    result = tapbox.run(py(f"import urllib.request; print(urllib.request.urlopen("
                           f"{fake_http!r}, timeout=5).read().decode(), end='')"),
                        capture_output=True, allow=["api.example.test:8000"], **NET)
    assert result.stdout == HTTP_BODY, result.stderr


def test_inside_reads_the_sandboxs_own_records(fakenet: FakeNet) -> None:
    assert tapbox.inside() is None  # not in a sandbox the API made

    def look() -> list[str]:
        connect("203.0.113.7", 80)
        here = tapbox.inside()
        assert here is not None
        with pytest.raises(OSError):  # read-only inside, as every record file
            open(here.log, "a").close()
        deadline = time.monotonic() + 5
        while not (flows := here.records().flows) and time.monotonic() < deadline:
            time.sleep(0.02)
        return [str(f) for f in flows]

    assert tapbox.call(look, allow=["192.0.2.10"], **NET) == ["tcp 203.0.113.7:80"]
    result = tapbox.run(["sh", "-c", 'echo "$TAPBOX_LOG"'], capture_output=True, text=True,
                        allow=["192.0.2.10"], **NET)
    assert result.stdout.strip().endswith("events.jsonl")
    assert not os.path.exists(result.stdout.strip())  # the temporary log is gone


def test_enter_returns_the_sandboxs_log_and_the_supervisor_removes_it(fakenet: FakeNet) -> None:
    proc = run_script(f"""
        import os, socket, tapbox
        here = tapbox.enter(allow=["192.0.2.10:80"], dns_upstream="{DNS_UPSTREAM}", report="quiet")
        socket.socket().connect_ex(("203.0.113.7", 80))
        import time
        deadline = time.monotonic() + 5
        while not here.records().denied and time.monotonic() < deadline:
            time.sleep(0.02)
        print(here.log)
        print(*[str(d) for d in here.records().denied])
    """)
    assert proc.returncode == 0, proc.stderr
    log, denied = proc.stdout.splitlines()
    assert denied == "tcp 203.0.113.7:80"
    assert not os.path.exists(log)


def test_enter_in_a_forked_test_process(fakenet: FakeNet) -> None:
    """os.fork() of this (threaded) pytest process: the child has one thread, may enter, and
    becomes the supervisor; what returned from enter() runs inside and its status comes out."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the forked child
        status = 99
        try:
            os.close(read)
            tapbox.enter(allow=["192.0.2.10:80"], pass_fds=[write], **NET)
            os.write(write, f"{os.getppid()} {connect('192.0.2.10', 80)} "
                            f"{connect('203.0.113.7', 80)}".encode())
            status = 7
        finally:
            os._exit(status)
    os.close(write)
    try:
        deadline = time.monotonic() + 60
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert done[0] == pid, "the forked child did not finish"
        assert os.waitstatus_to_exitcode(done[1]) == 7
        assert os.read(read, 1000).decode() == \
            "1 hello from 192.0.2.10:80 ConnectionRefusedError"
    finally:
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(read)
    assert not fakenet.connections("203.0.113.7")


def test_call_can_use_trio_threads_after_a_run(fakenet: FakeNet) -> None:
    """The engine leaves idle trio worker threads in this process; the function's copy of
    the process has none, and must not wait for them (trio < 0.29 would, python-trio#2764)."""
    tapbox.run(py("import socket; socket.getaddrinfo('api.example.test', 80)"),
               allow=["api.example.test:80"], **NET)  # the engine attributes: trio threads

    def threaded() -> int:
        async def main() -> int:
            return await trio.to_thread.run_sync(lambda: 6 * 7)
        return trio.run(main)

    assert tapbox.call(threaded, network=False, timeout=30) == 42
