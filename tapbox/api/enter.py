"""tapbox.enter: the calling program goes on inside a sandbox; the original process supervises.

How this works (the process picture)
------------------------------------
::

    before:  P (the program, pid 4000)
    after:   P (pid 4000: the supervisor)    -- serves the engine, forwards signals, and exits
             |                                  with the sandbox's status (os._exit)
             +-- pid 1 (tapbox-init, inside)
                   +-- pid 2: the program, returned from enter() inside the sandbox

enter() prepares the run (a bad option raises here, in the program), then forks the sandbox in
Python mode (tapbox.isolate.child): the copy that returns from enter() is pid 2 of the sandbox,
with the program's memory, signal handlers, signal mask and environment (plus TAPBOX=1); what it
had open close-on-exec reads as /dev/null there (tapbox.isolate.child), so nothing open outside
is usable inside: pass what it must keep with `pass_fds=`. The original process never returns:
it does what the `tapbox` command does for its command (signals it receives are passed on; the
engine in its main thread; the summary on stderr) and exits with the program's status, so a
shell or a parent process sees the program's status as before. atexit handlers and buffered
output are the program's: they run and are written inside, once (stdout and stderr are flushed
before the fork, and the supervisor leaves through os._exit).

Refused, with a UsageError, where the program could not go on whole: when other threads run
(only the calling thread would exist inside), inside a running event loop (its selector would
read /dev/null). `timeout=` is the whole sandbox's time limit (limits.timeout): then it is
killed, and the supervisor exits 124 as the `tapbox` command does.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, NoReturn

from tapbox.api.job import forget_trio_workers
from tapbox.api.options import ENTER_FIELDS, run_options
from tapbox.api.records import Inside
from tapbox.api.runlog import RunLog, command_env
from tapbox.errors import UsageError
from tapbox.isolate import Sandbox, SignalForwarder
from tapbox.runner import Prepared, prepare, raise_fd_limit, serve


def enter(*, pass_fds: Iterable[int] = (), **options: Any) -> Inside | None:
    """Go on inside a sandbox made with `options` (those of tapbox.run). Returns inside it
    (with the sandbox's event log, when it has a network: tapbox.Inside); the process that
    called it becomes the supervisor and never returns."""
    _refuse_unsafe()
    forget_trio_workers()  # no other thread runs: any on trio's record died in a fork
    run = run_options(options, what="tapbox.enter", table=ENTER_FIELDS)
    log = RunLog(run)
    try:
        prepared = prepare(["python", *sys.argv], log.options)
    except BaseException:
        log.remove()
        raise
    keep = tuple(pass_fds)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    forwarder = SignalForwarder()
    try:
        sandbox = Sandbox.fork(prepared.sandbox_config(None, pass_fds=keep,
                                                       env=command_env(None, log.path)),
                               meanwhile=prepared.meanwhile,
                               on_violation=prepared.violations)
    except BaseException:
        forwarder.restore()
        prepared.close()
        log.remove()
        raise
    if sandbox is None:  # inside: the program goes on, with the signal mask it had
        forwarder.restore()
        return None if log.path is None else Inside(log.path)
    _supervise(prepared, sandbox, forwarder, log)


def _supervise(prepared: Prepared, sandbox: Sandbox, forwarder: SignalForwarder,
               log: RunLog) -> NoReturn:
    """The original process, from now on: the `tapbox` command's part, then exit."""
    status = 125
    try:
        forwarder.start(sandbox.pid)
        raise_fd_limit()
        status = serve(prepared, sandbox)
    except BaseException as exc:  # noqa: B036 - the supervisor reports and exits, always
        from tapbox.textescape import escape

        message = str(exc) if isinstance(exc, Exception) else type(exc).__name__
        print(f"tapbox: {escape(message)}", file=sys.stderr)
    finally:
        try:
            forwarder.stop()
            prepared.close()
            log.remove()  # a temporary log of our own; the caller's log= stays
            sys.stderr.flush()
        finally:
            os._exit(status)
    raise AssertionError("unreachable")


def _refuse_unsafe() -> None:
    threads = _thread_count()
    if threads > 1:
        raise UsageError(f"tapbox.enter: {threads - 1} other thread(s) running: only the "
                         "calling thread would go on inside the sandbox. Call enter() before "
                         "starting threads (or thread pools)")
    if _loop_running():
        raise UsageError("tapbox.enter: called inside a running event loop, which cannot go on "
                         "inside the sandbox: call enter() before the loop starts (e.g. before "
                         "asyncio.run() or trio.run())")


def _thread_count() -> int:
    """Threads of this process, as the kernel counts them (C threads included)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        return threading.active_count()


def _loop_running() -> bool:
    from tapbox.api.aio import _in_trio

    if _in_trio():
        return True
    if "asyncio" in sys.modules:
        import asyncio

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True
    return False
