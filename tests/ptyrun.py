"""Running a program on a new pty, as a person at a terminal would, for the tests.

on_pty() makes the program the session leader of a new pty (pty.fork), reads everything it
prints until it exits, and answers each expected prompt in turn; the program is killed if it
outlives the timeout.
"""

from __future__ import annotations

import os
import pty
import select
import time
from pathlib import Path


def on_pty(argv: list[str], env: dict[str, str], cwd: Path, answers: list[tuple[bytes, bytes]],
           timeout: float = 60.0) -> tuple[int, bytes]:
    """Run argv on a new pty in `cwd` with `env`; each time the next `expect` of `answers`
    appears, type its `answer`. (exit status, everything it printed)."""
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the pty child
        try:
            os.chdir(cwd)
            os.execve(argv[0], argv, env)
        finally:
            os._exit(126)
    out = b""
    pending = list(answers)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    chunk = b""
                out += chunk
            if pending and pending[0][0] in out:
                expect, answer = pending.pop(0)
                out = out.replace(expect, b"<" + expect[:8] + b">", 1)
                os.write(fd, answer)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                while select.select([fd], [], [], 0.1)[0]:
                    try:
                        chunk = os.read(fd, 4096)
                    except OSError:
                        break
                    if not chunk:
                        break
                    out += chunk
                return os.waitstatus_to_exitcode(status), out
        raise AssertionError(f"timed out on the pty; output: {out!r}")
    finally:
        kill_and_close(pid, fd)


def kill_and_close(pid: int, fd: int) -> None:
    """The end of a pty child, whatever state it is in: killed, reaped, its pty closed."""
    try:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
    os.close(fd)
