"""The parent's side of a sandbox: fork, get pid 1 and the TAP fd, let it start, wait for it.

How this works: `Sandbox.spawn()` writes the private files the sandbox binds in (its resolv.conf,
an empty file to hide files with), builds the filesystem plan (tapbox.isolate.plan) and the
command's environment (tapbox.isolate.environment), and forks once, before trio or any thread
starts. The child
(tapbox.isolate.child) enters the namespaces and creates pid 1 of the sandbox as tapbox's own
child (clone with CLONE_PARENT); it sends pid 1's pid (b"P") and exits, and spawn() reaps it and
from then on the sandbox *is* pid 1. Pid 1 sets itself up and answers on the SOCK_SEQPACKET
socketpair: b"R" with the TAP fd and the home layer's (SCM_RIGHTS), or b"E" and one line, raised
here as SetupError.
It then waits for `start()` (b"G") to start the command; closing the socket instead makes it exit
125 without running anything. Pid 1 is tracked through a pidfd (no pid reuse) and waited for
either blocking (`wait_status()`) or from trio (`await wait()`, the pidfd becomes readable at
exit); its exit status is the command's (tapbox.isolate.reaper), and by the time it can be
reaped every other process of the sandbox is gone.

Suggested use (cli)::

    fwd = SignalForwarder()              # main thread, before any thread and before spawn()
    sb = Sandbox.spawn(config)           # raises SetupError -> exit 125
    fwd.start(sb.pid)
    sb.start()                           # the command runs; its frames queue in tap0
    ... trio.run(engine, sb)             # engine reads sb.tap_fd and `await sb.wait()` for
                                         # the exit code
    fwd.stop()
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from tapbox.errors import SetupError
from tapbox.isolate import plan as plan_mod
from tapbox.isolate.child import (
    MSG_ERROR,
    MSG_GO,
    MSG_PID,
    MSG_READY,
    PID_FORMAT,
    READY_LAYER,
    READY_LISTENER,
    READY_TAP,
    child_main,
)
from tapbox.isolate.config import SandboxConfig
from tapbox.isolate.environment import command_environment
from tapbox.isolate.syscalls import DEFAULT_POLICY, GUARD_POLICY, Policy

if TYPE_CHECKING:
    from tapbox.isolate.supervisor import Supervisor, Violation

# How long spawn() waits for the child to report set-up done.
SETUP_TIMEOUT = 60.0


class Sandbox:
    """A fully set-up sandbox (pid 1 of its namespaces) waiting for `start()` to run its command.

    `pid` is pid 1's pid as tapbox sees it (during spawn(), first the set-up child's).
    """

    pid: int
    tap_fd: int | None
    plan: plan_mod.Plan | None = None  # the filesystem set-up pid 1 executed
    # A descriptor of the home directory's throwaway layer (the project view), for counting
    # what the sandbox wrote there (tapbox.isolate.discarded); closed by close().
    layer_fd: int | None = None
    # The seccomp listener of the filter pid 1 loaded (tapbox.isolate.supervisor names what it
    # refuses), or None, and then `unnamed_because` may say why.
    listener: int | None = None
    unnamed_because: str = ""
    landlock: str = ""  # with --landlock: what it enforces (or why nothing), for -v

    def __init__(self, pid: int, sock: socket.socket, pidfd: int | None) -> None:
        self.pid = pid
        self._setup_pid: int | None = pid  # the child tapbox forked, until pid 1 is known
        self.tap_fd = None
        self._sock: socket.socket | None = sock
        self._pidfd = pidfd
        self._status: int | None = None
        self._wait_lock = threading.Lock()
        self._trio_waiting = False
        self._command_policy: Policy | None = None  # an allow list whose violations are named
        self._late: socket.socket | None = None  # the socket, kept for its listener
        self.started_at: float | None = None  # time.monotonic() when start() let it exec
        self._private: list[str] = []  # files bound in (resolv.conf...), removed by close()
        self.supervisor: Supervisor | None = None

    def _supervise(self, policy: Policy,
                   on_violation: Callable[[Violation], None] | None) -> None:
        """Start the supervisor thread if anything is to be named (pid 1's filter, or later the
        command's)."""
        if self.listener is None and self._command_policy is None:
            return
        from tapbox.isolate.supervisor import Supervisor

        self.supervisor = Supervisor(on_violation).start()
        if self.listener is not None:
            listener, self.listener = self.listener, None
            self.supervisor.add(listener, GUARD_POLICY if policy.is_allow_list else policy)

    @property
    def violations(self) -> list[Violation]:
        """The refused system calls named so far (at most supervisor.MAX_KEPT)."""
        return self.supervisor.violations if self.supervisor is not None else []

    @classmethod
    def spawn(cls, config: SandboxConfig,
              meanwhile: Callable[[], object] | None = None,
              on_violation: Callable[[Violation], None] | None = None) -> Sandbox:
        """Fork the child and return once it is set up (TAP fd received) and waiting for start().

        Call it before trio.run() or any thread starts, from the main thread (or from a thread
        that lives as long as the sandbox: see PR_SET_PDEATHSIG in tapbox.isolate.child).
        `meanwhile` runs in the parent while the child sets up (e.g. the engine's imports: the
        two overlap on a multi-core machine). Raises SetupError naming cause and fix.
        Refused system calls are answered by the sandbox's supervisor thread, which passes
        each to `on_violation` (from that thread) and keeps them in `violations`.
        """
        if not config.argv:
            raise SetupError("tapbox: no command given: usage: tapbox [OPTIONS] -- CMD [ARGS...]")
        sandbox = cls.fork(config, meanwhile, on_violation)
        assert sandbox is not None  # only Python mode returns in the sandbox
        return sandbox

    @classmethod
    def fork(cls, config: SandboxConfig, meanwhile: Callable[[], object] | None = None,
             on_violation: Callable[[Violation], None] | None = None) -> Sandbox | None:
        """spawn(), and with `config.argv` None (Python mode) it returns twice, as os.fork():
        here with the Sandbox, and None in pid 2 of the sandbox once start() lets it go on."""
        uid, gid = os.getuid(), os.getgid()
        private: list[str] = []  # the files the child binds in: removed once it has
        parent_pid = os.getpid()
        try:
            resolv_path = None
            if config.network:
                resolv_path = _private_file(config.resolv_conf, 0o644, "resolv", private)
            empty_file = ""  # for --hide FILE in the host view
            fs = config.filesystem
            if fs.view == "host" and any(rule.action == "hide" for rule in fs.paths):
                empty_file = _private_file("", 0, "hidden", private)
            plan = plan_mod.build(config, resolv_path, empty_file, layer=config.layer)
            if config.layer is not None:
                config.layer.prepare([number for number, _mode in plan.kept], dict(plan.kept))
            env = command_environment(
                os.environ if config.env is None else config.env,
                project=config.filesystem.view != "host",
                runtime_dir=plan.runtime_dir, clearenv=config.clearenv,
                unsetenv=config.unsetenv, setenv=config.setenv)
            parent_sock, child_sock = socket.socketpair(
                socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
            )
            try:
                pid = os.fork()
            except OSError as e:
                parent_sock.close()
                child_sock.close()
                raise SetupError(f"tapbox: cannot fork the sandbox process: {e.strerror}") from e
            if pid == 0:  # pragma: no cover - the child leaves through os._exit or exec
                parent_sock.close()
                child_main(config, plan, env, child_sock, parent_pid, uid, gid)
                return None  # pid 2 in Python mode
            child_sock.close()
            # Our unreaped child: its pid cannot be reused before we wait for it.
            try:
                pidfd: int | None = os.pidfd_open(pid)
            except OSError:  # kernel < 5.3
                pidfd = None
            sandbox = cls(pid, parent_sock, pidfd)
            sandbox.plan = plan
            policy = config.syscalls or DEFAULT_POLICY
            sandbox._command_policy = policy if policy.is_allow_list and config.notify else None
            try:
                if meanwhile is not None:
                    meanwhile()
                sandbox._receive_ready(config.network)
                sandbox._supervise(policy, on_violation)
            except BaseException:
                sandbox.kill()
                sandbox.wait_status()
                sandbox.close()
                raise
            # Kept until close(): a file bind-mounted inside must stay linked, or a sandbox in
            # this one cannot mount its own resolv.conf over it (the kernel refuses to mount on
            # a deleted file: ENOENT).
            sandbox._private, private = private, []
            return sandbox
        finally:
            # The child failed: the names are no longer needed (by the parent: pid 2 in Python
            # mode leaves them).
            for path in private if os.getpid() == parent_pid else ():
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def _receive_ready(self, network: bool) -> None:
        """Wait for pid 1's pid (b"P") and its readiness: b"R", a byte of flags (the TAP fd,
        the home layer's, the seccomp listener follow, in that order, as SCM_RIGHTS) and notes
        (JSON: "unnamed", why violations are not named; "landlock", what Landlock enforces).
        Keep the descriptors in tap_fd, layer_fd and listener."""
        assert self._sock is not None
        ready: tuple[bytes, list[int]] | None = None
        while ready is None or self._setup_pid is not None:
            msg, fds = self._receive()
            if msg.startswith(MSG_PID) and len(msg) == 1 + PID_FORMAT.size and not fds:
                self._adopt(PID_FORMAT.unpack_from(msg, 1)[0])
            elif msg.startswith(MSG_READY) and len(msg) >= 2 and ready is None:
                ready = msg[1:], fds
            else:
                for fd in fds:
                    os.close(fd)
                self._fail(msg)
        self._sock.settimeout(None)
        assert ready is not None
        body, fds = ready
        flags = body[0]
        expected = [flag for flag in (READY_TAP, READY_LAYER, READY_LISTENER) if flags & flag]
        if len(fds) != len(expected) or (network and READY_TAP not in expected):
            for fd in fds:
                os.close(fd)
            raise SetupError("tapbox: internal error: the TAP fd did not arrive from the sandbox")
        for flag, fd in zip(expected, fds, strict=True):
            if flag == READY_TAP and network:
                os.set_blocking(fd, False)
                self.tap_fd = fd
            elif flag == READY_LAYER:
                self.layer_fd = fd
            elif flag == READY_LISTENER:
                self.listener = fd
            else:
                os.close(fd)
        try:
            notes = json.loads(body[1:].decode("utf-8", "replace") or "{}")
        except ValueError:
            notes = {}
        self.unnamed_because = str(notes.get("unnamed", ""))
        self.landlock = str(notes.get("landlock", ""))

    def _receive(self) -> tuple[bytes, list[int]]:
        assert self._sock is not None
        self._sock.settimeout(SETUP_TIMEOUT)
        try:
            return _recv_with_fds(self._sock)
        except TimeoutError:
            raise SetupError(
                f"tapbox: the sandbox process did not finish set-up within {SETUP_TIMEOUT:.0f} s: "
                "is the machine overloaded?"
            ) from None

    def _adopt(self, init_pid: int) -> None:
        """The set-up child reported pid 1 and exits: reap it; the sandbox is pid 1 from now."""
        assert self._setup_pid is not None
        os.waitpid(self._setup_pid, 0)
        self._setup_pid = None
        self._close_pidfd()
        self.pid = init_pid
        try:  # our unreaped child (CLONE_PARENT): its pid cannot be reused before we wait
            self._pidfd = os.pidfd_open(init_pid)
        except OSError:  # kernel < 5.3
            self._pidfd = None

    def _adopt_late(self) -> None:
        """Pid 1 failed so fast that its error came before its pid: take the pid (EOF instead
        if the set-up child itself failed), so that pid 1 is reaped, not left a zombie."""
        assert self._sock is not None
        with contextlib.suppress(OSError):
            self._sock.settimeout(5.0)
            msg, fds = _recv_with_fds(self._sock)
            for fd in fds:
                os.close(fd)
            if msg.startswith(MSG_PID) and len(msg) == 1 + PID_FORMAT.size:
                self._adopt(PID_FORMAT.unpack_from(msg, 1)[0])

    def _fail(self, msg: bytes) -> NoReturn:
        if msg.startswith(MSG_ERROR):
            if self._setup_pid is not None:
                self._adopt_late()
            raise SetupError(msg[1:].decode("utf-8", "replace").strip())
        code = self.wait_status()
        if code > 128:
            raise SetupError(
                f"tapbox: the sandbox process was killed by signal {code - 128} during set-up "
                "(out of memory? killed by someone?): try again"
            )
        raise SetupError(
            f"tapbox: the sandbox process exited during set-up (status {code}) "
            "without saying why: this is a bug in tapbox, please report it"
        )

    def start(self) -> None:
        """Let the child exec the command (idempotent). Exit codes tell how exec went."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self.started_at = time.monotonic()
        with contextlib.suppress(OSError):  # child already gone: wait_status() tells how
            sock.send(MSG_GO, socket.MSG_NOSIGNAL)
        if self._command_policy is None:
            sock.close()
            return
        self._late = sock
        threading.Thread(target=self._take_command_listener, name="tapbox-listener",
                         daemon=True).start()

    def time_left(self, timeout: float | None) -> float:
        """Seconds left of `timeout` counted from start() (inf for None; 0 if it is over)."""
        if timeout is None:
            return float("inf")
        if self.started_at is None:
            return timeout
        return max(0.0, timeout - (time.monotonic() - self.started_at))

    def _take_command_listener(self) -> None:
        fd, why = self._command_listener()
        if fd is not None and self.supervisor is not None and self._command_policy is not None:
            self.supervisor.add(fd, self._command_policy)
        elif fd is not None:
            os.close(fd)
        else:
            self.unnamed_because = why

    def _command_listener(self) -> tuple[int | None, str]:
        """After start(), with an allow-list policy (strict) that names violations: wait for
        the listener of the command's own filter (reaper.CommandSetup). Returns (fd, "") or
        (None, why there is none). Blocks until pid 1 hands it over or exits."""
        sock, self._late = self._late, None
        if sock is None:
            return None, ""
        from tapbox.isolate.reaper import MSG_LISTENER, MSG_NO_LISTENER

        try:
            msg, fds = _recv_with_fds(sock)
        except OSError as e:
            return None, str(e)
        finally:
            sock.close()
        if msg.startswith(MSG_LISTENER) and len(fds) == 1:
            return fds[0], ""
        for fd in fds:
            os.close(fd)
        if msg.startswith(MSG_NO_LISTENER):
            return None, msg[1:].decode("utf-8", "replace")
        return None, "the command did not start"

    def send_signal(self, signo: int) -> None:
        """Send a signal to the child; a no-op once it has been reaped."""
        if self._status is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, signo)
            else:
                os.kill(self.pid, signo)

    def kill(self) -> None:
        """SIGKILL the child (before or after exec)."""
        self.send_signal(signal.SIGKILL)

    def wait_status(self) -> int:
        """Block until the child exits; its exit code, or 128+N if killed by signal N."""
        with self._wait_lock:
            if self._status is None:
                _pid, status = os.waitpid(self.pid, 0)
                code = os.waitstatus_to_exitcode(status)
                self._status = 128 - code if code < 0 else code
                if not self._trio_waiting:
                    self._close_pidfd()
            return self._status

    def wait_status_within(self, timeout: float) -> bool:
        """Block until the child exits or `timeout` seconds pass; whether it exited (then
        wait_status() returns at once)."""
        if self._status is not None:
            return True
        if self._pidfd is not None:
            import select

            poller = select.poll()
            poller.register(self._pidfd, select.POLLIN)
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                if poller.poll(max(1, int(left * 1000))):
                    return True
            return False
        waiter = threading.Thread(target=self.wait_status, daemon=True)  # kernel < 5.3
        waiter.start()
        waiter.join(timeout)
        return not waiter.is_alive()

    async def wait(self) -> int:
        """trio: wait for the child to exit (cancellable) and return wait_status().

        Uses the pidfd (readable once the child has exited); on kernels without pidfds, a thread.
        Only one task may wait at a time.
        """
        import trio

        if self._status is not None:
            return self._status
        if self._pidfd is None:
            return await trio.to_thread.run_sync(self.wait_status, abandon_on_cancel=True)
        self._trio_waiting = True
        try:
            await trio.lowlevel.wait_readable(self._pidfd)
        finally:
            self._trio_waiting = False
        status = self.wait_status()
        self._close_pidfd()
        return status

    @property
    def exit_fd(self) -> int | None:
        """A descriptor that turns readable when the sandbox has exited (its pidfd), or None
        (kernel < 5.3, or already reaped)."""
        return self._pidfd

    @property
    def returncode(self) -> int | None:
        """The exit code once reaped, else None."""
        return self._status

    def close(self) -> None:
        """Close the control socket and the pidfd (not tap_fd, which belongs to the engine).

        Closing the control socket before start() makes the child exit 125 without exec.
        """
        for attr in ("_sock", "_late"):
            sock = getattr(self, attr)
            if sock is not None:
                sock.close()
                setattr(self, attr, None)
        if self.layer_fd is not None:
            os.close(self.layer_fd)
            self.layer_fd = None
        if self.listener is not None:
            os.close(self.listener)
            self.listener = None
        if self.supervisor is not None:
            self.supervisor.stop()
        private, self._private = self._private, []
        for path in private:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if not self._trio_waiting:
            self._close_pidfd()

    def _close_pidfd(self) -> None:
        fd, self._pidfd = self._pidfd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _recv_with_fds(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One message and the fds passed with it, close-on-exec from the start.

    Not socket.recv_fds(): Python 3.11's ignores its flags argument, so MSG_CMSG_CLOEXEC is lost.
    """
    size = struct.calcsize("i")
    msg, ancdata, _flags, _addr = sock.recvmsg(
        4096, socket.CMSG_SPACE(4 * size), socket.MSG_CMSG_CLOEXEC
    )
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % size
            fds.extend(struct.unpack(f"{usable // size}i", data[:usable]))
    return msg, fds


def _private_file(content: str, mode: int, name: str, made: list[str]) -> str:
    """Write a file of the sandbox's own (its resolv.conf, mode 0644; the empty file hidden
    files are replaced with, mode 0000) where the child (same kernel uid) can bind it from,
    and add its path to `made`. (Not the tempfile module: its import costs start-up time.)"""
    candidates = [os.environ.get("XDG_RUNTIME_DIR", ""), os.environ.get("TMPDIR", ""), "/tmp"]
    last: OSError | None = None
    for directory in candidates:
        if not directory or not os.access(directory, os.W_OK | os.X_OK):
            continue
        path = os.path.join(directory, f"tapbox-{name}-{os.urandom(6).hex()}")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
        except OSError as e:
            last = e
            continue
        made.append(path)
        with open(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), mode)
            f.write(content)
        return path
    reason = f": {last.strerror}" if last is not None else ""
    raise SetupError(
        f"tapbox: cannot write a temporary file in $XDG_RUNTIME_DIR or /tmp{reason}: "
        "make /tmp writable or set TMPDIR to a writable directory"
    )
