"""The sandbox's two first processes: the one tapbox forks, and pid 1 inside.

How this works
--------------
`child_main` runs in the process tapbox forks (before trio or any thread starts). It:

1. blocks every signal (nothing interrupts set-up half way; a Ctrl-C typed now stays pending and
   is passed on to the command before it execs, see tapbox.isolate.reaper), sets
   PR_SET_PDEATHSIG=SIGKILL, and closes every close-on-exec descriptor it inherited from tapbox
   (the open --log and --pcap files among them): nothing in the sandbox ever holds one;
2. enters the namespaces (tapbox.isolate.namespaces): user with id maps, then network, mount,
   PID, IPC and UTS;
3. creates pid 1 of the new PID namespace with clone(CLONE_PARENT), so that pid 1 is tapbox's
   own child (tapbox waits for it and signals it through a pidfd), sends its pid to tapbox as
   b"P" and exits.

`init_main` is pid 1. It sets PR_SET_PDEATHSIG=SIGKILL (if tapbox dies, so does pid 1, and with
it the kernel kills every process of the namespace), names itself `tapbox-init`, then:

4. opens tap0 and configures the links (tapbox.isolate.tap), executes the filesystem plan
   (tapbox.isolate.plan / mounts: the view -- in the project view a new root and pivot_root
   --, private resolv.conf, fresh /proc, read-only record files) and re-enters its working
   directory through the new mounts;
5. locks itself down, the last step of set-up: CAP_SYS_ADMIN leaves the bounding set and pid 1's
   own sets (the command, even as uid 0 with --root, can never again mount or unmount in the
   sandbox, so the read-only mounts stay; and pid 1 holds nothing the command could take from
   it by ptrace), with --no-nest no user namespace can be created inside any more
   (tapbox.isolate.namespaces), pid 1 sets no_new_privs, applies Landlock (--landlock,
   tapbox.isolate.landlock) and loads the seccomp filter (tapbox.isolate.seccomp), all
   inherited by the command. With no_new_privs, a uid-0 command keeps at exec exactly the
   capabilities pid 1 has: all but CAP_SYS_ADMIN;
6. sends b"R", a byte saying which descriptors follow, and those descriptors (SCM_RIGHTS): the
   TAP fd, the home directory's throwaway layer (which tapbox counts at exit) and the seccomp
   listener (tapbox's supervisor names what the filter refuses), then notes as JSON (why
   violations are not named, what Landlock enforces), over a SOCK_SEQPACKET socketpair; closes
   its copies, and blocks until tapbox sends b"G" (`Sandbox.start()`). EOF instead (tapbox died
   or gave up) means _exit(125): fail closed, the command never runs without the firewall;
7. becomes the reaper (tapbox.isolate.reaper): forks the command (pid 2), which execs; reaps
   every orphan; forwards signals; exits with the command's status.

A failure before "R" is sent to tapbox as b"E" + one line, which spawn() raises as SetupError
(exit 125). PR_SET_PDEATHSIG fires when the *thread* that forked exits, so spawn() must be called
from the thread that lives as long as tapbox (the main thread).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import struct
from typing import NoReturn

from tapbox.errors import EXIT_TAPBOX_FAILED, SetupError
from tapbox.isolate import mounts
from tapbox.isolate.config import SandboxConfig
from tapbox.isolate.diagnose import Host, eperm_failure
from tapbox.isolate.libc import (
    CAP_SYS_ADMIN,
    PR_CAPBSET_DROP,
    PR_SET_NO_NEW_PRIVS,
    PR_SET_PDEATHSIG,
    Libc,
)
from tapbox.isolate.namespaces import enter_namespaces, forbid_user_namespaces
from tapbox.isolate.plan import Plan
from tapbox.isolate.tap import configure_links, open_tap

# Control messages on the socketpair.
MSG_PID = b"P"  # first child -> tapbox: pid 1's pid (struct "i"), as tapbox sees it
MSG_READY = b"R"  # pid 1 -> tapbox, + a byte of READY_* flags (those fds as SCM_RIGHTS) + notes
READY_TAP = 1  # the TAP fd (network=True)
READY_LAYER = 2  # a descriptor of the home directory's throwaway layer (after the TAP fd)
READY_LISTENER = 4  # the seccomp filter's listener, which names violations (last)
MSG_ERROR = b"E"  # either -> tapbox, followed by one utf-8 line
MSG_GO = b"G"  # tapbox -> pid 1: start the command now
PID_FORMAT = struct.Struct("i")

INIT_NAME = "tapbox-init"  # pid 1's name, as `ps` shows it


def child_main(
    config: SandboxConfig,
    plan: Plan,
    env: dict[str, str],
    sock: socket.socket,
    parent_pid: int,
    uid: int,
    gid: int,
) -> NoReturn:
    """Runs in the process tapbox forked; never returns (os._exit)."""
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        libc = Libc()
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # tapbox died before prctl took effect
            os._exit(EXIT_TAPBOX_FAILED)
        _close_inherited_fds(keep=sock.fileno())
        host = Host.collect()
        enter_namespaces(libc, host, uid, gid, config.root)
        pid = libc.clone_parent(_legacy_clone_nr)
        if pid == 0:
            init_main(config, plan, env, sock, libc, host)
        if pid < 0:
            raise SetupError(eperm_failure(
                f"creating pid 1 of the sandbox's PID namespace: {os.strerror(-pid)}", host))
        sock.send(MSG_PID + PID_FORMAT.pack(pid))
        os._exit(0)
    except SetupError as e:
        _report(sock, str(e))
    except BaseException as e:  # noqa: B036 - anything at all must end in _exit, never return
        _report(sock, f"tapbox: sandbox set-up failed: {type(e).__name__}: {e}")
    os._exit(EXIT_TAPBOX_FAILED)


def init_main(
    config: SandboxConfig, plan: Plan, env: dict[str, str], sock: socket.socket, libc: Libc,
    host: Host
) -> NoReturn:
    """Pid 1 of the sandbox: set up, wait for the word, then reap (never returns)."""
    try:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # tapbox is our parent (CLONE_PARENT)
        libc.set_name(INIT_NAME)
        # Imported while the host's tree is still the root: the view may not show tapbox.
        import resource  # noqa: F401 - the command's limits (reaper)

        from tapbox.isolate import landlock, reaper, seccomp  # noqa: F401

        fds = _set_up(libc, config, plan, host)
        listener: int | None = None
        try:
            listener, notes = _lock_down(libc, config, plan)
            flags = (READY_TAP if fds[0] is not None else 0) | \
                (READY_LAYER if fds[1] is not None else 0) | \
                (READY_LISTENER if listener is not None else 0)
            ready = MSG_READY + bytes([flags]) + json.dumps(notes).encode()
            passed = [fd for fd in (*fds, listener) if fd is not None]
            if passed:
                socket.send_fds(sock, [ready], passed)
            else:
                sock.send(ready)
        finally:
            for fd in (*fds, listener):  # tapbox owns them now; nothing in the sandbox may
                if fd is not None:       # hold them (nor its own filter's listener)
                    os.close(fd)
        if sock.recv(16) != MSG_GO:  # EOF: tapbox died or gave up -> never run the command
            os._exit(EXIT_TAPBOX_FAILED)
        own = config.syscalls if config.syscalls is not None and \
            config.syscalls.is_allow_list else None  # an allow list: the command loads it
        handover = own is not None and config.notify
        if not handover:
            sock.close()
        reaper.run(config.argv, env, libc, reaper.CommandSetup(
            own, config.notify, sock if handover else None, config.rlimits))
    except SetupError as e:
        _report(sock, str(e))
    except BaseException as e:  # noqa: B036 - anything at all must end in _exit, never return
        _report(sock, f"tapbox: sandbox set-up failed: {type(e).__name__}: {e}")
    os._exit(EXIT_TAPBOX_FAILED)


def _set_up(libc: Libc, config: SandboxConfig, plan: Plan,
            host: Host) -> tuple[int | None, int | None]:
    """Links and mounts, inside the namespaces. Returns the TAP fd (None with network=False)
    and the home layer's (None without one)."""
    tap_fd = open_tap(host, config.vnet_hdr) if config.network else None
    try:
        configure_links(host, config.network, config.mtu, config.ipv6)
        applied = mounts.apply(plan, libc, host)
        with contextlib.suppress(OSError):  # the same directory, reached through the new mounts
            os.chdir(os.getcwd())
    except BaseException:
        if tap_fd is not None:
            os.close(tap_fd)
        raise
    return tap_fd, applied.layer_fd


