"""A tiny read-only FUSE filesystem served from memory, for tests (no libfuse needed).

How this works: `TinyFuse(tree).mount(path)` opens /dev/fuse, mounts a "fuse" filesystem on
`path` with it (root only: /dev/fuse is root's here; `allow_other` lets other uids in, with the
kernel checking the modes: `default_permissions`) and answers the kernel's requests in a thread,
speaking the FUSE protocol (<linux/fuse.h>) directly: INIT, LOOKUP, GETATTR, OPENDIR, READDIR,
OPEN, READ and the releases; anything else is ENOSYS (which the kernel then stops asking), and
writes fail with EROFS. `tree` maps paths ("home", "home/file") to None for a directory or
bytes for a file. Every request is counted by opcode name in `requests`.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import threading

IN_HEADER = struct.Struct("=IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, ...
OUT_HEADER = struct.Struct("=IiQ")  # len, error, unique
ATTR = struct.Struct("=QQQQQQIIIIIIIIII")  # ino, size, blocks, a/m/ctime, nsecs, mode, nlink...
READ_IN = struct.Struct("=QQI")  # fh, offset, size
DIRENT = struct.Struct("=QQII")  # ino, off, namelen, type
OPCODES = {1: "LOOKUP", 2: "FORGET", 3: "GETATTR", 14: "OPEN", 15: "READ", 17: "STATFS",
           18: "RELEASE", 25: "FLUSH", 26: "INIT", 27: "OPENDIR", 28: "READDIR",
           29: "RELEASEDIR", 38: "DESTROY", 42: "BATCH_FORGET"}
NO_REPLY = {"FORGET", "BATCH_FORGET"}

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]


class TinyFuse:
    def __init__(self, tree: dict[str, bytes | None], uid: int = 0) -> None:
        self.uid = uid
        self.paths = [""] + sorted(tree)  # node id = index + 1; the root is node 1
        self.content = {"": None, **tree}
        self.requests: dict[str, int] = {}
        self.fd = -1

    def mount(self, path: str) -> None:
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        options = (f"fd={self.fd},rootmode=40755,user_id={self.uid},group_id={self.uid},"
                   "allow_other,default_permissions")
        if libc.mount(b"tinyfuse", path.encode(), b"fuse", 0x2 | 0x4, options.encode()) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mounting fuse on {path}: {os.strerror(err)}")
        threading.Thread(target=self._serve, daemon=True).start()

    def _node(self, nodeid: int) -> str:
        return self.paths[nodeid - 1]

    def _attr(self, nodeid: int) -> bytes:
        data = self.content[self._node(nodeid)]
        mode = stat.S_IFDIR | 0o755 if data is None else stat.S_IFREG | 0o644
        size = 0 if data is None else len(data)
        return ATTR.pack(nodeid, size, (size + 511) // 512, 0, 0, 0, 0, 0, 0, mode,
                         2 if data is None else 1, self.uid, self.uid, 0, 4096, 0)

    def _children(self, nodeid: int) -> list[int]:
        parent = self._node(nodeid)
        return [i + 1 for i, p in enumerate(self.paths)
                if p and os.path.dirname(p) == parent]

    def _serve(self) -> None:
        while True:
            try:
                request = os.read(self.fd, 1 << 17)
            except OSError as e:
                if e.errno in (errno.EINTR, errno.ENOENT):  # ENOENT: an interrupted request
                    continue
                return  # ENODEV: unmounted
            _length, opcode, unique, nodeid, *_ = IN_HEADER.unpack_from(request)
            name = OPCODES.get(opcode, str(opcode))
            self.requests[name] = self.requests.get(name, 0) + 1
            if name in NO_REPLY:
                continue
            error, body = self._answer(name, nodeid, request[IN_HEADER.size:])
            try:
                os.write(self.fd, OUT_HEADER.pack(OUT_HEADER.size + len(body), -error, unique)
                         + body)
            except OSError:
                pass  # the request was interrupted meanwhile

    def _answer(self, name: str, nodeid: int, arg: bytes) -> tuple[int, bytes]:
        if name == "INIT":
            major, minor, readahead, _flags = struct.unpack_from("=IIII", arg)
            return 0, struct.pack("=IIIIHHIIHHII24x", 7, min(minor, 31), readahead, 0, 16, 12,
                                  65536, 1, 0, 0, 0, 0)
        if name == "LOOKUP":
            wanted = arg.split(b"\0", 1)[0].decode()
            for child in self._children(nodeid):
                if os.path.basename(self._node(child)) == wanted:
                    return 0, struct.pack("=QQQQII", child, 0, 1, 1, 0, 0) + self._attr(child)
            return errno.ENOENT, b""
        if name == "GETATTR":
            return 0, struct.pack("=QII", 1, 0, 0) + self._attr(nodeid)
        if name in ("OPENDIR", "OPEN"):
            return 0, struct.pack("=QII", 0, 0, 0)
        if name == "READDIR":
            _fh, offset, size = READ_IN.unpack_from(arg)
            out = b""
            for index, child in enumerate(self._children(nodeid)):
                if index < offset:
                    continue
                raw = os.path.basename(self._node(child)).encode()
                kind = 4 if self.content[self._node(child)] is None else 8  # DT_DIR, DT_REG
                entry = DIRENT.pack(child, index + 1, len(raw), kind) + raw
                entry += b"\0" * (-len(entry) % 8)
                if len(out) + len(entry) > size:
                    break
                out += entry
            return 0, out
        if name == "READ":
            _fh, offset, size = READ_IN.unpack_from(arg)
            data = self.content[self._node(nodeid)] or b""
            return 0, data[offset:offset + size]
        if name == "STATFS":  # struct fuse_kstatfs: blocks, bfree, bavail, files, ffree,
            return 0, struct.pack("=QQQQQIII28x", 1024, 0, 0, len(self.paths), 0, 4096, 255,
                                  4096)  # bsize, namelen, frsize (and padding, spare[6])
        if name in ("RELEASE", "RELEASEDIR", "FLUSH", "DESTROY"):
            return 0, b""
        if name in ("4", "16", "35", "9", "10", "12", "13"):  # setattr, write, create, mk*...
            return errno.EROFS, b""
        return errno.ENOSYS, b""
