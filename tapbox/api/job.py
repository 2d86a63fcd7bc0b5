"""One run of the Python API, inside the program that asked for it.

How this works (the process picture)
------------------------------------
::

    caller's thread                 job thread (tapbox-run)              the sandbox
    ---------------                 -----------------------              -----------
    prepare(): rules, log files,    Sandbox.fork() ----------------->    pid 1 (tapbox-init)
      pipes            [raises]     serve(): trio.run(engine) <- TAP ->    pid 2: exec(argv), or
    start() ----------------------> |  (its own loop, in this thread)        the caller's Python
    wait(): feed stdin, read        |  start the command, proxy,             code (call: fn)
      stdout/stderr/result pipes,   |  record to the event log
      kill at the deadline          |  until pid 1 exits
    join <------------------------- status

The sandbox is forked by the job thread, which lives exactly as long as the sandbox (pid 1 dies
with the thread that forked it: PR_SET_PDEATHSIG). The engine runs there too, in a trio loop of
its own: a trio loop in a thread other than the main one installs no signal handlers, so the
caller keeps its signals, its event loop (asyncio, trio, none) and its threads as they are. The
other process-wide things the `tapbox` command changes are left alone as well: no signal is
blocked or forwarded (Ctrl-C reaches the sandboxed command from the terminal as it reaches the
caller; a KeyboardInterrupt in the caller kills the sandbox), and the open-files limit is not
raised (a run proxying more connections than the caller's limit allows refuses the excess).

The caller's thread does what subprocess.run does: it feeds `input`, reads what is captured,
enforces the timeout, and waits. `kill()` may be called from any thread: it signals pid 1 through
a pidfd of the job's own, so it can never reach a process that merely reuses the pid; the whole
sandbox dies with pid 1.

Python mode (tapbox.call): pid 2 returns from Sandbox.fork() in the job thread and runs `child`,
which never returns (os._exit). The caller's fork-copy there has only that thread: what other
threads held (a lock) stays held, as with any fork of a threaded program.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from typing import IO, TYPE_CHECKING, Any, NoReturn

from tapbox.errors import EXIT_TAPBOX_FAILED, UsageError
from tapbox.isolate import Sandbox
from tapbox.runner import Prepared, serve

if TYPE_CHECKING:
    from tapbox.isolate.supervisor import Violation

PIPE, DEVNULL, STDOUT = subprocess.PIPE, subprocess.DEVNULL, subprocess.STDOUT
StreamSpec = int | IO[Any] | None
_CHUNK = 1 << 16


class Streams:
    """The command's stdin, stdout and stderr as subprocess.Popen takes them (None, PIPE,
    DEVNULL, STDOUT for stderr, a file descriptor or a file object), and the pipes made for
    them; `result` is the pipe tapbox.call's function sends its outcome through."""

    def __init__(self, stdin: StreamSpec = None, stdout: StreamSpec = None,
                 stderr: StreamSpec = None, result: bool = False) -> None:
        self.child: list[int | None] = [None, None, None]
        self.parent: dict[str, int] = {}  # "stdin" (write end), "stdout", "stderr", "result"
        self._child_ends: list[int] = []  # ours to close once the sandbox has its copies
        try:
            self._set(0, "stdin", stdin, reading=False)
            self._set(1, "stdout", stdout, reading=True)
            if stderr == STDOUT:
                self.child[2] = self.child[1] if self.child[1] is not None else 1
            else:
                self._set(2, "stderr", stderr, reading=True)
            if result:
                read, write = os.pipe()
                self.parent["result"] = read
                self._child_ends.append(write)
                self.result_fd = write
        except BaseException:
            self.close()
            raise

    def _set(self, index: int, name: str, spec: StreamSpec, reading: bool) -> None:
        if spec is None:
            return
        if spec == PIPE:
            read, write = os.pipe()
            ours, theirs = (read, write) if reading else (write, read)
            self.parent[name] = ours
            self._child_ends.append(theirs)
            self.child[index] = theirs
        elif spec == DEVNULL:
            fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            self._child_ends.append(fd)
            self.child[index] = fd
        elif isinstance(spec, int) and spec >= 0:
            self.child[index] = spec
        elif hasattr(spec, "fileno"):
            self.child[index] = spec.fileno()
        else:
            raise UsageError(f"{name}=: expected None, PIPE, DEVNULL, a file descriptor or a "
                             f"file object, got {spec!r}")

    def close_child_ends(self) -> None:
        """After the fork: the sandbox holds its copies; ours would keep the pipes open."""
        ends, self._child_ends = self._child_ends, []
        for fd in ends:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        self.close_child_ends()
        fds, self.parent = list(self.parent.values()), {}
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


