"""Executing a Plan (tapbox.isolate.plan): one function per kind of operation.

How this works: `apply()` runs the operations in order in pid 1 of the sandbox, inside its own
user and mount namespaces, where every mount is already private. A failure that would leave the
sandbox with less isolation than planned raises SetupError (one line: the mount, the reason,
the fix); only the fresh sysfs of the host view is best effort (the old /sys stays).

Building a new root (the project view), as bubblewrap does: `NewRoot` mounts a tmpfs on /tmp
(in this mount namespace only) and pivot_root()s into it, putting the host's tree at /oldroot;
an empty tmpfs on /newroot is the sandbox's root to be. From then on an operation finds its
`source` under /oldroot and puts its `path` under /newroot (`_Context.source()/.dest()`), and a
missing mount point is created (a directory or an empty file: only ever on a tmpfs of tapbox's
own or in the copy-on-write home, since every path it mounts over exists on the host).
`PivotRoot` makes /newroot the root with pivot_root(".", "."), detaches what was the root (the
host's tree with it), and enters the working directory. The home directory's upper layer lives on
a tmpfs of its own, under /layers: pid 1 hands tapbox a descriptor of it (`Applied.layer_fd`),
so tapbox can count what was written there once the sandbox is gone.

Two ways to make a mount read-only: a whole tree (`Libc.make_read_only`: mount_setattr with
AT_RECURSIVE, Linux >= 5.12, so a host directory's submounts are read-only too), or one mount
(`_remount_read_only`: MS_REMOUNT keeping the flags the kernel locks in a user namespace).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

from tapbox.errors import SetupError
from tapbox.isolate.diagnose import Host, mount_failure
from tapbox.isolate.libc import (
    AT_RECURSIVE,
    MNT_DETACH,
    MS_BIND,
    MS_NOATIME,
    MS_NODEV,
    MS_NODIRATIME,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_REC,
    MS_RELATIME,
    MS_REMOUNT,
    MS_STRICTATIME,
    OPEN_TREE_CLONE,
    Libc,
)
from tapbox.isolate.plan import (
    Bind,
    BindFile,
    Device,
    Devpts,
    FreshProc,
    FreshSysfs,
    Hide,
    HomeOverlay,
    KeptLayer,
    KeptOverlay,
    NewRoot,
    Pin,
    PivotRoot,
    Plan,
    ReadOnly,
    ReadOnlyFile,
    Symlink,
    Tmpfs,
)

STAGING = "/tmp"  # covered by a tmpfs in this mount namespace while the new root is built
OLD_ROOT = "/oldroot"
NEW_ROOT = "/newroot"
HOME_LAYER = "/layers/home"  # its own tmpfs: N/lower (a bind of the host's directory), N/upper,
# N/work for each copy-on-write layer N
KEPT_LAYER = "/layers/kept"  # the kept layer directory (upper/N, work/N), bound here
KEPT_LOWER = "/layers/lower"  # N: a bind of the host's directory of kept layer N
# redirect_dir=nofollow: renaming a directory of the host copies it (mv falls back to copy and
# delete), so a layer never holds a redirect to another path; metacopy=off: every file in
# the layer holds its data. What the layer holds is then plain to read and to commit.
KEPT_OPTIONS = "userxattr,redirect_dir=nofollow,metacopy=off"
DEVPTS_OPTIONS = "newinstance,ptmxmode=0666,mode=620"
EMPTY_FILE = "/empty"  # on the staging tmpfs: what a hidden file shows (never unlinked)


class Applied:
    """What executing the plan leaves for tapbox: a descriptor of the tmpfs holding the home's
    layers (HOME_LAYER: N/upper is layer N's)."""

    layer_fd: int | None = None


class _Context:
    def __init__(self, libc: Libc, host: Host) -> None:
        self.libc = libc
        self.host = host
        self.old = ""  # where the host's tree is: "" (the root) or OLD_ROOT
        self.new = ""  # where the sandbox's tree is built: "" (the root) or NEW_ROOT
        self.applied = Applied()
        self.own_view = False  # building a view of its own (the project view)
        self.pivot_root_nr = 0

    def source(self, path: str) -> str:
        return self.old + path

    def dest(self, path: str) -> str:
        return self.new + path

    @property
    def building(self) -> bool:
        return bool(self.new)

    def fail(self, step: str, err: int, fix: str | None = None) -> SetupError:
        return SetupError(mount_failure(step, err, self.host, fix, self.own_view))


def apply(plan: Plan, libc: Libc, host: Host) -> Applied:
    ctx = _Context(libc, host)
    try:
        for op in plan.ops:
            _EXECUTORS[type(op)](ctx, op)
    except BaseException:
        if ctx.applied.layer_fd is not None:
            os.close(ctx.applied.layer_fd)
        raise
    return ctx.applied


# ------------------------------------------------------------------------------------------------
# The new root


def new_root(ctx: _Context, op: NewRoot) -> None:
    libc = ctx.libc
    ctx.own_view = True
    ctx.pivot_root_nr = _syscall_number("pivot_root")  # libseccomp, loaded from the host's tree
    err = libc.mount("tmpfs", STAGING, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700")
    if err:
        raise ctx.fail(f"mounting a tmpfs on {STAGING} to build the sandbox's root in", err)
    for name in (OLD_ROOT, NEW_ROOT, "/layers"):
        os.mkdir(STAGING + name, 0o700)
    os.close(os.open(STAGING + EMPTY_FILE, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0))
    err = libc.pivot_root(STAGING, STAGING + OLD_ROOT, ctx.pivot_root_nr)
    if err:
        raise ctx.fail("pivot_root into the tmpfs the sandbox's root is built in", err)
    os.chdir("/")
    err = libc.mount("tmpfs", NEW_ROOT, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    if err:
        raise ctx.fail("mounting the tmpfs of the sandbox's root", err)
    ctx.old, ctx.new = OLD_ROOT, NEW_ROOT


def pivot(ctx: _Context, op: PivotRoot) -> None:
    libc = ctx.libc
    os.chdir(NEW_ROOT)
    err = libc.pivot_root(".", ".", ctx.pivot_root_nr)
    if err:
        raise ctx.fail("pivot_root into the sandbox's root", err)
    err = libc.umount2(".", MNT_DETACH)  # the old root, stacked on the new one
    if err:
        raise ctx.fail("detaching the host's tree from the sandbox", err)
    os.chdir("/")
    ctx.old = ctx.new = ""
    try:
        os.chdir(op.cwd)
    except OSError as e:
        raise SetupError(
            f"tapbox: the working directory {op.cwd} is not in the sandbox ({e.strerror}): it "
            "is hidden or below a --tmpfs; run tapbox from another directory or show it with "
            "--read/--write") from None


def bind(ctx: _Context, op: Bind) -> None:
    dest = ctx.dest(op.dest)
    _mount_point(ctx, dest, op.directory, f"to bind {op.source} on")
    err = ctx.libc.mount(ctx.source(op.source), dest, None, MS_BIND | MS_REC)
    what = f"{op.source}" + (f" ({op.purpose})" if op.purpose else "")
    if err:
        raise ctx.fail(f"binding {what}", err)
    if not op.writable:
        err = ctx.libc.make_read_only(dest)
        if err:
            raise ctx.fail(f"making {what} read-only", err)


def symlink(ctx: _Context, op: Symlink) -> None:
    path = ctx.dest(op.path)
    try:
        os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
        os.symlink(op.target, path)
    except OSError as e:
        raise SetupError(f"tapbox: creating the symlink {op.path} -> {op.target} in the "
                         f"sandbox: {e.strerror}") from None


def tmpfs(ctx: _Context, op: Tmpfs) -> None:
    dest = ctx.dest(op.path)
    _mount_point(ctx, dest, True, "for a tmpfs")
    err = ctx.libc.mount("tmpfs", dest, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={op.mode:o}")
    if err:
        raise ctx.fail(f"mounting a tmpfs on {op.path}", err)


def device(ctx: _Context, op: Device) -> None:
    dest = ctx.dest(op.path)
    _mount_point(ctx, dest, False, "to bind the device on")
    err = ctx.libc.mount(ctx.source(op.path), dest, None, MS_BIND)
    if err:
        raise ctx.fail(f"binding the device {op.path}", err)


def devpts(ctx: _Context, op: Devpts) -> None:
    dest = ctx.dest(op.path)
    _mount_point(ctx, dest, True, "for devpts")
    err = ctx.libc.mount("devpts", dest, "devpts", MS_NOSUID | MS_NOEXEC, DEVPTS_OPTIONS)
    if err:
        raise ctx.fail(f"mounting a new devpts instance on {op.path} (for terminals)", err)


def home_overlay(ctx: _Context, op: HomeOverlay) -> None:
    """Layer N's directory on the layers' tmpfs (mounted with the first layer; tapbox gets a
    descriptor of it) holds lower (a bind of the host's directory: fixed names, so no path of
    the user's goes into the overlay's options, which split at commas), upper and work."""
    libc, layers = ctx.libc, HOME_LAYER
    if ctx.applied.layer_fd is None:
        os.mkdir(layers, 0o700)
        err = libc.mount("tmpfs", layers, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700")
        if err:
            raise ctx.fail("mounting the tmpfs for the home directory's throwaway layer", err)
        ctx.applied.layer_fd = os.open(layers, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    layer = f"{layers}/{op.layer}"
    mode = os.stat(ctx.source(op.path)).st_mode & 0o7777
    os.mkdir(layer, 0o700)
    os.mkdir(f"{layer}/lower", 0o700)
    os.mkdir(f"{layer}/upper", mode)
    os.chmod(f"{layer}/upper", mode)  # whatever the umask took away
    os.mkdir(f"{layer}/work", 0o700)
    err = libc.mount(ctx.source(op.path), f"{layer}/lower", None, MS_BIND | MS_REC)
    if err:
        raise ctx.fail(f"binding {op.path} to make it copy-on-write", err)
    dest = ctx.dest(op.path)
    _mount_point(ctx, dest, True, "for the copy-on-write home")
    options = f"lowerdir={layer}/lower,upperdir={layer}/upper,workdir={layer}/work,userxattr"
    err = libc.mount("overlay", dest, "overlay", MS_NOSUID | MS_NODEV, options)
    if err:
        raise ctx.fail(
            f"overlay on {op.path} (the copy-on-write home)", err,
            "overlayfs in a user namespace needs Linux 5.11 and refuses some filesystems "
            "below it: keep your home read-only with --read ~, writable with --write ~, or "
            "empty with --tmpfs ~")


def kept_layer(ctx: _Context, op: KeptLayer) -> None:
    os.mkdir(KEPT_LAYER, 0o700)
    os.mkdir(KEPT_LOWER, 0o700)
    err = ctx.libc.mount(ctx.source(op.source), KEPT_LAYER, None, MS_BIND)
    if err:
        raise ctx.fail(f"binding the layer directory {op.source}", err)


def kept_overlay(ctx: _Context, op: KeptOverlay) -> None:
    """An overlay on `op.path` whose upper and work directories are in the kept layer (bound
    at KEPT_LAYER by the KeptLayer operation before it)."""
    libc = ctx.libc
    lower = f"{KEPT_LOWER}/{op.layer}"
    os.mkdir(lower, 0o700)
    err = libc.mount(ctx.source(op.path), lower, None, MS_BIND | MS_REC)
    if err:
        raise ctx.fail(f"binding {op.path} to make it copy-on-write", err)
    dest = ctx.dest(op.path)
    _mount_point(ctx, dest, True, "for a copy-on-write directory")
    options = (f"lowerdir={lower},upperdir={KEPT_LAYER}/upper/{op.layer},"
               f"workdir={KEPT_LAYER}/work/{op.layer},{KEPT_OPTIONS}")
    err = libc.mount("overlay", dest, "overlay", MS_NOSUID | MS_NODEV, options)
    if err:
        raise ctx.fail(
            f"overlay on {op.path} (copy-on-write, kept in the layer)", err,
            "overlayfs in a user namespace needs Linux 5.11 and a layer directory on a "
            "filesystem with user extended attributes (ext4, xfs, btrfs; tmpfs from Linux "
            "6.6): give one with --changes-dir DIR, or use --fs project")


def hide(ctx: _Context, op: Hide) -> None:
    dest = ctx.dest(op.path)
    _mount_point(ctx, dest, op.directory, "to hide")
    libc = ctx.libc
    if op.directory:  # made read-only by a ReadOnly operation once its mount points exist
        err = libc.mount("tmpfs", dest, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                         f"mode={op.mode:o},size=4k,nr_inodes=64")
    else:
        source = ctx.source(op.source) if op.source else EMPTY_FILE
        err = libc.mount(source, dest, None, MS_BIND) or _remount_read_only(libc, dest)
    if err:
        raise ctx.fail(f"hiding {op.path}", err)


def read_only(ctx: _Context, op: ReadOnly) -> None:
    err = _remount_read_only(ctx.libc, ctx.dest(op.path))
    if err:
        raise ctx.fail(f"making {op.path} read-only ({op.purpose})", err)


# ------------------------------------------------------------------------------------------------
# Both views


def fresh_proc(ctx: _Context, op: FreshProc) -> None:
    dest = ctx.dest(op.path)
    _mount_point(ctx, dest, True, "for /proc")
    err = ctx.libc.mount("proc", dest, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if err:
        raise ctx.fail(
            f"mounting a fresh {op.path} for the sandbox's PID namespace", err,
            f"the kernel allows it only where {op.path} is fully visible: inside a container, "
            "run it with an unmasked /proc")


def read_only_file(ctx: _Context, op: ReadOnlyFile) -> None:
    """The record file must still be the one tapbox opened; where the sandbox sees that very
    file (not a copy, not nothing), it is bound read-only over itself."""
    if not _same_file(ctx.source(op.path), op.dev, op.ino, must_exist=True):
        return  # pragma: no cover - _same_file raised
    dest = ctx.dest(op.path)
    source = dest
    if ctx.building and op.layered:  # through an overlay: the same inode, the overlay's device
        try:
            if os.stat(dest).st_ino != op.ino:
                return  # a copy of the sandbox's (a --changes-dir continued): not tapbox's
        except OSError:
            return
        source = ctx.source(op.path)
    elif ctx.building and not _same_file(dest, op.dev, op.ino, must_exist=False):
        return  # the sandbox sees another file there, or none: nothing of tapbox's to protect
    err = ctx.libc.mount(source, dest, None, MS_BIND) or _remount_read_only(ctx.libc, dest)
    if err:
        raise ctx.fail(f"making {op.path} read-only in the sandbox", err)


def pin(ctx: _Context, op: Pin) -> None:
    dest = ctx.dest(op.path)
    if ctx.building and not os.path.isdir(dest):
        return  # not in the sandbox's view: nothing to rename
    err = ctx.libc.mount(dest, dest, None, MS_BIND | MS_REC)
    if err:
        raise ctx.fail(f"binding {op.path} over itself (so the sandbox cannot rename it)", err)


def bind_file(ctx: _Context, op: BindFile) -> None:
    dest = ctx.dest(op.dest)
    if not os.path.isfile(dest):
        if not os.path.isfile(ctx.source(op.dest)) or not ctx.building:
            raise SetupError(
                f"tapbox: {op.dest} does not exist, so there is no file to mount {op.purpose} "
                f"over: create it (as root: touch {op.dest}) or {op.otherwise}")
        _mount_point(ctx, dest, False, f"for {op.purpose}")
    err = ctx.libc.mount(ctx.source(op.source), dest, None, MS_BIND)
    if err:
        raise ctx.fail(f"bind-mounting {op.purpose} over {op.dest}", err)


def fresh_sysfs(ctx: _Context, op: FreshSysfs) -> None:
    """A sysfs of the sandbox's netns on the path, carrying the old submounts over. Without it
    /sys/class/net lists the host's interfaces. In the host view any failure leaves the old
    /sys as it was; read-only (the project view), the host's /sys is bound read-only instead."""
    dest = ctx.dest(op.path)
    if op.read_only:
        _mount_point(ctx, dest, True, "for /sys")
    if _mount_sysfs(ctx.libc, ctx.source(op.path), dest, op.read_only,
                    ctx.source("/proc/self/mountinfo")):
        return
    if op.read_only:
        bind(ctx, Bind(op.path, op.path, writable=False, purpose="the host's /sys"))


def _mount_sysfs(libc: Libc, source: str, dest: str, read_only: bool, mountinfo: str) -> bool:
    submounts = top_submounts(source, mountinfo)
    clones: list[tuple[str, int]] = []
    try:
        for sub in submounts:
            fd = libc.open_tree(sub, OPEN_TREE_CLONE | AT_RECURSIVE | os.O_CLOEXEC)
            if fd < 0:  # no open_tree (kernel < 5.2): keep the old /sys and its submounts
                return False
            clones.append((dest + sub[len(source):], fd))
        flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
        if read_only:
            if libc.mount("sysfs", dest, "sysfs", flags | MS_RDONLY):
                return False
        elif libc.mount("sysfs", dest, "sysfs", flags) and libc.mount(
                "sysfs", dest, "sysfs", flags | MS_RDONLY):
            return False
        for sub, fd in clones:
            if libc.move_mount(fd, sub) or (read_only and libc.make_read_only(sub)):
                libc.umount2(dest, MNT_DETACH)  # back to the old /sys, submounts and all
                return False
        return True
    finally:
        for _sub, fd in clones:
            os.close(fd)


# ------------------------------------------------------------------------------------------------
# Helpers


def _mount_point(ctx: _Context, path: str, directory: bool, purpose: str) -> None:
    """Create a missing mount point while building a new root (never in the host's tree)."""
    if os.path.lexists(path) or not ctx.building:
        return
    shown = path[len(ctx.new):] or "/"
    try:
        os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
        if directory:
            os.mkdir(path, 0o755)
        else:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except OSError as e:
        raise SetupError(f"tapbox: cannot create {shown} in the sandbox {purpose}: "
                         f"{e.strerror}") from None


def _same_file(path: str, dev: int, ino: int, must_exist: bool) -> bool:
    try:
        st = os.stat(path)
    except OSError as e:
        if not must_exist:
            return False
        raise SetupError(f"tapbox: {path} changed after tapbox opened it ({e.strerror}): run "
                         "tapbox again") from None
    if (st.st_dev, st.st_ino) == (dev, ino):
        return True
    if must_exist:
        raise SetupError(f"tapbox: {path} changed after tapbox opened it (it was replaced): "
                         "run tapbox again")
    return False


def _remount_read_only(libc: Libc, path: str) -> int:
    """Make the one mount at `path` read-only (not the mounts below it)."""
    return libc.mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | _locked_flags(path))


def _locked_flags(path: str) -> int:
    """The flags a read-only remount must keep (in a user namespace the kernel refuses to clear
    nosuid, nodev, noexec or change the atime mode of a mount it inherited)."""
    f = os.statvfs(path).f_flag
    flags = 0
    for st_bit, ms_bit in ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV),
                           (os.ST_NOEXEC, MS_NOEXEC), (os.ST_NOATIME, MS_NOATIME),
                           (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME)):
        if f & st_bit:
            flags |= ms_bit
    if not f & (os.ST_NOATIME | os.ST_RELATIME):
        flags |= MS_STRICTATIME
    return flags


def _syscall_number(name: str) -> int:
    from tapbox.isolate import seccomp  # numbers syscalls for this architecture

    number = seccomp.Libseccomp().syscall_number(name)
    if number is None:
        raise SetupError(f"tapbox: libseccomp does not know {name}(2) on this architecture")
    return number


def mount_points(mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Every mount point, as /proc/self/mountinfo lists them (relative to our root)."""
    points: list[str] = []
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4:
                    points.append(unescape_mountinfo(fields[4]))
    except OSError:
        return []
    return points


def top_submounts(root: str, mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Mount points strictly below root, outermost only (shallowest first)."""
    points = mount_points(mountinfo)
    prefix = root.rstrip("/") + "/"
    below = sorted((p for p in points if p.startswith(prefix)), key=lambda p: p.count("/"))
    top: list[str] = []
    for p in below:
        if p not in top and not any(p.startswith(t + "/") for t in top):
            top.append(p)
    return top


def unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


_EXECUTORS: dict[type, Callable[[_Context, Any], None]] = {
    NewRoot: new_root, Bind: bind, Symlink: symlink, Tmpfs: tmpfs, Device: device,
    Devpts: devpts, HomeOverlay: home_overlay, KeptLayer: kept_layer,
    KeptOverlay: kept_overlay, Hide: hide, ReadOnly: read_only,
    PivotRoot: pivot, FreshProc: fresh_proc, FreshSysfs: fresh_sysfs, BindFile: bind_file,
    ReadOnlyFile: read_only_file, Pin: pin,
}
