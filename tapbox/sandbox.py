"""The sandbox process: namespaces, tap0, a private resolv.conf, then exec of the user's command.

Theory of operation
-------------------
`Sandbox.spawn()` forks once, before trio or any thread starts. The child:

1. blocks every signal (so nothing interrupts set-up half way: a Ctrl-C typed now stays pending and
   kills the child, with default dispositions, just before exec), sets PR_SET_PDEATHSIG=SIGKILL;
2. unshares a user namespace, writes setgroups=deny and one-line uid/gid maps (caller's uid -> same
   number, or -> 0 with --root), then unshares net + mount namespaces and makes every mount private;
3. opens /dev/net/tun (after the netns unshare: a TAP belongs to the netns that opened the file) and
   creates tap0 (IFF_TAP | IFF_NO_PI), mounts a fresh sysfs on /sys (best effort: /sys/class/net
   then shows the sandbox's links; the old submounts such as /sys/fs/cgroup are carried over),
   brings lo up and configures tap0 with pyroute2: mtu, 10.0.2.100/24, up, default via 10.0.2.2;
4. bind-mounts the resolv.conf the parent wrote over /etc/resolv.conf (or over its symlink target);
5. sends b"R" and the TAP fd (SCM_RIGHTS) over a SOCK_SEQPACKET socketpair, closes its copy, and
   blocks until the parent sends b"G" (`start()`). EOF instead (tapbox died or gave up) means
   _exit(125) without exec: fail closed, CMD never runs without the firewall;
6. restores signal dispositions (caught -> default; SIGPIPE/SIGXFSZ, which Python ignores, ->
   default; an ignore inherited from tapbox's own parent, e.g. nohup, is kept, as subprocess does)
   and an empty signal mask, then execvp(argv). On failure: "tapbox: CMD: strerror" and exit 127
   (not found) or 126 (anything else), as env(1).

A failure before exec is sent to the parent as b"E" + one line, which spawn() raises as SetupError.
All fds are O_CLOEXEC, so neither the TAP fd nor the control socket reach CMD.

PR_SET_PDEATHSIG (SIGKILL) is kept across exec on purpose: if tapbox dies, the TAP dies with it and
the sandbox has no network anyway; killing CMD makes that failure visible instead of leaving a
command running with a dead network. The signal fires when the *thread* that forked exits, so
spawn() must be called from the thread that lives as long as tapbox (the main thread).

Signals and the terminal
------------------------
CMD inherits stdin/stdout/stderr, the session and the controlling terminal, and starts in tapbox's
process group. Signals typed at the terminal (Ctrl-C, Ctrl-\\, window resize) therefore reach CMD
directly from the tty. An interactive shell in the sandbox moves itself to its own process group
and takes the terminal (job control works as usual); tapbox then sits in a background group.

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

Suggested use (cli)::

    fwd = SignalForwarder()              # main thread, before any thread and before spawn()
    sb = Sandbox.spawn(config)           # raises SetupError -> exit 125
    fwd.start(sb.pid)
    ... trio.run(engine, sb)             # engine reads sb.tap_fd, calls sb.start() once ready,
                                         # and `await sb.wait()` for the exit code
    fwd.stop()
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import os
import re
import signal
import socket
import stat
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NoReturn

from tapbox.errors import (
    EXIT_CANNOT_EXECUTE,
    EXIT_NOT_FOUND,
    EXIT_SIGNAL_BASE,
    EXIT_TAPBOX_FAILED,
    SetupError,
    exit_status_for_signal,
)

__all__ = [
    "SetupError",
    "SandboxConfig",
    "Sandbox",
    "SignalForwarder",
    "FORWARDED_SIGNALS",
    "TAP_NAME",
    "TAP_ADDRESS",
    "TAP_PREFIXLEN",
    "GATEWAY_ADDRESS",
    "DNS_ADDRESS",
    "TAP_ADDRESS6",
    "GATEWAY_ADDRESS6",
    "DNS_ADDRESS6",
]

# slirp4netns' well-known layout, so users' habits carry over.
TAP_NAME = "tap0"
TAP_ADDRESS = "10.0.2.100"
TAP_PREFIXLEN = 24
GATEWAY_ADDRESS = "10.0.2.2"
DNS_ADDRESS = "10.0.2.3"
TAP_ADDRESS6 = "fd00::100"
TAP_PREFIXLEN6 = 64
GATEWAY_ADDRESS6 = "fd00::2"
DNS_ADDRESS6 = "fd00::3"
_IFA_F_NODAD = 0x02  # the address is ours alone on this link: skip duplicate detection
RESOLV_CONF = "/etc/resolv.conf"
TUN_DEVICE = "/dev/net/tun"

# How long spawn() waits for the child to report set-up done (pyroute2's import alone is ~0.2 s).
SETUP_TIMEOUT = 60.0


# Control messages on the socketpair.
_MSG_READY = b"R"  # child -> parent, with the TAP fd as SCM_RIGHTS when network=True
_MSG_ERROR = b"E"  # child -> parent, followed by one utf-8 line
_MSG_GO = b"G"  # parent -> child: exec now

# <sched.h>, <sys/mount.h>, <linux/prctl.h>, <linux/if_tun.h>, <linux/mount.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2
PR_SET_PDEATHSIG = 1
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000  # every frame carries a virtio-net header (netstack.wire.vnet)
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
TUN_F_CSUM = 0x01  # we accept frames whose TCP/UDP checksum the kernel left for later
IFNAMSIZ = 16
_IFREQ = struct.Struct(f"{IFNAMSIZ}sH22x")  # struct ifreq: name, ifr_flags, union padding (40 B)
# open_tree(2) / move_mount(2): the same numbers on every architecture (new-style syscalls).
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
OPEN_TREE_CLONE = 0x1
AT_RECURSIVE = 0x8000
AT_FDCWD = -100
MOVE_MOUNT_F_EMPTY_PATH = 0x4

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


@dataclass
class SandboxConfig:
    """What to run and how the sandbox looks from inside."""

    argv: list[str]
    network: bool = True  # False = `-n`: only lo, no TAP (no engine), no resolv.conf
    mtu: int = 65520
    root: bool = False  # --root: uid/gid 0 inside (fakeroot), else the caller's uid/gid numbers
    resolv_conf: str = f"nameserver {DNS_ADDRESS}\n"
    ipv6: bool = False  # also fd00::100/64 on tap0, default route via fd00::2
    vnet_hdr: bool = True  # IFF_VNET_HDR with checksum offload (the engine must expect it)


class _ChildFailure(Exception):
    """Raised in the child before exec; str() is the one-line message the parent raises."""


# --------------------------------------------------------------------------------------------
# Parent side


class Sandbox:
    """A forked, fully set-up sandbox child waiting for `start()` to exec its command."""

    pid: int
    tap_fd: int | None

    def __init__(self, pid: int, sock: socket.socket, pidfd: int | None) -> None:
        self.pid = pid
        self.tap_fd = None
        self._sock: socket.socket | None = sock
        self._pidfd = pidfd
        self._status: int | None = None
        self._wait_lock = threading.Lock()
        self._trio_waiting = False

    @classmethod
    def spawn(cls, config: SandboxConfig,
              meanwhile: Callable[[], object] | None = None) -> Sandbox:
        """Fork the child and return once it is set up (TAP fd received) and waiting for start().

        Call it before trio.run() or any thread starts, from the main thread.
        `meanwhile` runs in the parent while the child sets up (e.g. the engine's imports: the
        two overlap on a multi-core machine). Raises SetupError naming cause and fix.
        """
        if not config.argv:
            raise SetupError("tapbox: no command given: usage: tapbox [OPTIONS] -- CMD [ARGS...]")
        uid, gid = os.getuid(), os.getgid()
        resolv_path = _write_resolv_conf(config.resolv_conf) if config.network else None
        try:
            parent_sock, child_sock = socket.socketpair(
                socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
            )
            parent_pid = os.getpid()
            try:
                pid = os.fork()
            except OSError as e:
                parent_sock.close()
                child_sock.close()
                raise SetupError(f"tapbox: cannot fork the sandbox process: {e.strerror}") from e
            if pid == 0:  # pragma: no cover - the child leaves through os._exit or exec
                parent_sock.close()
                _child_main(config, child_sock, parent_pid, uid, gid, resolv_path)
            child_sock.close()
            # Our unreaped child: its pid cannot be reused before we wait for it.
            try:
                pidfd: int | None = os.pidfd_open(pid)
            except OSError:  # kernel < 5.3
                pidfd = None
            sandbox = cls(pid, parent_sock, pidfd)
            try:
                if meanwhile is not None:
                    meanwhile()
                sandbox.tap_fd = sandbox._receive_ready(config.network)
            except BaseException:
                sandbox.kill()
                sandbox.wait_status()
                sandbox.close()
                raise
            return sandbox
        finally:
            # The child has bind-mounted it (the mount keeps the inode) or failed: either way the
            # name is no longer needed.
            if resolv_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(resolv_path)

    def _receive_ready(self, network: bool) -> int | None:
        assert self._sock is not None
        self._sock.settimeout(SETUP_TIMEOUT)
        try:
            msg, fds = _recv_with_fds(self._sock)
        except TimeoutError:
            raise SetupError(
                f"tapbox: the sandbox process did not finish set-up within {SETUP_TIMEOUT:.0f} s: "
                "is the machine overloaded?"
            ) from None
        self._sock.settimeout(None)
        if msg.startswith(_MSG_READY):
            if not network:
                for fd in fds:
                    os.close(fd)
                return None
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise SetupError(
                    "tapbox: internal error: the TAP fd did not arrive from the sandbox"
                )
            os.set_blocking(fds[0], False)
            return fds[0]
        for fd in fds:
            os.close(fd)
        if msg.startswith(_MSG_ERROR):
            raise SetupError(msg[1:].decode("utf-8", "replace").strip())
        code = self.wait_status()
        if code > EXIT_SIGNAL_BASE:
            raise SetupError(
                f"tapbox: the sandbox process was killed by signal {code - EXIT_SIGNAL_BASE} "
                "during set-up (out of memory? killed by someone?): try again"
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
        with contextlib.suppress(OSError):  # child already gone: wait_status() tells how
            sock.send(_MSG_GO, socket.MSG_NOSIGNAL)
        sock.close()

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
                self._status = exit_status_for_signal(-code) if code < 0 else code
                if not self._trio_waiting:
                    self._close_pidfd()
            return self._status

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
    def returncode(self) -> int | None:
        """The exit code once reaped, else None."""
        return self._status

    def close(self) -> None:
        """Close the control socket and the pidfd (not tap_fd, which belongs to the engine).

        Closing the control socket before start() makes the child exit 125 without exec.
        """
        if self._sock is not None:
            self._sock.close()
            self._sock = None
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


def _write_resolv_conf(content: str) -> str:
    """Write the sandbox's resolv.conf (0644) where the child (same kernel uid) can reach it."""
    import tempfile  # only with network: keeps `tapbox -n` start-up lean

    candidates = [os.environ.get("XDG_RUNTIME_DIR", ""), tempfile.gettempdir(), "/tmp"]
    last: OSError | None = None
    for directory in candidates:
        if not directory or not os.access(directory, os.W_OK | os.X_OK):
            continue
        try:
            fd, path = tempfile.mkstemp(prefix="tapbox-resolv-", suffix=".conf", dir=directory)
        except OSError as e:
            last = e
            continue
        with open(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(content)
        return path
    reason = f": {last.strerror}" if last is not None else ""
    raise SetupError(
        f"tapbox: cannot write a temporary resolv.conf in $XDG_RUNTIME_DIR or /tmp{reason}: "
        "make /tmp writable or set TMPDIR to a writable directory"
    )


# --------------------------------------------------------------------------------------------
# Child side (between fork and exec)


def _child_main(
    config: SandboxConfig,
    sock: socket.socket,
    parent_pid: int,
    uid: int,
    gid: int,
    resolv_path: str | None,
) -> NoReturn:
    """Runs in the forked child; never returns (exec or os._exit)."""
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        libc = _Libc()
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # tapbox died before prctl took effect
            os._exit(EXIT_TAPBOX_FAILED)
        tap_fd = _set_up(libc, config, uid, gid, resolv_path)
        if tap_fd is None:
            sock.send(_MSG_READY)
        else:
            socket.send_fds(sock, [_MSG_READY], [tap_fd])
            os.close(tap_fd)  # the parent owns it now; CMD must never hold it
        if sock.recv(16) != _MSG_GO:  # EOF: tapbox died or gave up -> never run CMD
            os._exit(EXIT_TAPBOX_FAILED)
        sock.close()
        _restore_signals(libc)
        _exec(config.argv)
    except _ChildFailure as e:
        _report(sock, str(e))
    except BaseException as e:  # noqa: B036 - anything at all must end in _exit, never return
        _report(sock, f"tapbox: sandbox set-up failed: {type(e).__name__}: {e}")
    os._exit(EXIT_TAPBOX_FAILED)


def _report(sock: socket.socket, message: str) -> None:
    line = " ".join(message.split())  # one line
    with contextlib.suppress(OSError):
        sock.send(_MSG_ERROR + line.encode("utf-8", "replace")[:4000])


def _exec(argv: list[str]) -> NoReturn:
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        code = EXIT_NOT_FOUND if e.errno == errno.ENOENT else EXIT_CANNOT_EXECUTE
        reason = e.strerror or str(e)
        with contextlib.suppress(OSError):
            os.write(2, os.fsencode(f"tapbox: {argv[0]}: {reason}\n"))
        os._exit(code)


def _restore_signals(libc: _Libc) -> None:
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


def _set_up(
    libc: _Libc, config: SandboxConfig, uid: int, gid: int, resolv_path: str | None
) -> int | None:
    """Namespaces, id maps, mounts, links. Returns the TAP fd (None with network=False)."""
    host = _Host.collect()
    err = libc.unshare(CLONE_NEWUSER)
    if err:
        raise _ChildFailure(_unshare_failure("user", err, host))
    inner_uid, inner_gid = (0, 0) if config.root else (uid, gid)
    try:
        _write_proc("/proc/self/setgroups", "deny", missing_ok=True)
        _write_proc("/proc/self/uid_map", f"{inner_uid} {uid} 1\n")
        _write_proc("/proc/self/gid_map", f"{inner_gid} {gid} 1\n")
    except OSError as e:
        raise _ChildFailure(
            _eperm_failure(f"writing the user namespace's id maps: {e.strerror}", host)
        ) from e
    err = libc.unshare(CLONE_NEWNET | CLONE_NEWNS)
    if err:
        raise _ChildFailure(_unshare_failure("network and mount", err, host))
    err = libc.mount(None, "/", None, MS_REC | MS_PRIVATE)
    if err:
        raise _ChildFailure(_eperm_failure(f"making mounts private: {os.strerror(err)}", host))
    tap_fd = _open_tap(host, config.vnet_hdr) if config.network else None
    try:
        _remount_sysfs(libc)
        _configure_links(config, host)
        if config.network:
            assert resolv_path is not None
            _bind_resolv_conf(libc, resolv_path, host)
    except BaseException:
        if tap_fd is not None:
            os.close(tap_fd)
        raise
    return tap_fd


def _write_proc(path: str, content: str, missing_ok: bool = False) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        if missing_ok:  # kernels before 3.19 have no setgroups file
            return
        raise
    try:
        os.write(fd, content.encode())
    finally:
        os.close(fd)


def _open_tap(host: _Host, vnet_hdr: bool) -> int:
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise _ChildFailure(
            f"tapbox: {TUN_DEVICE} is missing: load the tun module (modprobe tun) or run tapbox -n"
        ) from None
    except PermissionError:
        raise _ChildFailure(_tun_permission_failure()) from None
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.ENODEV):
            raise _ChildFailure(
                f"tapbox: {TUN_DEVICE} exists but the tun driver is not loaded ({e.strerror}): "
                "load it (modprobe tun) or run tapbox -n"
            ) from None
        raise _ChildFailure(
            f"tapbox: cannot open {TUN_DEVICE}: {e.strerror}: run tapbox -n to go without network"
        ) from None
    try:
        flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
        fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(TAP_NAME.encode(), flags))
        if vnet_hdr:
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM)
    except OSError as e:
        os.close(fd)
        if e.errno == errno.EPERM:
            raise _ChildFailure(
                _eperm_failure(f"creating {TAP_NAME}: {e.strerror}", host)
            ) from None
        raise _ChildFailure(
            f"tapbox: cannot create {TAP_NAME} on {TUN_DEVICE}: {e.strerror}: "
            "is this kernel built with CONFIG_TUN? Run tapbox -n to go without network"
        ) from None
    return fd


