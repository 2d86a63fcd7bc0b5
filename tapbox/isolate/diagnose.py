"""Why a set-up step failed, in one line that names the cause and the fix.

How this works: the kernel answers a refused unshare(2), mount(2) or TAP ioctl with a bare errno
(EPERM, ENOSPC, EINVAL). What refused it is told apart with facts read before the sandbox
exists (`Host.collect()`: the namespace sysctls, which are per user namespace and so must be read
before unshare, and whether tapbox runs unprivileged): a disabled or exhausted namespace limit,
Ubuntu's AppArmor restriction of unprivileged user namespaces, a container's seccomp profile, the
mode of /dev/net/tun, and which user namespace tapbox itself runs in (the host's; another
sandbox's or an `unshare -U` shell's, where a limit may come from the sandbox around it; or one
where tapbox's uid has no mapping, in which no user namespace can be created). Each function
returns the message; the caller raises it as a SetupError.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

USERNS_CLONE = "/proc/sys/kernel/unprivileged_userns_clone"
MAX_USERNS = "/proc/sys/user/max_user_namespaces"
MAX_NETNS = "/proc/sys/user/max_net_namespaces"
MAX_MNTNS = "/proc/sys/user/max_mnt_namespaces"
MAX_PIDNS = "/proc/sys/user/max_pid_namespaces"
MAX_IPCNS = "/proc/sys/user/max_ipc_namespaces"
MAX_UTSNS = "/proc/sys/user/max_uts_namespaces"
APPARMOR_USERNS = "/proc/sys/kernel/apparmor_restrict_unprivileged_userns"
SYSCTLS = (USERNS_CLONE, MAX_USERNS, MAX_NETNS, MAX_MNTNS, MAX_PIDNS, MAX_IPCNS, MAX_UTSNS,
           APPARMOR_USERNS)


@dataclass(frozen=True)
class Host:
    """What diagnosis needs, read before unshare(): /proc/sys/user/* is per user namespace."""

    unprivileged: bool
    sysctls: dict[str, str]  # path -> value, for the files that exist
    # The user namespace tapbox runs in: "initial" (the host's), "nested" (a sandbox's, a
    # container's, an `unshare -U` shell's) or "unmapped" (tapbox's uid has no mapping there).
    userns: str = "initial"

    @classmethod
    def collect(cls) -> Host:
        values: dict[str, str] = {}
        for path in SYSCTLS:
            try:
                with open(path, encoding="ascii") as f:
                    values[path] = f.read().strip()
            except OSError:
                pass
        return cls(os.geteuid() != 0, values, _which_userns())

    def sysctl(self, path: str) -> str | None:
        return self.sysctls.get(path)


def _which_userns() -> str:
    try:
        with open("/proc/self/uid_map", encoding="ascii") as f:
            lines = f.read().split("\n")
    except OSError:
        return "initial"
    maps = [line.split() for line in lines if line.strip()]
    if not maps:
        return "unmapped"
    if maps == [["0", "0", "4294967295"]]:
        return "initial"
    uid = os.geteuid()
    for inside, _outside, count in maps:
        if int(inside) <= uid < int(inside) + int(count):
            return "nested"
    return "unmapped"


NESTED_HINT = ("; inside another sandbox, that sandbox may forbid it (tapbox --no-nest, "
               "bwrap --disable-userns): start the outer one without that option")


def sysctl_name(path: str) -> str:
    return path.removeprefix("/proc/sys/").replace("/", ".")


def apparmor_hint(host: Host) -> str | None:
    if host.unprivileged and host.sysctl(APPARMOR_USERNS) == "1":
        name = sysctl_name(APPARMOR_USERNS)
        return (
            f"AppArmor restricts unprivileged user namespaces ({name} = 1): allow them with "
            f"`sysctl -w {name}=0` or give tapbox's python an AppArmor profile with the "
            "`userns,` rule"
        )
    return None


OTHER_NAMESPACES = "network, mount, PID, IPC and UTS"


def unshare_failure(what: str, err: int, host: Host) -> str:
    """Message for a failed unshare() of the user namespace (what="user") or of the others."""
    noun = "namespace" if what == "user" else "namespaces"
    head = f"tapbox: cannot create the sandbox's {what} {noun}"
    if what == "user" and host.userns == "unmapped":
        return (
            f"{head}: tapbox's user id has no mapping in the user namespace it runs in (an "
            "`unshare -U` shell without -r or --map-current-user?): the kernel creates no user "
            "namespace there; give it a mapping (unshare -U --map-current-user)"
        )
    nested = NESTED_HINT if host.userns == "nested" else ""
    limits = [MAX_USERNS] if what == "user" else [MAX_NETNS, MAX_MNTNS, MAX_PIDNS, MAX_IPCNS,
                                                    MAX_UTSNS]
    if what == "user" and host.unprivileged and host.sysctl(USERNS_CLONE) == "0":
        name = sysctl_name(USERNS_CLONE)
        return (
            f"{head}: unprivileged user namespaces are disabled ({name} = 0): "
            f"enable them with `sysctl -w {name}=1`"
        )
    for path in limits:
        if host.sysctl(path) == "0":
            name = sysctl_name(path)
            return (f"{head}: disabled by {name} = 0: enable them with "
                    f"`sysctl -w {name}=15000`{nested}")
    if err == errno.ENOSPC:
        names = " and ".join(f"{sysctl_name(p)} (now {host.sysctl(p) or '?'})" for p in limits)
        return (f"{head}: the limit on namespaces is reached (ENOSPC): raise {names} with "
                f"sysctl -w{nested}")
    if err == errno.EPERM:
        hint = apparmor_hint(host)
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


def eperm_failure(step: str, host: Host) -> str:
    """A step after the user namespace exists failed (usually EPERM)."""
    hint = apparmor_hint(host)
    if hint is not None:
        return f"tapbox: {step}: {hint}"
    return f"tapbox: {step}: a security module or seccomp profile may forbid it; try tapbox -n"


def mount_failure(step: str, err: int, host: Host, fix: str | None = None,
                  own_view: bool = True) -> str:
    """A mount (or another step of building the sandbox's filesystem) failed with `err`;
    `own_view`: the sandbox was building a view of its own (--fs host mounts less)."""
    reason = f": {os.strerror(err)}" if err else ""
    hint = apparmor_hint(host)
    if hint is not None:
        return f"tapbox: {step}{reason}: {hint}"
    if fix is not None:
        return f"tapbox: {step}{reason}: {fix}"
    if not own_view:
        return eperm_failure(f"{step}{reason}", host)
    if err == errno.ENOSYS:
        return (f"tapbox: {step}{reason}: the sandbox's view needs Linux 5.12 or later "
                "(mount_setattr): upgrade, or run with --fs host")
    if err in (errno.EPERM, errno.EACCES):
        return (f"tapbox: {step}{reason}: mounting is forbidden here (a container without "
                "mount rights, a security module or a seccomp profile?): run tapbox on the "
                "host, or with --fs host")
    return f"tapbox: {step}{reason}: run with --fs host to use the host's files as they are"


def tun_missing(device: str, host: Host) -> str:
    """The TUN device does not exist: no tun module, or a sandbox around this one hides it."""
    if host.userns == "nested":
        return (
            f"tapbox: {device} is missing here: inside another sandbox, give that one the "
            f"device (tapbox --write {device}; bwrap --dev-bind {device} {device}), or run this "
            "one with -n"
        )
    return f"tapbox: {device} is missing: load the tun module (modprobe tun) or run tapbox -n"


def tun_permission_failure(device: str) -> str:
    """Opening the TUN device was refused: its mode, or something above it (cgroup, LSM)."""
    try:
        mode = stat.S_IMODE(os.stat(device).st_mode)
    except OSError:
        mode = None
    if mode is not None and mode & 0o006 != 0o006:
        return (
            f"tapbox: permission denied on {device} (mode {mode:04o}): make it usable by "
            f"everyone as mainstream distributions do: chmod 0666 {device} (or a udev rule "
            'KERNEL=="tun", MODE="0666"), or run tapbox -n'
        )
    return (
        f"tapbox: permission denied on {device} although its mode allows it: a device cgroup "
        "or security module forbids it (inside a container? pass the device in with "
        "--device /dev/net/tun), or run tapbox -n"
    )
