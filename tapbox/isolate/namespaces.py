"""Entering the sandbox's namespaces: user first (with its id maps), then all the others.

How this works: an unprivileged process may create a user namespace and, inside it, holds every
capability over namespaces that the new user namespace owns. So the child unshares CLONE_NEWUSER
alone, writes "deny" to setgroups and one-line uid/gid maps (the caller's uid -> the same number,
or -> 0 with --root), and only then unshares the network, mount, PID, IPC and UTS namespaces,
which the new user namespace then owns. The UTS namespace gets the hostname `tapbox`. Every mount
is made private, so nothing the sandbox mounts propagates back to the host (and nothing the host
mounts later appears inside). Two unshare calls instead of one tell the user which the kernel
refused.

--root when tapbox itself runs as root: every id maps to itself (but the last: a map of all
ids is how the host's own namespace looks) and setgroups stays allowed, so programs that
switch users inside work (apt drops to its `_apt` user; `tapbox --root --fs overlay --
apt-get install` installs into a layer). Such a map needs CAP_SETUID in the parent namespace,
which the child loses by entering the new one: a helper forked just before writes it from
outside. Subordinate ids for unprivileged users (newuidmap) are not used yet: one id is mapped.

A new PID namespace applies to the caller's children only: the process tapbox forked stays
outside, and the next process it creates is pid 1 inside (tapbox.isolate.child).

Nesting: by default a process in the sandbox may create user namespaces of its own (a tapbox,
bubblewrap or a browser's sandbox inside); what it creates can only be narrower, since every
namespace it makes is owned by the sandbox's. `--no-nest` forbids it the way bubblewrap's
--disable-userns does: user.max_user_namespaces is set to 0 in the sandbox's own user namespace
(the limit is per user namespace and checked in every ancestor, so no process inside can create
one, through unshare, clone or clone3 alike), and CAP_SYS_RESOURCE, which could raise it again,
leaves the sandbox (bounding set and pid 1's own sets), as CAP_SYS_ADMIN does.
"""

from __future__ import annotations

import os
import socket

from tapbox.errors import SetupError
from tapbox.isolate.diagnose import (
    MAX_USERNS,
    OTHER_NAMESPACES,
    Host,
    eperm_failure,
    unshare_failure,
)
from tapbox.isolate.libc import (
    CAP_SYS_RESOURCE,
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUSER,
    CLONE_NEWUTS,
    MS_PRIVATE,
    MS_REC,
    PR_CAPBSET_DROP,
    Libc,
)

HOSTNAME = "tapbox"
ALL_IDS = 4294967294  # ids 0 .. 2**32-3: all but the last (a map of all is the host's own: tools
# tell a sandbox from the host by it, tapbox.isolate.diagnose too)


def enter_namespaces(libc: Libc, host: Host, uid: int, gid: int, root: bool) -> None:
    """User namespace with id maps, then the others; hostname; private mounts."""
    if root and uid == 0 and gid == 0:
        # tapbox run by root with --root: every id maps to itself and setgroups stays
        # allowed, so programs that switch users work (apt drops to its _apt user). It gives
        # the sandbox's root nothing the real root it stands for lacks.
        _enter_mapped_from_outside(libc, host, f"0 0 {ALL_IDS}\n")
    else:
        err = libc.unshare(CLONE_NEWUSER)
        if err:
            raise SetupError(unshare_failure("user", err, host))
    inner_uid, inner_gid = (0, 0) if root else (uid, gid)
    try:
        if not (root and uid == 0 and gid == 0):
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


def forbid_user_namespaces(libc: Libc, capset_nr: int | None) -> None:
    """--no-nest: no process of the sandbox can create a user namespace (see the module doc)."""
    try:
        write_proc(MAX_USERNS, "0\n")
    except OSError as e:
        raise SetupError(
            f"tapbox: --no-nest: cannot set user.max_user_namespaces in the sandbox: "
            f"{e.strerror} (kernel older than 4.9?): run without --no-nest"
        ) from None
    err = libc.prctl(PR_CAPBSET_DROP, CAP_SYS_RESOURCE)
    if not err:
        err = libc.drop_capability(CAP_SYS_RESOURCE, capset_nr) if capset_nr is not None else -1
    if err:
        reason = os.strerror(err) if err > 0 else "libseccomp does not know capset"
        raise SetupError(f"tapbox: --no-nest: dropping CAP_SYS_RESOURCE in the sandbox: {reason}")


def _enter_mapped_from_outside(libc: Libc, host: Host, idmap: str) -> None:
    """Unshare the user namespace and have its id maps (`idmap`, for uids and gids) written
    from outside it: a map of more than one's own id needs CAP_SETUID in the parent
    namespace, which a process loses for good by entering the new one. A helper forked
    before (still outside) writes them once told, and is waited for."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the helper leaves through os._exit
        try:
            os.close(ready_w)
            if os.read(ready_r, 1) != b"u":
                os._exit(2)
            target = os.getppid()
            write_proc(f"/proc/{target}/uid_map", idmap)
            write_proc(f"/proc/{target}/gid_map", idmap)
            os._exit(0)
        except BaseException:  # noqa: B036 - the helper must never return
            os._exit(1)
    os.close(ready_r)
    try:
        err = libc.unshare(CLONE_NEWUSER)
        if not err:
            os.write(ready_w, b"u")
    finally:
        os.close(ready_w)
        _pid, status = os.waitpid(pid, 0)
    if err:
        raise SetupError(unshare_failure("user", err, host))
    if os.waitstatus_to_exitcode(status) != 0:
        raise SetupError(eperm_failure("writing the user namespace's id maps (all ids, for "
                                       "--root as root) failed", host))


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