def _tun_permission_failure() -> str:
    try:
        mode = stat.S_IMODE(os.stat(TUN_DEVICE).st_mode)
    except OSError:
        mode = None
    if mode is not None and mode & 0o006 != 0o006:
        return (
            f"tapbox: permission denied on {TUN_DEVICE} (mode {mode:04o}): make it usable by "
            f"everyone as mainstream distributions do: chmod 0666 {TUN_DEVICE} (or a udev rule "
            'KERNEL=="tun", MODE="0666"), or run tapbox -n'
        )
    return (
        f"tapbox: permission denied on {TUN_DEVICE} although its mode allows it: a device cgroup "
        "or security module forbids it (inside a container? pass the device in with "
        "--device /dev/net/tun), or run tapbox -n"
    )


def _configure_links(config: SandboxConfig, host: _Host) -> None:
    try:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError
    except ImportError as e:
        raise _ChildFailure(
            f"tapbox: cannot import pyroute2 ({e}): install it (pip install pyroute2)"
        ) from None
    step = "bringing lo up"
    try:
        with IPRoute() as ipr:
            ipr.link("set", index=1, state="up")  # lo is always ifindex 1 in a new netns
            if not config.network:
                return
            step = f"configuring {TAP_NAME}"
            (index,) = ipr.link_lookup(ifname=TAP_NAME)
            ipr.link("set", index=index, mtu=config.mtu)
            ipr.addr("add", index=index, address=TAP_ADDRESS, prefixlen=TAP_PREFIXLEN)
            ipr.link("set", index=index, state="up")
            step = f"adding the default route via {GATEWAY_ADDRESS}"
            ipr.route("add", dst="0.0.0.0/0", gateway=GATEWAY_ADDRESS)
            if config.ipv6:
                step = f"configuring IPv6 on {TAP_NAME} (use --ipv6 off if IPv6 is disabled)"
                ipr.addr("add", index=index, address=TAP_ADDRESS6, prefixlen=TAP_PREFIXLEN6,
                         flags=_IFA_F_NODAD)
                ipr.route("add", dst="::/0", gateway=GATEWAY_ADDRESS6, oif=index)
    except NetlinkError as e:
        if e.code == errno.EPERM:
            raise _ChildFailure(_eperm_failure(f"{step}: {e}", host)) from None
        if e.code == errno.EINVAL and step.startswith("configuring"):
            raise _ChildFailure(
                f"tapbox: {step}: {os.strerror(e.code)}: is the MTU {config.mtu} valid "
                "(68..65521 for a TAP)?"
            ) from None
        raise _ChildFailure(f"tapbox: {step} failed: {os.strerror(e.code)}") from None


