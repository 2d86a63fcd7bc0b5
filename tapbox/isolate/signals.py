"""Signals tapbox receives are passed on to the sandboxed command, without doubling Ctrl-C.

How this works
--------------
CMD inherits stdin/stdout/stderr, the session and the controlling terminal, and starts in tapbox's
process group, as does pid 1 of the sandbox, its parent (tapbox.isolate.reaper). tapbox forwards
to pid 1, which forwards to CMD by the same rule (`should_forward`). Signals typed at the
terminal (Ctrl-C, Ctrl-\\, window resize) therefore reach CMD directly from the tty. An
interactive shell in the sandbox moves itself to its own process group and takes the terminal
(job control works as usual); tapbox then sits in a background group.

`SignalForwarder` blocks the forwarded signals (and SIGTTOU, see below) with pthread_sigmask; it
must be created in the main thread before any thread starts, so every thread inherits the mask
(trio's handlers never run for them). Its thread loops on sigwaitinfo() and forwards each signal to
CMD through a pidfd (no pid-reuse race), except when si_code is SI_KERNEL (sent by the tty) and CMD
is still in tapbox's process group: the tty has then already signalled CMD, so a forward would
deliver Ctrl-C twice. Exception: when tapbox is a session leader the kernel sends SIGHUP/SIGCONT
on hang-up to tapbox alone, so those are forwarded. A `kill -TERM tapbox` (SI_USER) is always
forwarded; a signal sent to the whole process group by another process reaches CMD twice (once
directly, once forwarded): unavoidable, and harmless for the usual terminating signals. SIGTSTP,
SIGTTIN and SIGSTOP are not touched: Ctrl-Z stops tapbox and CMD together, `fg` resumes both.
SIGTTOU is blocked (not forwarded) so that the engine writing to a terminal it no longer owns
(TOSTOP set, interactive shell in the foreground) does not stop the engine and freeze the network.

Suggested use::

    fwd = SignalForwarder()              # main thread, before any thread and before spawn()
    sb = Sandbox.spawn(config)           # raises SetupError -> exit 125
    fwd.start(sb.pid)
    ... trio.run(engine, sb)
    fwd.stop()
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import threading
from collections.abc import Iterable

SI_KERNEL = 0x80  # siginfo.si_code of signals the kernel (e.g. the tty driver) generates

# Signals tapbox forwards to CMD. Not SIGTSTP/SIGTTIN/SIGTTOU (job control acts on tapbox and CMD
# together), not SIGCHLD/SIGPIPE (about tapbox itself), not the synchronous fault signals.
FORWARDED_SIGNALS: frozenset[int] = frozenset(
    {
        signal.SIGHUP,
        signal.SIGINT,
        signal.SIGQUIT,
        signal.SIGTERM,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGCONT,
        signal.SIGWINCH,
        signal.SIGALRM,
        *range(signal.SIGRTMIN, signal.SIGRTMAX + 1),
    }
)
# Used only to wake the forwarder thread in stop(); never forwarded.
_WAKE_SIGNAL = signal.SIGCHLD


def should_forward(
    signo: int, si_code: int, child_in_our_group: bool, we_lead_session: bool
) -> bool:
    """Whether a signal tapbox received must be forwarded to CMD (see the module comment)."""
    if si_code != SI_KERNEL or not child_in_our_group:
        return True
    # From the tty to our foreground group, which includes CMD: it already has it...
    # ...except hang-up, which the kernel sends to the session leader alone.
    return we_lead_session and signo in (signal.SIGHUP, signal.SIGCONT)


class SignalForwarder:
    """Forward the signals tapbox receives to the sandboxed command, without doubling Ctrl-C.

    Create it in the main thread before any other thread exists: the constructor blocks
    `signals` (and SIGTTOU) in the calling thread, and threads inherit the mask.
    """

    def __init__(self, signals: Iterable[int] = FORWARDED_SIGNALS) -> None:
        self.signals = frozenset(signals) - {_WAKE_SIGNAL, signal.SIGKILL, signal.SIGSTOP}
        self._old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.signals | {signal.SIGTTOU})
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._pid: int | None = None
        self._pidfd: int | None = None
        # The last signals forwarded, for tests and debugging.
        self.forwarded: collections.deque[int] = collections.deque(maxlen=64)

    def start(self, pid: int) -> None:
        """Start forwarding to `pid` (an unreaped child of ours)."""
        if self._thread is not None:
            raise RuntimeError("SignalForwarder already started")
        self._pid = pid
        try:
            self._pidfd = os.pidfd_open(pid)
        except OSError:
            self._pidfd = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="tapbox-signals", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop forwarding. The signals stay blocked (tapbox is about to exit); see restore()."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping = True
        if thread.ident is not None and thread.is_alive():
            with contextlib.suppress(ProcessLookupError):
                signal.pthread_kill(thread.ident, _WAKE_SIGNAL)
        thread.join()
        fd, self._pidfd = self._pidfd, None
        if fd is not None:
            os.close(fd)

    def restore(self, discard_pending: bool = False) -> None:
        """Restore the signal mask of the calling thread (the one that created the forwarder).

        Signals that arrived meanwhile are then delivered to tapbox itself, unless
        `discard_pending`: after a run they were meant for the command, which is gone, and a
        program that ran the sandbox in-process carries on with its own signal state intact.
        """
        self.stop()
        if discard_pending:
            blocked = self.signals | {signal.SIGTTOU}
            while pending := signal.sigpending() & blocked:
                signal.sigtimedwait(pending, 0)
        signal.pthread_sigmask(signal.SIG_SETMASK, self._old_mask)

    def __enter__(self) -> SignalForwarder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        # Blocked before the flag is checked: a wake-up sent after this point stays pending.
        signal.pthread_sigmask(signal.SIG_BLOCK, {_WAKE_SIGNAL})
        waitset = self.signals | {_WAKE_SIGNAL}
        while not self._stopping:
            info = signal.sigwaitinfo(waitset)
            if info.si_signo == _WAKE_SIGNAL or self._stopping:
                continue
            if should_forward(
                info.si_signo, info.si_code, self._child_in_our_group(), _we_lead_session()
            ):
                self._send(info.si_signo)

    def _child_in_our_group(self) -> bool:
        assert self._pid is not None
        try:
            return os.getpgid(self._pid) == os.getpgrp()
        except OSError:
            return False

    def _send(self, signo: int) -> None:
        assert self._pid is not None
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, signo)
            else:
                os.kill(self._pid, signo)
        except ProcessLookupError:
            return
        self.forwarded.append(signo)


def _we_lead_session() -> bool:
    return os.getsid(0) == os.getpid()
