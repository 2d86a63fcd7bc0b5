"""Runs tapbox in a private mount namespace whose host side has other filesystems on it.

Run as root under `unshare -m --propagation private` (the mounts below then exist for this
process and its children only):

    mount_world.py WORLD UID

WORLD is a directory owned by UID (in the host's /tmp). The script mounts, on the host's
side of the sandbox:
- a tmpfs over /mnt (so nothing of the machine's /mnt is touched), and on it
- /mnt/otherfs: another tmpfs, with a project directory in it (a working directory on another
  filesystem than its parent's),
- /mnt/bound: a bind of WORLD/data (a working directory below a bind mount, whose source is
  in /tmp, which the sandbox does not see),
- WORLD/home/usb: a tmpfs below the home directory,
- /mnt/auto: an autofs mount (an indirect map) served by a small automount daemon in this
  process: key "ready" is mounted (a tmpfs with a file) before tapbox starts; a lookup of any
  other key is answered "no such map entry" (AUTOFS_IOC_FAIL) and counted;
- /mnt/fuse: a FUSE filesystem (tinyfuse.py, read-only, owned by UID) holding a home
  directory with a ~/.bashrc and a project.
Then it runs tapbox as UID (setpriv) four times and prints one JSON object:
- "startup": the automount and FUSE requests made while `tapbox -n -- true` ran elsewhere
  (must be none: tapbox must not touch what it does not bind);
- "otherfs", "bound": what tests/sandbox_tools/fs_probe.py found with the working directory
  on the other tmpfs, and below the bind, and whether the file it wrote is there on the host;
- "requests_during_probe": the keys the sandbox asked the automounter for;
- "fuse": what the probe found with its home and working directory on the FUSE filesystem.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import struct
import subprocess
import sys
import threading

from tinyfuse import TinyFuse  # beside this script

HERE = os.path.dirname(os.path.abspath(__file__))
PROBE = os.path.join(HERE, "fs_probe.py")
AUTOFS_IOC_READY = 0x9360
AUTOFS_IOC_FAIL = 0x9361
AUTOFS_IOC_CATATONIC = 0x9362
# struct autofs_v5_packet: hdr (proto, type), wait_queue_token (u32 here), dev, ino, uid,
# gid, pid, tgid, len, name[256]; padded to 8 bytes.
PACKET = struct.Struct("=iiIIQIIIII256s")
PACKET_SIZE = (PACKET.size + 7) // 8 * 8

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]


def mount(source: str, target: str, fstype: str | None, flags: int = 0,
          data: str | None = None) -> None:
    def b(s: str | None) -> bytes | None:
        return None if s is None else s.encode()

    if libc.mount(b(source), b(target), b(fstype), flags, b(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or 'bind'} on {target}: {os.strerror(err)}")


class Automounter:
    """The daemon side of an indirect autofs mount at `path` (v5 protocol)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.requests: list[str] = []
        read_end, write_end = os.pipe()
        os.setpgid(0, 0)  # the daemon's process group: its own lookups never wait on itself
        mount("tapbox-test", path, "autofs", 0,
              f"fd={write_end},pgrp={os.getpgrp()},minproto=5,maxproto=5,indirect")
        os.close(write_end)
        self.pipe = read_end
        self.ioctl_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            data = os.read(self.pipe, PACKET_SIZE)
            if len(data) < PACKET.size:
                return
            fields = PACKET.unpack_from(data)
            token, length, name = fields[2], fields[9], fields[10]
            self.requests.append(name[:length].decode(errors="replace"))
            fcntl.ioctl(self.ioctl_fd, AUTOFS_IOC_FAIL, token)

    def premount(self, key: str) -> str:
        """Mount `key` now, as the daemon would have for an earlier lookup."""
        where = os.path.join(self.path, key)
        os.mkdir(where)  # allowed to the daemon's process group
        mount("tmpfs", where, "tmpfs", 0, "mode=0755")
        with open(os.path.join(where, "file"), "w") as f:
            f.write("mounted before tapbox started\n")
        return where

    def stop(self) -> None:
        fcntl.ioctl(self.ioctl_fd, AUTOFS_IOC_CATATONIC, 0)