def _bind_resolv_conf(libc: _Libc, source: str, host: _Host) -> None:
    target = os.path.realpath(RESOLV_CONF)
    if not os.path.isfile(target):
        where = RESOLV_CONF if target == RESOLV_CONF else f"{RESOLV_CONF} -> {target}"
        raise _ChildFailure(
            f"tapbox: {where} does not exist, so there is no file to mount the sandbox's "
            f"resolv.conf over: create it (as root: touch {target}) or run tapbox -n"
        )
    err = libc.mount(source, target, None, MS_BIND)
    if err:
        raise _ChildFailure(
            _eperm_failure(
                f"bind-mounting a private resolv.conf over {target}: {os.strerror(err)}",
                host,
            )
        )


def _remount_sysfs(libc: _Libc) -> None:
    """Best effort: a sysfs of the sandbox's netns on /sys, carrying the old submounts over.

    Without it /sys/class/net lists the host's interfaces. Any failure leaves /sys as it was.
    """
    submounts = _top_submounts("/sys")
    clones: list[tuple[str, int]] = []
    try:
        for path in submounts:
            fd = libc.open_tree(path, OPEN_TREE_CLONE | AT_RECURSIVE | os.O_CLOEXEC)
            if fd < 0:  # no open_tree (kernel < 5.2): keep the old /sys and its submounts
                return
            clones.append((path, fd))
        flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
        if libc.mount("sysfs", "/sys", "sysfs", flags) and libc.mount(
            "sysfs", "/sys", "sysfs", flags | MS_RDONLY
        ):
            return
        for path, fd in clones:
            if libc.move_mount(fd, path):
                libc.umount2("/sys", MNT_DETACH)  # back to the old /sys, submounts and all
                return
    finally:
        for _path, fd in clones:
            os.close(fd)


