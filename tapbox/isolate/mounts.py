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
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    OPEN_TREE_CLONE,
    Libc,
)
from tapbox.isolate.plan import BindFile, FreshSysfs, Plan


def apply(plan: Plan, libc: Libc, host: Host) -> None:
    for op in plan.ops:
        if isinstance(op, FreshSysfs):
            fresh_sysfs(libc, op.path)
        elif isinstance(op, BindFile):
            bind_file(libc, op, host)
        else:  # pragma: no cover - a new Op without an executor
            raise SetupError(f"tapbox: internal error: no executor for {op!r}")


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
