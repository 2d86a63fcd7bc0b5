"""Session set-up and fixtures for the whole test suite.

Theory of operation: ``pytest_configure`` moves the pytest process into a throwaway network
namespace (tests/fakenet.py) before any test or fixture opens a socket, so nothing any test does
can send a packet beyond this machine: the namespace has only ``lo`` (with the TEST-NET
addresses of the fake internet on it) and no route out. If that is impossible the session stops
with a usage error rather than run network tests on the real network (set
``TAPBOX_TEST_NO_NETNS=1`` to run anyway; every fixture that needs the fake internet then fails).

Fixtures
--------
``fakenet``      (session) the running :class:`fakenet.FakeNet`; its records are cleared before
                 every test that uses it.
``run_tapbox``   ``run_tapbox(*args, cmd=[...], timeout=120, input=None, allow_file_text=None,
                 allow=(), user=None, env=None, dns_upstream=DNS_UPSTREAM, cwd=REPO_ROOT)``
                 runs ``python -m tapbox --dns-upstream 198.51.100.53 [-F tmp/allowed.txt]
                 [--allow R]... ARGS... -- CMD`` in ``cwd`` and returns the ``CompletedProcess``
                 (text). A run that exceeds ``timeout`` has its process group killed and the
                 test fails. The sandbox's view is tapbox's default: the working directory
                 (the repository) writable, pytest's ``tmp_path`` (under the host's /tmp) not
                 visible unless a test passes ``--write``/``--read`` for it.
``spawn_tapbox`` same arguments (no ``input``/``timeout``), returns the running ``Popen``
                 (own session, stdout/stderr piped); killed at teardown if still running.
``fake_http``    (session) an HTTP server at http://api.example.test:8000/ in the fake internet.
``run_client``   ``run_client(*client_args, allow_file_text=None, allow=(), tapbox_args=(),
                 timeout=60, user=None)`` runs tests/client.py inside tapbox and returns a
                 :class:`ClientRun` (``.proc``, ``.result`` = the parsed JSON line or None).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import fakenet as _fakenet
import pytest
from fakenet import DNS_UPSTREAM, FakeNet

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
CLIENT = TESTS_DIR / "client.py"
ALLOWLIST_NAME = "allowed.txt"


# ------------------------------------------------------------------------------------------------
# The session's network namespace


def pytest_configure(config: pytest.Config) -> None:
    state = _fakenet.enter_test_netns()
    if state.ok:
        return
    if os.environ.get("TAPBOX_TEST_NO_NETNS") == "1":
        return
    raise pytest.UsageError(
        "tapbox tests: cannot create the test network namespace "
        f"({state.error}). The tests must run in a private network namespace so that no test "
        "packet can leave this machine. Fix: run as root, or enable unprivileged user "
        "namespaces (sysctl user.max_user_namespaces > 0, kernel.unprivileged_userns_clone=1). "
        "To run only the tests that need no network anyway, set TAPBOX_TEST_NO_NETNS=1."
    )


def require_netns() -> None:
    state = _fakenet.netns_state()
    if not state.ok:
        pytest.fail(f"the test network namespace is not available: {state.error}", pytrace=False)


# ------------------------------------------------------------------------------------------------
# The fake internet


@pytest.fixture(scope="session")
def fakenet() -> Iterator[FakeNet]:
    require_netns()
    net = FakeNet().start()
    try:
        yield net
    finally:
        net.stop()


HTTP_ADDRESS = ("192.0.2.10", 8000)  # api.example.test:8000 in the fake internet
HTTP_BODY = b"hello from api.example.test\n"


@pytest.fixture(scope="session")
def fake_http(fakenet: FakeNet) -> Iterator[str]:
    """An HTTP server in the fake internet (api.example.test:8000): GET answers HTTP_BODY.
    Yields its URL. For examples that use ordinary HTTP clients (docs/api.md)."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            self.send_response(200)
            self.send_header("Content-Length", str(len(HTTP_BODY)))
            self.end_headers()
            self.wfile.write(HTTP_BODY)

        def log_message(self, *args: object) -> None:
            pass

    server = _fakenet.in_internet(
        lambda: http.server.ThreadingHTTPServer(HTTP_ADDRESS, Handler))
    thread = threading.Thread(target=server.serve_forever, name="fake-http", daemon=True)
    thread.start()
    try:
        yield f"http://api.example.test:{HTTP_ADDRESS[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def _reset_fakenet(request: pytest.FixtureRequest) -> None:
    if "fakenet" in request.fixturenames:
        request.getfixturevalue("fakenet").reset()


# ------------------------------------------------------------------------------------------------
# Running tapbox


def tapbox_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


def setpriv_prefix(user: int) -> list[str]:
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]


def build_tapbox_argv(
    tmp_path: Path,
    args: Sequence[str],
    cmd: Sequence[str],
    *,
    allow_file_text: str | None = None,
    allow: Sequence[str] = (),
    user: int | None = None,
    dns_upstream: str | None = DNS_UPSTREAM,
) -> list[str]:
    argv = [sys.executable, "-m", "tapbox"]
    if dns_upstream is not None:
        argv += ["--dns-upstream", dns_upstream]
    if allow_file_text is not None:
        if user is not None:
            raise ValueError(
                "allow_file_text= with user=: pytest's tmp_path is private to its owner; "
                "pass the rules with allow= instead"
            )
        path = tmp_path / ALLOWLIST_NAME
        path.write_text(allow_file_text)
        argv += ["-F", str(path)]
    for rule in allow:
        argv += ["--allow", rule]
    argv += list(args)
    argv += ["--", *cmd]
    if user is not None:
        argv = setpriv_prefix(user) + argv
    return argv