def _top_submounts(root: str) -> list[str]:
    """Mount points strictly below root, outermost only (shallowest first)."""
    points: list[str] = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4:
                    points.append(_unescape_mountinfo(fields[4]))
    except OSError:
        return []
    below = sorted((p for p in points if p.startswith(root + "/")), key=lambda p: p.count("/"))
    top: list[str] = []
    for p in below:
        if p not in top and not any(p.startswith(t + "/") for t in top):
            top.append(p)
    return top


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


# --------------------------------------------------------------------------------------------
# Diagnosis: one line naming the cause and the fix


_USERNS_CLONE = "/proc/sys/kernel/unprivileged_userns_clone"
_MAX_USERNS = "/proc/sys/user/max_user_namespaces"
_MAX_NETNS = "/proc/sys/user/max_net_namespaces"
_MAX_MNTNS = "/proc/sys/user/max_mnt_namespaces"
_APPARMOR_USERNS = "/proc/sys/kernel/apparmor_restrict_unprivileged_userns"
_SYSCTLS = (_USERNS_CLONE, _MAX_USERNS, _MAX_NETNS, _MAX_MNTNS, _APPARMOR_USERNS)


@dataclass(frozen=True)
class _Host:
    """What diagnosis needs, read before unshare(): /proc/sys/user/* is per user namespace."""

    unprivileged: bool
    sysctls: dict[str, str]  # path -> value, for the files that exist

    @classmethod
    def collect(cls) -> _Host:
        values: dict[str, str] = {}
        for path in _SYSCTLS:
            try:
                with open(path, encoding="ascii") as f:
                    values[path] = f.read().strip()
            except OSError:
                pass
        return cls(os.geteuid() != 0, values)

    def sysctl(self, path: str) -> str | None:
        return self.sysctls.get(path)


