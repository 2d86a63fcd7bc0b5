"""Terminal-injection attempts from inside the tapbox sandbox, and what the kernel answered.

Run on a terminal (fd 0 a tty). Tries TIOCSTI (push a character into the terminal's input
queue, so that the user's shell reads it after tapbox exits) with the plain request number and
with high bits set in the 64-bit request argument (the kernel truncates the request to 32 bits:
a filter that compares all 64 bits would let this through), and TIOCLINUX (a virtual-console
ioctl: on a pty it fails with ENOTTY/EINVAL by itself, so EPERM shows that a filter refused it).
Then reads and sets the window size (TIOCGWINSZ/TIOCSWINSZ), which must keep working.
Prints one JSON line: {"tiocsti": errno, "tiocsti_high": errno, "tiocsti_high2": errno,
"tioclinux": errno, "winsize": [rows, cols] after setting, "winsize_errno": errno}
(errno 0 means the call succeeded).

    tty_inject.py TEXT      TEXT is what TIOCSTI tries to inject, byte by byte
"""

from __future__ import annotations

import ctypes
import json
import struct
import sys
import termios

TIOCSTI = 0x5412
TIOCLINUX = 0x541C

libc = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


def ioctl(request: int, arg: ctypes.c_void_p | ctypes.Array[ctypes.c_char] | None) -> int:
    """0 or the errno of ioctl(0, request, arg); request is passed as a full unsigned long."""
    ctypes.set_errno(0)
    ptr = ctypes.cast(arg, ctypes.c_void_p) if arg is not None else None
    return 0 if libc.ioctl(0, request, ptr) == 0 else ctypes.get_errno()


def inject(request: int, text: bytes) -> int:
    result = 0
    for byte in text:
        err = ioctl(request, ctypes.create_string_buffer(bytes([byte]), 1))
        result = result or err
    return result


def main() -> None:
    text = sys.argv[1].encode()
    out = {
        "tiocsti": inject(TIOCSTI, text),
        "tiocsti_high": inject(TIOCSTI | (1 << 32), text),
        "tiocsti_high2": inject(TIOCSTI | 0xFFFFFFFF00000000, text),
        "tioclinux": ioctl(TIOCLINUX, ctypes.create_string_buffer(b"\x02" + b"\0" * 15, 16)),
    }
    buf = ctypes.create_string_buffer(struct.pack("HHHH", 33, 77, 0, 0), 8)
    err = ioctl(termios.TIOCSWINSZ, buf)
    got = ctypes.create_string_buffer(8)
    err = err or ioctl(termios.TIOCGWINSZ, got)
    out["winsize"] = list(struct.unpack("HHHH", got.raw)[:2])
    out["winsize_errno"] = err
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