def tapbox(uid: int, cwd: str, env: dict[str, str], *argv: str) -> subprocess.CompletedProcess:
    drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if uid else []
    return subprocess.run([*drop, sys.executable, "-m", "tapbox", "-n", *argv], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=60,
                          start_new_session=True)  # not the automounter's process group


def probe(uid: int, cwd: str, env: dict[str, str], steps: list[list[str]]) -> object:
    proc = tapbox(uid, cwd, env, "--", sys.executable, PROBE, json.dumps(steps))
    if proc.returncode != 0:
        return {"exit": proc.returncode, "stderr": proc.stderr}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    world, uid = sys.argv[1], int(sys.argv[2])
    home = os.path.join(world, "home")
    env = {**os.environ, "HOME": home}
    env.pop("XDG_RUNTIME_DIR", None)
    mount("tmpfs", "/mnt", "tmpfs", 0, "mode=0755")
    for d in ("/mnt/otherfs", "/mnt/bound", "/mnt/auto", "/mnt/fuse", os.path.join(home, "usb")):
        os.makedirs(d, exist_ok=True)
    mount("tmpfs", "/mnt/otherfs", "tmpfs", 0, "mode=0777")
    os.mkdir("/mnt/otherfs/proj")
    os.chown("/mnt/otherfs/proj", uid, uid)
    mount(os.path.join(world, "data"), "/mnt/bound", None, 0x1000)  # MS_BIND
    mount("tmpfs", os.path.join(home, "usb"), "tmpfs", 0, "mode=0777")
    with open(os.path.join(home, "usb", "f"), "w") as f:
        f.write("on the usb stick\n")
    fuse = TinyFuse({"home": None, "home/.bashrc": b"# the original\n", "home/proj": None,
                     "home/proj/README": b"the project, on FUSE\n"}, uid=uid)
    fuse.mount("/mnt/fuse")
    auto = Automounter("/mnt/auto")
    auto.premount("ready")
    result: dict[str, object] = {}
    try:
        seen = dict(fuse.requests)
        start = tapbox(uid, "/mnt/otherfs/proj", env, "--", "true")
        result["startup_exit"] = start.returncode
        result["startup"] = list(auto.requests) + [
            f"fuse {op}" for op, n in fuse.requests.items() if n != seen.get(op)]
        auto.requests.clear()
        steps = [["cwd", "cwd"], ["write", "create", "made"],
                 ["usb", "read", os.path.join(home, "usb", "f")],
                 ["usb_write", "create", os.path.join(home, "usb", "new")],
                 ["ready", "read", "/mnt/auto/ready/file"],
                 ["later", "list", "/mnt/auto/later"]]
        result["otherfs"] = probe(uid, "/mnt/otherfs/proj", env, steps)
        result["otherfs_made"] = os.path.exists("/mnt/otherfs/proj/made")
        result["requests_during_probe"] = list(auto.requests)
        result["bound"] = probe(uid, "/mnt/bound", env, [["cwd", "cwd"],
                                                          ["write", "create", "made"]])
        result["bound_made"] = os.path.exists(os.path.join(world, "data", "made"))
        fuse_home = {**env, "HOME": "/mnt/fuse/home"}
        result["fuse"] = probe(uid, "/mnt/fuse/home/proj", fuse_home, [
            ["cwd", "cwd"], ["readme", "read", "README"], ["write", "create", "made"],
            ["bashrc_write", "write", "/mnt/fuse/home/.bashrc", "appended\n"],
            ["bashrc", "read", "/mnt/fuse/home/.bashrc"]])
    finally:
        auto.stop()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
