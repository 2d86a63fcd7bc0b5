"""Attempts, from inside the sandbox, to rewrite tapbox's record files (--log, --pcap, --learn).

Each attempt is a way a hostile command could change what tapbox records about it: write,
truncate, delete, rename, hard-link, rename the directory holding the file and put a forged one
in its place, unmount or remount the protection (the test runs as root, so the command is uid 0
with capabilities inside), or do that from a nested user+mount namespace of its own. Prints one
JSON line {"attempt": errno or 0 (0 = it worked)}, plus "other_write": whether an ordinary new
file in the same directory could still be written (it must: the directory stays usable).

    record_attack.py LOG PCAP LEARN
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from collections.abc import Callable

MNT_DETACH = 2
MS_REMOUNT = 32
MS_BIND = 0x1000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNS = 0x00020000

libc = ctypes.CDLL(None, use_errno=True)


def attempt(action: Callable[[], object]) -> int:
    try:
        result = action()
    except OSError as e:
        return e.errno or -1
    return int(result) if isinstance(result, int) and result > 0 else 0


def write(path: str, mode: str) -> int:
    with open(path, mode) as f:
        f.write("forged\n")
    return 0


def ccall(rc: int) -> int:
    return ctypes.get_errno() if rc != 0 else 0


def nested_umount(path: str) -> int:
    """In a new user + mount namespace (every capability there, as unshare grants it, even
    without id maps): unmount the protection, then write."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        err = ccall(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS))
        if not err:
            err = ccall(libc.umount2(path.encode(), MNT_DETACH))
            if not err:
                err = attempt(lambda: write(path, "a"))
        os.write(w, str(err).encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        return int(f.read() or -1)


def main() -> None:
    log, pcap, learn = sys.argv[1:4]
    directory = os.path.dirname(log)
    out = {
        "append_log": attempt(lambda: write(log, "a")),
        "truncate_log": attempt(lambda: write(log, "w")),
        "truncate_call": attempt(lambda: os.truncate(log, 0)),
        "unlink_log": attempt(lambda: os.unlink(log)),
        "rename_log": attempt(lambda: os.rename(log, log + ".old")),
        "hardlink_log": attempt(lambda: os.link(log, os.path.join(directory, "hard"))),
        "chmod_log": attempt(lambda: os.chmod(log, 0o666)),
        "write_pcap": attempt(lambda: write(pcap, "r+")),
        "write_learn": attempt(lambda: write(learn, "w")),
        "rename_dir": attempt(lambda: os.rename(directory, directory + ".moved")),
        "umount_log": ccall(libc.umount2(log.encode(), MNT_DETACH)),
        "remount_rw": ccall(libc.mount(None, log.encode(), None, MS_REMOUNT | MS_BIND, None)),
        "nested_umount": nested_umount(log),
    }
    fds = []
    for pid in ("1", "self"):
        try:
            fds += [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            pass
    out["fd_to_record"] = any(link in (log, pcap, learn) for link in fds)
    out["other_write"] = attempt(lambda: write(os.path.join(directory, "other.txt"), "w"))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
