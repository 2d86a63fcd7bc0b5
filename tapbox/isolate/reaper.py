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
SIGXFSZ (which Python ignores), an inherited ignore kept (as subprocess does), an empty mask, the
resource limits (`CommandSetup.rlimits`: the command's, not pid 1's), then execvp(argv) with the
environment tapbox made for it (tapbox.isolate.environment: TAPBOX=1 among others). On failure:
"tapbox: CMD: strerror" and exit 127 (not found) or 126 (anything else), as env(1).
no_new_privs and pid 1's seccomp filter carry over.

An allow-list policy (`--syscalls strict`) is loaded here, by the command's process, as the last
thing before exec (pid 1 could not reap under it). It lets through exactly one exec: execveat on
a descriptor of the command opened just before (O_PATH, close-on-exec, so the program it
becomes no longer has it), numbered just beyond the command's RLIMIT_NOFILE, where the program
cannot put another file. Its listener - the fd that names violations - is handed to tapbox
by pid 1, which takes it from the command's process with pidfd_getfd (the command's process
could not send it itself: sendmsg is not in the policy) while the command waits on a pipe; the
command execs once pid 1 says the listener is in tapbox's hands. If it cannot be handed over,
pid 1 kills the command before it execs and says why (exit 125): violations would otherwise
fail with ENOSYS instead of killing.