class Job:
    """One run: `start()` forks the sandbox and serves it in the job thread; `wait()` in the
    caller's thread; `kill()` from anywhere. `prepared` is the job's from here on (closed at
    the end)."""

    def __init__(self, prepared: Prepared, argv: list[str] | None, streams: Streams, *,
                 child: Callable[[], object] | None = None, pass_fds: Iterable[int] = (),
                 cwd: str | None = None, env: dict[str, str] | None = None) -> None:
        self.prepared = prepared
        self.streams = streams
        self.child = child
        keep = list(pass_fds)
        if child is not None:
            keep.append(streams.result_fd)
        self.config = prepared.sandbox_config(argv, stdio=tuple(streams.child),
                                              pass_fds=tuple(keep), cwd=cwd, env=env)
        self.status: int | None = None
        self.error: BaseException | None = None
        self.failure: str | None = None  # the engine's, if it died
        self.violations: list[Violation] = []  # the system calls the policy refused
        self.killed = False
        self._lock = threading.Lock()
        self._pidfd: int | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._main, name="tapbox-run", daemon=True)

    # ----- the job thread -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def _main(self) -> None:
        try:
            try:
                sandbox = Sandbox.fork(self.config, meanwhile=self.prepared.meanwhile,
                                       on_violation=self.prepared.violations)
            except BaseException as exc:  # noqa: B036 - handed to the caller's thread
                self.error = exc
                return
            if sandbox is None:
                self._in_sandbox()
            try:
                pidfd: int | None = os.pidfd_open(sandbox.pid)  # our unreaped child: no reuse
            except OSError:
                pidfd = None
            self.streams.close_child_ends()
            with self._lock:
                self._pidfd = pidfd
                killed = self.killed
            if killed:
                sandbox.kill()
            try:
                self.status = serve(self.prepared, sandbox)
                self.failure = self.prepared.recording.failure
            except BaseException as exc:  # noqa: B036 - handed to the caller's thread
                self.error = exc
            finally:
                self.violations = list(sandbox.violations)
        finally:  # never reached in the sandbox: _in_sandbox() leaves through os._exit
            self.streams.close_child_ends()
            self.prepared.close()
            self._done.set()

    def _in_sandbox(self) -> NoReturn:
        """Pid 2 in Python mode: run the child function; it must leave through os._exit."""
        try:
            forget_trio_workers()
            if self.child is not None:
                self.child()
        finally:
            os._exit(EXIT_TAPBOX_FAILED)

    # ----- any thread ---------------------------------------------------------------------------

    def kill(self) -> None:
        """Kill the sandbox (every process in it), now or as soon as it exists."""
        with self._lock:
            self.killed = True
            pidfd = self._pidfd
            if pidfd is not None:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)

    # ----- the caller's thread ------------------------------------------------------------------

    def wait(self, input: bytes | None = None, timeout: float | None = None,
             max_result: int | None = None) -> dict[str, bytes]:
        """Feed `input`, collect what the pipes carry, wait for the end. Returns the bytes read
        per pipe ("stdout", "stderr", "result"). Sets `timed_out` and kills the sandbox when
        `timeout` passes; kills it too when the result outgrows `max_result` (`too_large`).
        Whatever interrupts the wait (KeyboardInterrupt) kills the sandbox before it is
        raised."""
        self.timed_out = False
        self.too_large = False
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            collected = self._pump(input, deadline, max_result)
            while not self._done.wait(self._left(deadline)):
                self._expire()
            return collected
        except BaseException:
            self.kill()
            self._done.wait()
            raise
        finally:
            self.streams.close()
            with self._lock:
                pidfd, self._pidfd = self._pidfd, None
            if pidfd is not None:
                os.close(pidfd)

    def _left(self, deadline: float | None) -> float | None:
        if deadline is None or self.timed_out:
            return None
        return max(0.0, deadline - time.monotonic())

    def _expire(self) -> None:
        self.timed_out = True
        self.kill()

    def _pump(self, input: bytes | None, deadline: float | None,
              max_result: int | None) -> dict[str, bytes]:
        parent = self.streams.parent
        chunks: dict[str, list[bytes]] = {name: [] for name in parent if name != "stdin"}
        sizes = dict.fromkeys(chunks, 0)
        view = memoryview(input or b"")
        with selectors.DefaultSelector() as selector:
            for name, fd in parent.items():
                if name == "stdin":
                    os.set_blocking(fd, False)
                    if view:
                        selector.register(fd, selectors.EVENT_WRITE, name)
                    else:
                        self._close_parent("stdin")
                else:
                    selector.register(fd, selectors.EVENT_READ, name)
            while selector.get_map():
                ready = selector.select(self._left(deadline))
                if not ready and deadline is not None and not self.timed_out:
                    self._expire()
                for key, _events in ready:
                    name = key.data
                    if name == "stdin":
                        try:
                            view = view[os.write(key.fd, view[:_CHUNK]):]
                        except BlockingIOError:
                            continue
                        except BrokenPipeError:
                            view = view[:0]
                        if not view:
                            selector.unregister(key.fd)
                            self._close_parent("stdin")
                        continue
                    data = os.read(key.fd, _CHUNK)
                    if not data:
                        selector.unregister(key.fd)
                        continue
                    if name == "result" and max_result is not None \
                            and sizes[name] + len(data) > max_result:
                        self.too_large = True
                        self.kill()
                        selector.unregister(key.fd)
                        continue
                    chunks[name].append(data)
                    sizes[name] += len(data)
        return {name: b"".join(parts) for name, parts in chunks.items()}

    def _close_parent(self, name: str) -> None:
        fd = self.streams.parent.pop(name, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def forget_trio_workers() -> None:
    """trio before 0.29 keeps its idle worker threads on record across fork (python-trio/trio
    issue 2764): a process forked from one whose engine used trio.to_thread (a call()'s
    function; enter() in a forked process) would hand work to threads that do not exist there,
    and hang. Call it only where no other thread runs. Newer trio forgets them by itself."""
    import sys

    if "trio" not in sys.modules:
        return
    try:
        from trio._core._thread_cache import THREAD_CACHE

        THREAD_CACHE._idle_workers.clear()
    except (ImportError, AttributeError):
        pass
