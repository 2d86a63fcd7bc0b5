"""Executing a Plan (tapbox.isolate.plan): one function per kind of operation.

How this works: `apply()` runs the operations in order in the sandbox child, inside its own user
and mount namespaces, where every mount is already private. A failure that would leave the
sandbox with less isolation than planned raises SetupError (one line: the operation, the reason,
the fix); only operations marked best effort (the fresh sysfs) may quietly keep the old state.
"""

from __future__ import annotations

import os
import re

from tapbox.errors import SetupError
from tapbox.isolate.diagnose import Host, eperm_failure
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
from tapbox.isolate.plan import BindFile, FreshProc, FreshSysfs, Pin, Plan, ReadOnlyFile


def apply(plan: Plan, libc: Libc, host: Host) -> None:
    for op in plan.ops:
        if isinstance(op, FreshSysfs):
            fresh_sysfs(libc, op.path)
        elif isinstance(op, BindFile):
            bind_file(libc, op, host)
        elif isinstance(op, FreshProc):
            fresh_proc(libc, op, host)
        elif isinstance(op, ReadOnlyFile):
            read_only_file(libc, op, host)
        elif isinstance(op, Pin):
            pin(libc, op, host)
        else:  # pragma: no cover - a new Op without an executor
            raise SetupError(f"tapbox: internal error: no executor for {op!r}")


def fresh_proc(libc: Libc, op: FreshProc, host: Host) -> None:
    err = libc.mount("proc", op.path, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if err:
        raise SetupError(eperm_failure(
            f"mounting a fresh {op.path} for the sandbox's PID namespace: {os.strerror(err)} "
            f"(the kernel allows it only where {op.path} is fully visible: inside a container, "
            "run it with an unmasked /proc)", host))


def read_only_file(libc: Libc, op: ReadOnlyFile, host: Host) -> None:
    try:
        st = os.stat(op.path)
    except OSError as e:
        st = None
        reason = e.strerror
    if st is None or (st.st_dev, st.st_ino) != (op.dev, op.ino):
        why = reason if st is None else "it was replaced"
        raise SetupError(
            f"tapbox: {op.path} changed after tapbox opened it ({why}): run tapbox again")
    err = libc.mount(op.path, op.path, None, MS_BIND) or libc.mount(
        None, op.path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | _locked_flags(op.path))
    if err:
        raise SetupError(eperm_failure(
            f"making {op.path} read-only in the sandbox: {os.strerror(err)}", host))


def pin(libc: Libc, op: Pin, host: Host) -> None:
    err = libc.mount(op.path, op.path, None, MS_BIND | MS_REC)
    if err:
        raise SetupError(eperm_failure(
            f"binding {op.path} over itself (so the sandbox cannot rename it): "
            f"{os.strerror(err)}", host))


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


def bind_file(libc: Libc, op: BindFile, host: Host) -> None:
    target = os.path.realpath(op.dest)
    if not os.path.isfile(target):
        where = op.dest if target == op.dest else f"{op.dest} -> {target}"
        raise SetupError(
            f"tapbox: {where} does not exist, so there is no file to mount {op.purpose} "
            f"over: create it (as root: touch {target}) or {op.otherwise}"
        )
    err = libc.mount(op.source, target, None, MS_BIND)
    if err:
        raise SetupError(
            eperm_failure(f"bind-mounting {op.purpose} over {target}: {os.strerror(err)}", host)
        )


def fresh_sysfs(libc: Libc, path: str) -> None:
    """Best effort: a sysfs of the sandbox's netns on `path`, carrying the old submounts over.

    Without it /sys/class/net lists the host's interfaces. Any failure leaves `path` as it was.
    """
    submounts = top_submounts(path)
    clones: list[tuple[str, int]] = []
    try:
        for sub in submounts:
            fd = libc.open_tree(sub, OPEN_TREE_CLONE | AT_RECURSIVE | os.O_CLOEXEC)
            if fd < 0:  # no open_tree (kernel < 5.2): keep the old /sys and its submounts
                return
            clones.append((sub, fd))
        flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
        if libc.mount("sysfs", path, "sysfs", flags) and libc.mount(
            "sysfs", path, "sysfs", flags | MS_RDONLY
        ):
            return
        for sub, fd in clones:
            if libc.move_mount(fd, sub):
                libc.umount2(path, MNT_DETACH)  # back to the old /sys, submounts and all
                return
    finally:
        for _sub, fd in clones:
            os.close(fd)


def top_submounts(root: str) -> list[str]:
    """Mount points strictly below root, outermost only (shallowest first)."""
    points: list[str] = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4:
                    points.append(unescape_mountinfo(fields[4]))
    except OSError:
        return []
    below = sorted((p for p in points if p.startswith(root + "/")), key=lambda p: p.count("/"))
    top: list[str] = []
    for p in below:
        if p not in top and not any(p.startswith(t + "/") for t in top):
            top.append(p)
    return top


def unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