Python mode (no argv: tapbox.call, tapbox.enter): pid 2 keeps the Python program's signal
handlers (they are its own, not tapbox's), takes the resource limits, gets back the signal mask
the program had, finds the environment made for it in os.environ, and returns from run(): the
program goes on inside the sandbox. An allow-list policy is loaded last, as for a command, its
listener handed over the same way, and the program goes on under it (there is no exec to let
through): a function called with `--syscalls strict` computes, and is killed at its first
file, socket or fork.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
from typing import TYPE_CHECKING, NamedTuple, NoReturn

from tapbox.errors import EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND, EXIT_TAPBOX_FAILED
from tapbox.isolate.libc import Libc
from tapbox.isolate.signals import FORWARDED_SIGNALS, should_forward

if TYPE_CHECKING:
    from tapbox.isolate.seccomp import Installed
    from tapbox.isolate.syscalls import Policy, Rule

WAITED = FORWARDED_SIGNALS | {signal.SIGCHLD}
MSG_LISTENER = b"N"  # pid 1 -> tapbox after the start: the command's filter listener (SCM_RIGHTS)
MSG_NO_LISTENER = b"n"  # ... or why there is none (the command's violations are not named)
SYS_PIDFD_GETFD = 438  # the same number on every architecture


class CommandSetup(NamedTuple):
    """What the command's own process does before exec, besides restoring signals."""

    policy: Policy | None = None  # an allow list to load (strict), or None
    notify: bool = True  # name violations (hand the listener over through `sock`)
    sock: socket.socket | None = None  # pid 1's control socket to tapbox, while it is needed
    rlimits: tuple[tuple[int, int], ...] = ()  # (RLIMIT_*, value), soft and hard
    name: str = ""  # Python mode: the program's own name (comm), which pid 1 renamed


def run(argv: list[str] | None, env: dict[str, str], libc: Libc,
        setup: CommandSetup | None = None, mask: set[signal.Signals] | None = None) -> None:
    """Fork and exec the command, then serve as pid 1 until it exits (every signal blocked).
    Never returns, except in pid 2 in Python mode (argv None); `mask` is the signal mask that
    process gets back."""
    setup = setup or CommandSetup()
    early = _take_pending()
    handoff = os.pipe2(os.O_CLOEXEC) if setup.policy is not None else None  # command -> pid 1
    ack = os.pipe2(os.O_CLOEXEC) if setup.policy is not None else None  # pid 1 -> command
    try:
        command = os.fork()
    except OSError as e:  # tapbox has closed the control socket by now: say it on stderr
        with contextlib.suppress(OSError):
            os.write(2, os.fsencode(f"tapbox: cannot start the command: {e.strerror} (too many "
                                    "processes? see ulimit -u)\n"))
        os._exit(EXIT_TAPBOX_FAILED)
    if command == 0:  # pragma: no cover - the command's side: leaves through exec or _exit
        if argv is None:
            if setup.sock is not None:  # pid 1's, not the program's (no exec closes it here)
                setup.sock.close()
            if setup.name:
                libc.set_name(setup.name)
            _set_rlimits(setup.rlimits)
            _continue(env, mask or set())
            if setup.policy is not None:
                assert handoff is not None and ack is not None
                _confine(setup, handoff[1], ack[0])
            return
        _restore_signals(libc)
        _set_rlimits(setup.rlimits)
        if setup.policy is None:
            _exec(argv, env)
        assert handoff is not None and ack is not None
        _exec_confined(argv, env, setup, handoff[1], ack[0])
    if handoff is not None and ack is not None:
        os.close(handoff[1])
        os.close(ack[0])
        _take_listener(command, setup, handoff[0], ack[1])
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
        _exec_failed(argv, e)


def _exec_failed(argv: list[str], e: OSError) -> NoReturn:
    code = EXIT_NOT_FOUND if e.errno == errno.ENOENT else EXIT_CANNOT_EXECUTE
    reason = e.strerror or str(e)
    with contextlib.suppress(OSError):
        os.write(2, os.fsencode(f"tapbox: {argv[0]}: {reason}\n"))
    os._exit(code)


def _set_rlimits(rlimits: tuple[tuple[int, int], ...]) -> None:
    import resource

    for which, value in rlimits:
        try:
            resource.setrlimit(which, (value, value))
        except (OSError, ValueError) as e:
            with contextlib.suppress(OSError):
                os.write(2, os.fsencode(f"tapbox: cannot set a resource limit: {e}\n"))
            os._exit(EXIT_TAPBOX_FAILED)


def _exec_confined(argv: list[str], env: dict[str, str], setup: CommandSetup, handoff: int,
                   ack: int) -> NoReturn:
    """Load the allow list, hand its listener over, exec the command through an fd."""
    from tapbox.isolate.syscalls import AT_EMPTY_PATH, Allow, ArgCmp, Rule

    path = _which(argv[0], env.get("PATH"))
    try:
        exe = _out_of_reach(os.open(path, os.O_PATH | os.O_CLOEXEC))
    except OSError as e:
        _exec_failed(argv, e)
    exec_rule = Rule("execveat", Allow(), (ArgCmp.eq(0, exe),
                                           ArgCmp.masked_eq(4, AT_EMPTY_PATH, AT_EMPTY_PATH)),
                     "the command's own exec, once: its fd is gone after it")
    _install_and_hand_over(setup, handoff, ack, (exec_rule,))
    # From here on only what the policy allows: write, read, close, the exec.
    try:
        os.execve(exe, argv, env)
    except OSError as e:
        _exec_failed(argv, e)


def _install_and_hand_over(setup: CommandSetup, handoff: int, ack: int,
                           extra: tuple[Rule, ...]) -> Installed:
    """Load the allow list (with `extra` rules) on this process, tell pid 1 its listener (or why
    there is none) through `handoff`, and wait for the go on `ack`; a failure is one line on
    stderr and EXIT_TAPBOX_FAILED. After the load only write, read and close are used."""
    from tapbox.isolate import seccomp

    assert setup.policy is not None
    try:
        installed = seccomp.install(setup.policy, notify=setup.notify, extra=extra)
    except Exception as e:  # noqa: BLE001 - one line, then out
        with contextlib.suppress(OSError):
            os.write(2, os.fsencode(f"{e}\n"))
        os._exit(EXIT_TAPBOX_FAILED)
    if installed.listener is None:
        os.write(handoff, b"-" + (installed.unnamed_because or "").encode()[:200])
    else:
        os.write(handoff, b"%d" % installed.listener)
    if os.read(ack, 1) != b"G":
        os._exit(EXIT_TAPBOX_FAILED)
    return installed


def _confine(setup: CommandSetup, handoff: int, ack: int) -> None:
    """Python mode: load the allow list on this process, which then goes on under it (no exec:
    the program is already running), its listener handed over as for a command."""
    installed = _install_and_hand_over(setup, handoff, ack, ())
    for fd in (handoff, ack, *(() if installed.listener is None else (installed.listener,))):
        os.close(fd)


def _out_of_reach(fd: int) -> int:
    """Move `fd` to the first number the command cannot allocate: its RLIMIT_NOFILE soft
    limit (lowered by one where it equals the hard limit, to make room). dup2 and F_DUPFD
    refuse that number and the allow list cannot raise the limit, so after exec nothing can put
    another file there for the exec rule to let through."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return fd
    target = soft if hard == resource.RLIM_INFINITY or soft < hard else hard - 1
    if target <= fd:
        return fd
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target + 1, hard))
        moved = os.dup2(fd, target, inheritable=False)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        return fd
    os.close(fd)
    return moved


def _which(name: str, path: str | None) -> str:
    """execvp's search: a name with a slash as it is, else the first executable on PATH."""
    if "/" in name:
        return name
    for directory in (path if path is not None else os.defpath).split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return name  # not found: the open fails with ENOENT, as exec would


def _take_listener(command: int, setup: CommandSetup, handoff: int, ack: int) -> None:
    """Pid 1: take the command's listener (pidfd_getfd), pass it to tapbox, let it exec."""
    import ctypes

    sock = setup.sock
    word = os.read(handoff, 256)
    os.close(handoff)
    failure = ""
    if not word:
        failure = "the command's process failed before its filter was loaded"
    elif word.startswith(b"-"):
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.send(MSG_NO_LISTENER + word[1:])
    else:
        fd = -1
        try:
            pidfd = os.pidfd_open(command)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.syscall.restype = ctypes.c_long
                fd = int(libc.syscall(ctypes.c_long(SYS_PIDFD_GETFD), ctypes.c_int(pidfd),
                                      ctypes.c_int(int(word)), ctypes.c_uint(0)))
                if fd < 0:
                    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            finally:
                os.close(pidfd)
            if sock is None:
                raise OSError(errno.EBADF, "no control socket")
            socket.send_fds(sock, [MSG_LISTENER], [fd])
        except (OSError, ValueError) as e:
            failure = (f"cannot hand the command's seccomp listener to tapbox: {e} (kernel "
                       "older than 5.6?): run without --syscalls strict")
        finally:
            if fd >= 0:
                os.close(fd)
    if sock is not None:
        sock.close()
    if failure:
        _send(command, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.write(2, f"tapbox: {failure}\n".encode())
        with contextlib.suppress(ChildProcessError):
            os.waitpid(command, 0)
        os._exit(EXIT_TAPBOX_FAILED)
    os.write(ack, b"G")
    os.close(ack)


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
