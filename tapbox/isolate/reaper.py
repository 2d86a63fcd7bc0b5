"""Pid 1 of the sandbox, once set up: start the command, reap, forward signals, exit with it.

How this works
--------------
Pid 1 of a PID namespace has two duties a command is not written for: every orphan of the
namespace becomes its child (someone must reap the zombies), and the kernel delivers it only the
signals it handles. So the command does not run as pid 1: pid 1 forks it (pid 2), and stays a
small loop on sigwaitinfo() with every signal blocked:

- SIGCHLD: reap every child that has exited (waitpid(-1, WNOHANG) until none is left). When the
  command is among them, exit with its status: its exit code, or 128+N if signal N killed it
  (pid 1 cannot die of a signal it sends itself). The kernel then kills every process left in
  the namespace (a `setsid` daemon, a background job) before tapbox's wait for pid 1 returns:
  nothing of the sandbox outlives the command.
- a signal in FORWARDED_SIGNALS: pass it on to the command, except one the terminal sent to a
  process group the command is still in (it already got it), the rule SignalForwarder follows
  (tapbox.isolate.signals). tapbox forwards to pid 1 what it receives, pid 1 to the command.

Signals that arrived during set-up (a Ctrl-C typed while tapbox started) were left pending; they
are taken before the fork and sent to the command, which has them blocked until it restores the
default dispositions and unblocks them just before exec: a Ctrl-C typed during start-up stops
the command before it runs, as it would have stopped it a moment later.

The command's side of the fork: default dispositions for every caught signal and for SIGPIPE and
SIGXFSZ (which Python ignores), an inherited ignore kept (as subprocess does), an empty mask, then
execvp(argv) with the environment tapbox made for it (tapbox.isolate.environment: TAPBOX=1
among others). On failure: "tapbox: CMD: strerror" and
exit 127 (not found) or 126 (anything else), as env(1). no_new_privs and the seccomp filter were
set on pid 1 already and carry over.

Python mode (no argv: tapbox.call, tapbox.enter): pid 2 keeps the Python program's signal
handlers (they are its own, not tapbox's), gets back the signal mask the program had, finds the
environment made for it in os.environ, and returns from run(): the program goes on inside the
sandbox.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from typing import NoReturn

from tapbox.errors import EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND, EXIT_TAPBOX_FAILED
from tapbox.isolate.libc import Libc
from tapbox.isolate.signals import FORWARDED_SIGNALS, should_forward

WAITED = FORWARDED_SIGNALS | {signal.SIGCHLD}


def run(argv: list[str] | None, env: dict[str, str], libc: Libc,
        mask: set[signal.Signals] | None = None) -> None:
    """Fork and exec the command, then serve as pid 1 until it exits (every signal blocked).
    Never returns, except in pid 2 in Python mode (argv None); `mask` is the signal mask that
    process gets back."""
    early = _take_pending()
    try:
        command = os.fork()
    except OSError as e:  # tapbox has closed the control socket by now: say it on stderr
        with contextlib.suppress(OSError):
            os.write(2, os.fsencode(f"tapbox: cannot start the command: {e.strerror} (too many "
                                    "processes? see ulimit -u)\n"))
        os._exit(EXIT_TAPBOX_FAILED)
    if command == 0:  # pragma: no cover - the command's side: leaves through exec or _exit
        if argv is None:
            _continue(env, mask or set())
            return
        _restore_signals(libc)
        _exec(argv, env)
    for signo in early:
        _send(command, signo)
    while True:
        info = signal.sigwaitinfo(WAITED)
        if info.si_signo == signal.SIGCHLD:
            status = _reap(command)
            if status is not None:
                os._exit(status)
        elif should_forward(info.si_signo, info.si_code, _in_our_group(command), False):
            _send(command, info.si_signo)


def _take_pending() -> list[int]:
    """The forwarded signals pending now, in the order they are taken."""
    taken: list[int] = []
    while (info := signal.sigtimedwait(FORWARDED_SIGNALS, 0)) is not None:
        taken.append(info.si_signo)
    return taken


def _reap(command: int) -> int | None:
    """Reap every exited child; the command's exit status (128+N for signal N) if it is one."""
    found: int | None = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return found
        if pid == 0:
            return found
        if pid == command:
            code = os.waitstatus_to_exitcode(status)
            found = 128 - code if code < 0 else code


def _in_our_group(command: int) -> bool:
    try:
        return os.getpgid(command) == os.getpgrp()
    except OSError:
        return False


def _send(command: int, signo: int) -> None:
    # The command is our unreaped child: its pid cannot have been reused.
    with contextlib.suppress(ProcessLookupError):
        os.kill(command, signo)


def _continue(env: dict[str, str], mask: set[signal.Signals]) -> None:
    if dict(os.environ) != env:
        os.environ.clear()
        os.environ.update(env)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _exec(argv: list[str], env: dict[str, str]) -> NoReturn:
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        code = EXIT_NOT_FOUND if e.errno == errno.ENOENT else EXIT_CANNOT_EXECUTE
        reason = e.strerror or str(e)
        with contextlib.suppress(OSError):
            os.write(2, os.fsencode(f"tapbox: {argv[0]}: {reason}\n"))
        os._exit(code)


def _restore_signals(libc: Libc) -> None:
    """Default dispositions for every caught signal and those Python ignores, then an empty mask.

    Dispositions first: a signal left pending (a Ctrl-C typed during set-up, passed on by pid 1)
    then acts by default when the mask is cleared, i.e. before exec, as it would on the command.
    """
    for signo in signal.valid_signals():
        if signo in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            handler = signal.getsignal(signo)
        except (OSError, ValueError):
            continue
        if callable(handler) or signo in (signal.SIGPIPE, signal.SIGXFSZ):
            libc.set_default_signal(signo)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