def _lock_down(libc: Libc, config: SandboxConfig, plan: Plan) -> tuple[int | None,
                                                                       dict[str, str]]:
    """The last set-up step: no CAP_SYS_ADMIN in the sandbox any more, no_new_privs, Landlock
    (--landlock), the seccomp filter. Returns the filter's listener fd (None: violations are
    not named) and notes for tapbox: "unnamed" (why violations are not named), "landlock"
    (what Landlock enforces)."""
    from tapbox.isolate import seccomp  # here: tapbox itself does not pay for its import

    lib = seccomp.Libseccomp()
    policy = config.syscalls or seccomp.DEFAULT_POLICY
    # An allow list is the command's own to load (reaper.CommandSetup): pid 1 could not reap
    # under it. Pid 1 keeps the terminal guard, and leaves the one listener a chain of filters
    # may have to the command's filter.
    pid1_policy, notify = (seccomp.GUARD_POLICY, False) if policy.is_allow_list \
        else (policy, config.notify)
    capset = lib.syscall_number("capset")
    err = libc.prctl(PR_CAPBSET_DROP, CAP_SYS_ADMIN)
    if not err:
        err = libc.drop_capability(CAP_SYS_ADMIN, capset) if capset is not None else -1
    if err:
        reason = os.strerror(err) if err > 0 else "libseccomp does not know capset"
        raise SetupError(f"tapbox: dropping CAP_SYS_ADMIN in the sandbox: {reason}")
    if not config.nest:
        forbid_user_namespaces(libc, capset)
    err = libc.prctl(PR_SET_NO_NEW_PRIVS, 1)
    if err:
        raise SetupError(f"tapbox: cannot set no_new_privs in the sandbox: {os.strerror(err)}")
    notes: dict[str, str] = {}
    if config.landlock:
        from tapbox.isolate import landlock

        try:
            notes["landlock"] = landlock.enforce(plan)
        except OSError as e:
            raise SetupError(f"tapbox: --landlock: {e.strerror}: run without --landlock") from None
    installed = seccomp.install(pid1_policy, lib, notify=notify)
    if installed.unnamed_because:
        notes["unnamed"] = installed.unnamed_because
    return installed.listener, notes


def _legacy_clone_nr() -> int | None:
    """clone(2)'s number, for where clone3 is refused with ENOSYS; libseccomp numbers it."""
    try:
        from tapbox.isolate import seccomp

        return seccomp.Libseccomp().syscall_number("clone")
    except SetupError:
        return None


def _close_inherited_fds(keep: int) -> None:
    """Close every close-on-exec fd (tapbox's own: its record files, sockets, pipes) but
    `keep`. Inheritable fds are the caller's to pass to the command, as any wrapper does."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2 or fd == keep:
            continue
        try:
            if fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
                os.close(fd)
        except OSError:  # the directory's own fd, already closed
            pass


def _report(sock: socket.socket, message: str) -> None:
    line = " ".join(message.split())  # one line
    with contextlib.suppress(OSError):
        sock.send(MSG_ERROR + line.encode("utf-8", "replace")[:4000])
