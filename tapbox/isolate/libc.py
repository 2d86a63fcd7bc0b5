"""The few system calls the sandbox needs that Python's `os` lacks, through ctypes.

How this works: one `Libc` object wraps libc's `unshare`, `mount`, `umount2`, `prctl` and
`syscall` (for `open_tree`, `move_mount`, `mount_setattr`, `clone3`, `pivot_root` and
`capset`, which have no libc wrapper).
Every method returns 0 or an errno (`open_tree`: an fd or -errno; `clone_parent`: a pid, 0 in
the new process, or -errno) instead of raising, so each caller words its own one-line failure.
The constants are the kernel's (<sched.h>, <sys/mount.h>, <linux/prctl.h>, <linux/mount.h>,
<linux/capability.h>). The new-style syscalls (open_tree, move_mount, clone3) have the same
number on every architecture; the old ones a caller needs (clone, capset, pivot_root) are
numbered by
libseccomp (tapbox.isolate.seccomp), never by a table here.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from collections.abc import Callable

# <sched.h>
CLONE_PARENT = 0x00008000
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# <sys/mount.h>: mount flags, also the statvfs ST_* bits for the first ones
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_MOVE = 0x2000
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
MNT_DETACH = 0x2

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38

# <linux/capability.h>
CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = 24
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# open_tree(2) / move_mount(2)
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
OPEN_TREE_CLONE = 0x1
AT_RECURSIVE = 0x8000
AT_FDCWD = -100
MOVE_MOUNT_F_EMPTY_PATH = 0x4
SYS_CLONE3 = 435
SYS_MOUNT_SETATTR = 442
MOUNT_ATTR_RDONLY = 0x1


class _MountAttr(ctypes.Structure):
    """struct mount_attr, first version (32 bytes)."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "attr_set", "attr_clr", "propagation", "userns_fd")]


class _CloneArgs(ctypes.Structure):
    """struct clone_args, first version (64 bytes)."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size", "tls")]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


class Libc:
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
            ctypes.c_char_p,
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

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int,
              data: str | None = None) -> int:
        def b(s: str | None) -> bytes | None:
            return None if s is None else os.fsencode(s)

        return self._result(self._mount(b(source), b(target), b(fstype), flags, b(data)))

    def make_read_only(self, path: str) -> int:
        """Make the mount at `path` and every mount below it read-only (mount_setattr(2) with
        AT_RECURSIVE, Linux >= 5.12). Setting the flag is allowed on mounts a user namespace
        inherited; only clearing it is not."""
        attr = _MountAttr(attr_set=MOUNT_ATTR_RDONLY)
        rc = self._syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD),
                           ctypes.c_char_p(os.fsencode(path)), ctypes.c_uint(AT_RECURSIVE),
                           ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
        return self._result(rc)

    def pivot_root(self, new_root: str, put_old: str, pivot_root_nr: int) -> int:
        rc = self._syscall(ctypes.c_long(pivot_root_nr), ctypes.c_char_p(os.fsencode(new_root)),
                           ctypes.c_char_p(os.fsencode(put_old)))
        return self._result(rc)

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

    def set_name(self, name: str) -> int:
        """The calling thread's name (comm: what ps shows), at most 15 bytes."""
        buf = ctypes.create_string_buffer(name.encode()[:15])
        return self._result(self._prctl(PR_SET_NAME, ctypes.addressof(buf), 0, 0, 0))

    def clone_parent(self, legacy_clone_nr: Callable[[], int | None] | None = None) -> int:
        """A new process that is our parent's child (CLONE_PARENT), as fork() otherwise is.

        Returns its pid here, 0 in the new process, or -errno. It enters the namespaces this
        process unshared for its children, so after unshare(CLONE_NEWPID) it is pid 1 there,
        and tapbox, its parent, can wait for it. Only for a single-threaded process (a fresh
        fork child): as with fork(), only the calling thread is copied. clone3(2) first; where
        a seccomp profile answers ENOSYS to it (container runtimes do, to make libc fall back),
        the old clone(2), whose number the caller resolves (`legacy_clone_nr()`).
        """
        args = _CloneArgs(flags=CLONE_PARENT)  # exit_signal must be 0 with CLONE_PARENT
        rc = self._syscall(ctypes.c_long(SYS_CLONE3), ctypes.byref(args),
                           ctypes.c_size_t(ctypes.sizeof(args)))
        if rc >= 0:
            return int(rc)
        err = ctypes.get_errno()
        clone_nr = legacy_clone_nr() if err == errno.ENOSYS and legacy_clone_nr else None
        return -err if clone_nr is None else self.clone_parent_legacy(clone_nr)

    def clone_parent_legacy(self, clone_nr: int) -> int:
        """clone(2) with CLONE_PARENT and no stack (fork semantics); see clone_parent()."""
        flags, zero = ctypes.c_ulong(CLONE_PARENT), ctypes.c_ulong(0)
        # s390 takes (stack, flags, ...); every other architecture (flags, stack, ...). The
        # pointer arguments whose order differs elsewhere are all zero here.
        first, second = (zero, flags) if platform.machine().startswith("s390") else (flags, zero)
        rc = self._syscall(ctypes.c_long(clone_nr), first, second, zero, zero, zero)
        return int(rc) if rc >= 0 else -ctypes.get_errno()

    def drop_capability(self, cap: int, capset_nr: int) -> int:
        """Remove `cap` from the calling thread's effective, permitted and inheritable sets."""
        sets = {}
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(("CapInh:", "CapPrm:", "CapEff:")):
                    sets[line[:6]] = int(line.split()[1], 16) & ~(1 << cap)
        header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)()
        for i in (0, 1):  # low and high 32 bits
            data[i].effective = (sets["CapEff"] >> (32 * i)) & 0xFFFFFFFF
            data[i].permitted = (sets["CapPrm"] >> (32 * i)) & 0xFFFFFFFF
            data[i].inheritable = (sets["CapInh"] >> (32 * i)) & 0xFFFFFFFF
        rc = self._syscall(ctypes.c_long(capset_nr), ctypes.byref(header), data)
        return self._result(rc)

    def set_default_signal(self, signo: int) -> None:
        # libc rather than signal.signal(): works whichever thread forked.
        self._signal(signo, None)  # SIG_DFL is the null handler