def _sysctl_name(path: str) -> str:
    return path.removeprefix("/proc/sys/").replace("/", ".")


def _apparmor_hint(host: _Host) -> str | None:
    if host.unprivileged and host.sysctl(_APPARMOR_USERNS) == "1":
        name = _sysctl_name(_APPARMOR_USERNS)
        return (
            f"AppArmor restricts unprivileged user namespaces ({name} = 1): allow them with "
            f"`sysctl -w {name}=0` or give tapbox's python an AppArmor profile with the "
            "`userns,` rule"
        )
    return None


def _unshare_failure(what: str, err: int, host: _Host) -> str:
    """Message for a failed unshare() of the user (what="user") or the net+mount namespaces."""
    noun = "namespace" if what == "user" else "namespaces"
    head = f"tapbox: cannot create the sandbox's {what} {noun}"
    limits = [_MAX_USERNS] if what == "user" else [_MAX_NETNS, _MAX_MNTNS]
    if what == "user" and host.unprivileged and host.sysctl(_USERNS_CLONE) == "0":
        name = _sysctl_name(_USERNS_CLONE)
        return (
            f"{head}: unprivileged user namespaces are disabled ({name} = 0): "
            f"enable them with `sysctl -w {name}=1`"
        )
    for path in limits:
        if host.sysctl(path) == "0":
            name = _sysctl_name(path)
            return f"{head}: disabled by {name} = 0: enable them with `sysctl -w {name}=15000`"
    if err == errno.ENOSPC:
        names = " and ".join(f"{_sysctl_name(p)} (now {host.sysctl(p) or '?'})" for p in limits)
        return f"{head}: the limit on namespaces is reached (ENOSPC): raise {names} with sysctl -w"
    if err == errno.EPERM:
        hint = _apparmor_hint(host)
        if hint is not None:
            return f"{head}: {hint}"
        return (
            f"{head}: Operation not permitted: namespaces are forbidden here (a container's "
            "seccomp profile, or a chroot?): run tapbox on the host or allow unshare(2) and user "
            "namespaces in the container"
        )
    if err == errno.EINVAL:
        return f"{head}: {os.strerror(err)}: this kernel lacks namespace support (CONFIG_USER_NS)"
    return f"{head}: {os.strerror(err)}"


