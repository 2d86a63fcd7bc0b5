"""The sandbox child, between fork and exec: set up, report, wait for the word, exec.

How this works (`child_main`, in the forked child; it leaves only through exec or os._exit):

1. blocks every signal (so nothing interrupts set-up half way: a Ctrl-C typed now stays pending and
   kills the child, with default dispositions, just before exec), sets PR_SET_PDEATHSIG=SIGKILL;
2. enters the namespaces (tapbox.isolate.namespaces): user with id maps, then net + mount;
3. opens tap0 and configures the links (tapbox.isolate.tap), then executes the filesystem plan
   (tapbox.isolate.plan / mounts: fresh sysfs, private resolv.conf), and builds the seccomp
   filter (tapbox.isolate.seccomp: a missing libseccomp is a set-up failure like any other);
4. sends b"R" and the TAP fd (SCM_RIGHTS) over a SOCK_SEQPACKET socketpair, closes its copy, and
   blocks until the parent sends b"G" (`Sandbox.start()`). EOF instead (tapbox died or gave up)
   means _exit(125) without exec: fail closed, CMD never runs without the firewall;
5. restores signal dispositions (caught -> default; SIGPIPE/SIGXFSZ, which Python ignores, ->
   default; an ignore inherited from tapbox's own parent, e.g. nohup, is kept, as subprocess does)
   and an empty signal mask; sets no_new_privs and loads the seccomp filter, the very last step
   (if the kernel refuses it: one line and exit 125, CMD never runs unfiltered); then
   execvp(argv). On failure: "tapbox: CMD: strerror" and exit 127 (not found) or 126 (anything
   else), as env(1).

A failure before exec is sent to the parent as b"E" + one line, which spawn() raises as SetupError.
All fds are O_CLOEXEC, so neither the TAP fd nor the control socket reach CMD.

PR_SET_PDEATHSIG (SIGKILL) is kept across exec on purpose: if tapbox dies, the TAP dies with it and
the sandbox has no network anyway; killing CMD makes that failure visible instead of leaving a
command running with a dead network. The signal fires when the *thread* that forked exits, so
spawn() must be called from the thread that lives as long as tapbox (the main thread).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
from typing import TYPE_CHECKING, NoReturn

from tapbox.errors import EXIT_CANNOT_INVOKE, EXIT_NOT_FOUND, EXIT_TAPBOX_FAILED, SetupError
from tapbox.isolate import mounts
from tapbox.isolate.config import SandboxConfig
from tapbox.isolate.diagnose import Host
from tapbox.isolate.libc import PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG, Libc
from tapbox.isolate.namespaces import enter_namespaces
from tapbox.isolate.plan import Plan

if TYPE_CHECKING:
    from tapbox.isolate import seccomp
from tapbox.isolate.tap import configure_links, open_tap

# Control messages on the socketpair.
MSG_READY = b"R"  # child -> parent, with the TAP fd as SCM_RIGHTS when network=True
MSG_ERROR = b"E"  # child -> parent, followed by one utf-8 line
MSG_GO = b"G"  # parent -> child: exec now


def child_main(
    config: SandboxConfig,
    plan: Plan,
    sock: socket.socket,
    parent_pid: int,
    uid: int,
    gid: int,
) -> NoReturn:
    """Runs in the forked child; never returns (exec or os._exit)."""
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        libc = Libc()
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # tapbox died before prctl took effect
            os._exit(EXIT_TAPBOX_FAILED)
        tap_fd = _set_up(libc, config, plan, uid, gid)
        from tapbox.isolate import seccomp  # here: the parent does not pay for its import

        syscall_filter = seccomp.compile_filter(config.syscalls or seccomp.DEFAULT_POLICY)
        if tap_fd is None:
            sock.send(MSG_READY)
        else:
            socket.send_fds(sock, [MSG_READY], [tap_fd])
            os.close(tap_fd)  # the parent owns it now; CMD must never hold it
        if sock.recv(16) != MSG_GO:  # EOF: tapbox died or gave up -> never run CMD
            os._exit(EXIT_TAPBOX_FAILED)
        sock.close()
        _restore_signals(libc)
        _lock_down(libc, syscall_filter)
        _exec(config.argv)
    except SetupError as e:
        _report(sock, str(e))
    except BaseException as e:  # noqa: B036 - anything at all must end in _exit, never return
        _report(sock, f"tapbox: sandbox set-up failed: {type(e).__name__}: {e}")
    os._exit(EXIT_TAPBOX_FAILED)


def _set_up(libc: Libc, config: SandboxConfig, plan: Plan, uid: int, gid: int) -> int | None:
    """Namespaces, links, mounts. Returns the TAP fd (None with network=False)."""
    host = Host.collect()
    enter_namespaces(libc, host, uid, gid, config.root)
    tap_fd = open_tap(host, config.vnet_hdr) if config.network else None
    try:
        configure_links(host, config.network, config.mtu, config.ipv6)
        mounts.apply(plan, libc, host)
    except BaseException:
        if tap_fd is not None:
            os.close(tap_fd)
        raise
    return tap_fd


def _lock_down(libc: Libc, syscall_filter: seccomp.Filter) -> None:
    """no_new_privs, then the seccomp filter: the last steps before exec."""
    err = libc.prctl(PR_SET_NO_NEW_PRIVS, 1) or syscall_filter.load()
    if err:
        with contextlib.suppress(OSError):
            os.write(2, os.fsencode(
                f"tapbox: cannot install the sandbox's seccomp filter: {os.strerror(err)}: "
                "the kernel needs CONFIG_SECCOMP_FILTER (and no seccomp profile above tapbox "
                "that forbids it)\n"))
        os._exit(EXIT_TAPBOX_FAILED)


def _report(sock: socket.socket, message: str) -> None:
    line = " ".join(message.split())  # one line
    with contextlib.suppress(OSError):
        sock.send(MSG_ERROR + line.encode("utf-8", "replace")[:4000])


def _exec(argv: list[str]) -> NoReturn:
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        code = EXIT_NOT_FOUND if e.errno == errno.ENOENT else EXIT_CANNOT_INVOKE
        reason = e.strerror or str(e)
        with contextlib.suppress(OSError):
            os.write(2, os.fsencode(f"tapbox: {argv[0]}: {reason}\n"))
        os._exit(code)


def _restore_signals(libc: Libc) -> None:
    """Default dispositions for every caught signal and those Python ignores, then an empty mask.

    Dispositions first: a signal left pending during set-up (Ctrl-C) then acts by default when the
    mask is cleared, i.e. it kills the child before exec, as it would have killed CMD.
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