def kill_group(proc: subprocess.Popen[Any]) -> None:
    """Kill the process group of a process started with ``start_new_session=True``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


class RunTapbox(Protocol):
    def __call__(
        self,
        *args: str,
        cmd: Sequence[str],
        timeout: float = 120,
        input: str | None = None,
        allow_file_text: str | None = None,
        allow: Sequence[str] = (),
        user: int | None = None,
        env: Mapping[str, str] | None = None,
        dns_upstream: str | None = DNS_UPSTREAM,
        cwd: Path | str = REPO_ROOT,
    ) -> subprocess.CompletedProcess[str]: ...


class SpawnTapbox(Protocol):
    def __call__(
        self,
        *args: str,
        cmd: Sequence[str],
        allow_file_text: str | None = None,
        allow: Sequence[str] = (),
        user: int | None = None,
        env: Mapping[str, str] | None = None,
        dns_upstream: str | None = DNS_UPSTREAM,
        cwd: Path | str = REPO_ROOT,
    ) -> subprocess.Popen[str]: ...


def _start_tapbox(
    tmp_path: Path,
    args: Sequence[str],
    cmd: Sequence[str],
    *,
    stdin: int,
    allow_file_text: str | None,
    allow: Sequence[str],
    user: int | None,
    env: Mapping[str, str] | None,
    dns_upstream: str | None,
    cwd: Path | str = REPO_ROOT,
) -> subprocess.Popen[str]:
    """Start `python -m tapbox ... -- CMD` in its own session with stdout/stderr piped."""
    require_netns()
    argv = build_tapbox_argv(tmp_path, args, cmd, allow_file_text=allow_file_text, allow=allow,
                             user=user, dns_upstream=dns_upstream)
    return subprocess.Popen(argv, cwd=cwd, env=tapbox_env(env), stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.fixture
def run_tapbox(tmp_path: Path) -> RunTapbox:
    def run(
        *args: str,
        cmd: Sequence[str],
        timeout: float = 120,
        input: str | None = None,
        allow_file_text: str | None = None,
        allow: Sequence[str] = (),
        user: int | None = None,
        env: Mapping[str, str] | None = None,
        dns_upstream: str | None = DNS_UPSTREAM,
        cwd: Path | str = REPO_ROOT,
    ) -> subprocess.CompletedProcess[str]:
        proc = _start_tapbox(
            tmp_path, args, cmd,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            allow_file_text=allow_file_text, allow=allow, user=user, env=env,
            dns_upstream=dns_upstream, cwd=cwd)
        try:
            out, err = proc.communicate(input=input, timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            out, err = proc.communicate()
            pytest.fail(
                f"tapbox did not finish within {timeout} s (killed)\n"
                f"argv: {proc.args}\nstdout:\n{out}\nstderr:\n{err}",
                pytrace=False,
            )
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    return run


@pytest.fixture
def spawn_tapbox(tmp_path: Path) -> Iterator[SpawnTapbox]:
    procs: list[subprocess.Popen[str]] = []

    def spawn(
        *args: str,
        cmd: Sequence[str],
        allow_file_text: str | None = None,
        allow: Sequence[str] = (),
        user: int | None = None,
        env: Mapping[str, str] | None = None,
        dns_upstream: str | None = DNS_UPSTREAM,
        cwd: Path | str = REPO_ROOT,
    ) -> subprocess.Popen[str]:
        proc = _start_tapbox(tmp_path, args, cmd, stdin=subprocess.DEVNULL,
                             allow_file_text=allow_file_text, allow=allow, user=user, env=env,
                             dns_upstream=dns_upstream, cwd=cwd)
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        kill_group(proc)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def read_line(stream: Any, timeout: float) -> str | None:
    """One line from a pipe, or None if none arrived within ``timeout`` seconds (or EOF)."""
    deadline = time.monotonic() + timeout
    fd = stream.fileno()
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return None
        chunk = os.read(fd, 1)  # byte by byte: nothing is left in a Python-side buffer
        if not chunk:
            return None
        buf += chunk
    return buf.decode("utf-8", "replace")


# ------------------------------------------------------------------------------------------------
# Running tests/client.py inside tapbox


def client_cmd(*client_args: str) -> list[str]:
    return [sys.executable, str(CLIENT), *client_args]


def parse_client_json(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
    return None


@dataclass
class ClientRun:
    proc: subprocess.CompletedProcess[str]
    result: dict[str, Any] | None

    @property
    def returncode(self) -> int:
        return self.proc.returncode

    @property
    def stderr(self) -> str:
        return self.proc.stderr

    def get(self, key: str, default: Any = None) -> Any:
        return (self.result or {}).get(key, default)

    def describe(self) -> str:
        return (
            f"argv: {self.proc.args}\nexit status: {self.proc.returncode}\n"
            f"stdout:\n{self.proc.stdout}\nstderr:\n{self.proc.stderr}"
        )

    def expect_result(self) -> dict[str, Any]:
        """The client's JSON result; fails the test (with all output) if there is none."""
        if self.result is None:
            pytest.fail(f"the client printed no JSON result\n{self.describe()}", pytrace=False)
        return self.result


RunClient = Callable[..., ClientRun]


@pytest.fixture
def run_client(run_tapbox: RunTapbox) -> RunClient:
    def run(
        *client_args: str,
        allow_file_text: str | None = None,
        allow: Sequence[str] = (),
        tapbox_args: Sequence[str] = (),
        timeout: float = 60,
        user: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> ClientRun:
        proc = run_tapbox(
            *tapbox_args,
            cmd=client_cmd(*client_args),
            timeout=timeout,
            allow_file_text=allow_file_text,
            allow=allow,
            user=user,
            env=env,
        )
        return ClientRun(proc, parse_client_json(proc.stdout))

    return run