def _eperm_failure(step: str, host: _Host) -> str:
    """A step after the user namespace exists failed (usually EPERM)."""
    hint = _apparmor_hint(host)
    if hint is not None:
        return f"tapbox: {step}: {hint}"
    return f"tapbox: {step}: a security module or seccomp profile may forbid it; try tapbox -n"


# --------------------------------------------------------------------------------------------
# libc through ctypes (Python 3.11 has no os.unshare)


class _Libc:
    """The few libc calls tapbox needs; methods return 0 or an errno (open_tree: fd or -errno)."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(None, use_errno=True)
        self._unshare = lib.unshare
        self._unshare.argtypes = [ctypes.c_int]
        self._mount = lib.mount
        self._mount.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_void_p,
        ]
        self._umount2 = lib.umount2
        self._umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        self._prctl = lib.prctl
        self._prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
        self._syscall = lib.syscall
        self._syscall.restype = ctypes.c_long
        self._signal = lib.signal
        self._signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
        self._signal.restype = ctypes.c_void_p

    @staticmethod
    def _result(rc: int) -> int:
        return ctypes.get_errno() if rc == -1 else 0

    def unshare(self, flags: int) -> int:
        return self._result(self._unshare(flags))

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int) -> int:
        def b(s: str | None) -> bytes | None:
            return None if s is None else os.fsencode(s)

        return self._result(self._mount(b(source), b(target), b(fstype), flags, None))

    def umount2(self, target: str, flags: int) -> int:
        return self._result(self._umount2(os.fsencode(target), flags))

    def prctl(self, option: int, arg2: int) -> int:
        return self._result(self._prctl(option, arg2, 0, 0, 0))

    def open_tree(self, path: str, flags: int) -> int:
        fd = self._syscall(
            ctypes.c_long(SYS_OPEN_TREE),
            ctypes.c_int(AT_FDCWD),
            ctypes.c_char_p(os.fsencode(path)),
            ctypes.c_uint(flags),
        )
        return int(fd) if fd >= 0 else -ctypes.get_errno()

    def move_mount(self, fd: int, to_path: str) -> int:
        rc = self._syscall(
            ctypes.c_long(SYS_MOVE_MOUNT),
            ctypes.c_int(fd),
            ctypes.c_char_p(b""),
            ctypes.c_int(AT_FDCWD),
            ctypes.c_char_p(os.fsencode(to_path)),
            ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
        )
        return self._result(rc)

    def set_default_signal(self, signo: int) -> None:
        # libc rather than signal.signal(): works whichever thread forked.
        self._signal(signo, None)  # SIG_DFL is the null handler


# --------------------------------------------------------------------------------------------
# Signal forwarding


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

    def restore(self) -> None:
        """Restore the signal mask of the calling thread (the one that created the forwarder).

        Signals that arrived meanwhile are then delivered to tapbox itself.
        """
        self.stop()
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
