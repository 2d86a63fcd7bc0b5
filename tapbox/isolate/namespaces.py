"""Entering the sandbox's namespaces: user first (with its id maps), then all the others.

How this works: an unprivileged process may create a user namespace and, inside it, holds every
capability over namespaces that the new user namespace owns. So the child unshares CLONE_NEWUSER
alone, writes "deny" to setgroups and one-line uid/gid maps (the caller's uid -> the same number,
or -> 0 with --root), and only then unshares the network, mount, PID, IPC and UTS namespaces,
which the new user namespace then owns. The UTS namespace gets the hostname `tapbox`. Every mount
is made private, so nothing the sandbox mounts propagates back to the host (and nothing the host
mounts later appears inside). Two unshare calls instead of one tell the user which the kernel
refused.

A new PID namespace applies to the caller's children only: the process tapbox forked stays
outside, and the next process it creates is pid 1 inside (tapbox.isolate.child).
"""

from __future__ import annotations

import os
import socket

from tapbox.errors import SetupError
from tapbox.isolate.diagnose import OTHER_NAMESPACES, Host, eperm_failure, unshare_failure
from tapbox.isolate.libc import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUSER,
    CLONE_NEWUTS,
    MS_PRIVATE,
    MS_REC,
    Libc,
)

HOSTNAME = "tapbox"


def enter_namespaces(libc: Libc, host: Host, uid: int, gid: int, root: bool) -> None:
    """User namespace with id maps, then the others; hostname; private mounts."""
    err = libc.unshare(CLONE_NEWUSER)
    if err:
        raise SetupError(unshare_failure("user", err, host))
    inner_uid, inner_gid = (0, 0) if root else (uid, gid)
    try:
        write_proc("/proc/self/setgroups", "deny", missing_ok=True)
        write_proc("/proc/self/uid_map", f"{inner_uid} {uid} 1\n")
        write_proc("/proc/self/gid_map", f"{inner_gid} {gid} 1\n")
    except OSError as e:
        raise SetupError(
            eperm_failure(f"writing the user namespace's id maps: {e.strerror}", host)
        ) from e
    err = libc.unshare(CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS)
    if err:
        raise SetupError(unshare_failure(OTHER_NAMESPACES, err, host))
    try:
        socket.sethostname(HOSTNAME)
    except OSError as e:
        raise SetupError(
            eperm_failure(f"setting the sandbox's hostname: {e.strerror}", host)
        ) from None
    err = libc.mount(None, "/", None, MS_REC | MS_PRIVATE)
    if err:
        raise SetupError(eperm_failure(f"making mounts private: {os.strerror(err)}", host))


def write_proc(path: str, content: str, missing_ok: bool = False) -> None:
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
