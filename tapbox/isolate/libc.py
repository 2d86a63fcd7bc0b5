"""The few system calls the sandbox needs that Python's `os` lacks, through ctypes.

How this works: one `Libc` object wraps libc's `unshare`, `mount`, `umount2`, `prctl` and
`syscall` (for `open_tree`/`move_mount`, which have no libc wrapper). Every method returns 0 or an
errno (`open_tree`: an fd or -errno) instead of raising, so each caller words its own one-line
failure. The constants are the kernel's (<sched.h>, <sys/mount.h>, <linux/prctl.h>,
<linux/mount.h>); the new-style mount syscalls have the same number on every architecture.
"""

from __future__ import annotations

import ctypes
import os

# <sched.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000

# <sys/mount.h>: mount flags, also the statvfs ST_* bits for the first ones
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38

# open_tree(2) / move_mount(2)
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
OPEN_TREE_CLONE = 0x1
AT_RECURSIVE = 0x8000
AT_FDCWD = -100
MOVE_MOUNT_F_EMPTY_PATH = 0x4


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
