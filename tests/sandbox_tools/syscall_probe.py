"""Make raw system calls from inside the sandbox and print what each returned, as JSON.

Theory of operation: each argument is NAME=NUMBER[:ARG,...] (the number on this architecture,
which the test gets from libseccomp; arguments are integers, 0 by default). The call is made
through libc's syscall(), and the result recorded as {"NAME": "ok"} or {"NAME": "EPERM"} (the
errno's name). The arguments are chosen by the test so that a call the filter lets through
fails harmlessly (EFAULT, EBADF, EINVAL) or does nothing; a refused call fails with the
policy's errno before the kernel looks at them.

    syscall_probe.py keyctl=250 personality=135:0xffffffff ...
"""

from __future__ import annotations

import ctypes
import errno
import json
import sys


def main() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    out: dict[str, str] = {}
    for spec in sys.argv[1:]:
        name, _, rest = spec.partition("=")
        number, _, args_text = rest.partition(":")
        args = [int(a, 0) for a in args_text.split(",") if a] if args_text else []
        ctypes.set_errno(0)
        rc = libc.syscall(ctypes.c_long(int(number)), *(ctypes.c_long(a) for a in args))
        err = ctypes.get_errno()
        out[name] = "ok" if rc != -1 else errno.errorcode.get(err, str(err))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
