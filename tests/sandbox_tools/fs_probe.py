"""Looks at the filesystem from inside the sandbox and says what it found, as one JSON line.

    fs_probe.py STEPS_JSON

STEPS_JSON is a list of steps, each a list: [name, action, args...]. Actions:
  read PATH                 the file's text, or the errno's name (ENOENT, EACCES...)
  write PATH TEXT           append TEXT: "ok" or the errno's name
  create PATH               create an empty file (O_EXCL): "ok" or the errno's name
  list PATH                 sorted names in the directory, or the errno's name
  connect PATH              connect a Unix stream socket: "connected" + what the server sent
                            first, or the errno's name
  readlink PATH             the link's target, or the errno's name
  env NAME                  the variable's value, or null
  env-names                 every variable's name, sorted
  pty                       open a pseudo-terminal pair and pass a line through it: "ok" or
                            the errno's name
  procs                     the names (comm) of the processes /proc shows
  hostname                  the hostname
  cwd                       the working directory
Prints {"name": result, ...}.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
from typing import Any


def _errno(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def step(action: str, args: list[str]) -> Any:
    try:
        if action == "read":
            with open(args[0], encoding="utf-8", errors="replace") as f:
                return f.read()
        if action == "write":
            with open(args[0], "a", encoding="utf-8") as f:
                f.write(args[1])
            return "ok"
        if action == "create":
            os.close(os.open(args[0], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            return "ok"
        if action == "list":
            return sorted(os.listdir(args[0]))
        if action == "connect":
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(args[0])
                return "connected " + s.recv(100).decode(errors="replace")
        if action == "readlink":
            return os.readlink(args[0])
        if action == "env":
            return os.environ.get(args[0])
        if action == "env-names":
            return sorted(os.environ)
        if action == "pty":
            main, sub = os.openpty()
            try:
                os.write(main, b"through the pty\n")
                return "ok" if b"through" in os.read(sub, 100) else "nothing came through"
            finally:
                os.close(main)
                os.close(sub)
        if action == "procs":
            names = []
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    with open(f"/proc/{pid}/comm") as f:
                        names.append(f.read().strip())
            return sorted(names)
        if action == "hostname":
            return socket.gethostname()
        if action == "cwd":
            return os.getcwd()
    except OSError as e:
        return _errno(e)
    raise SystemExit(f"fs_probe: unknown action {action!r}")


def main() -> None:
    steps = json.loads(sys.argv[1])
    print(json.dumps({name: step(action, list(args)) for name, action, *args in steps}),
          flush=True)


if __name__ == "__main__":
    main()
