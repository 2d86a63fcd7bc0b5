"""The sandboxed command cannot type into the user's terminal; the terminal still works.

Each test runs the real CLI (`python -m tapbox -n -- ...`) on a fresh pty, as a user at a
terminal would. A small wrapper on the pty runs tapbox and then, after tapbox has exited, reads
whatever input is waiting on the terminal, as the user's shell would next: characters pushed
with TIOCSTI from inside the sandbox would be there (with `dev.tty.legacy_tiocsti = 1`, the
kernel lets a process push into its own controlling terminal).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT, TESTS_DIR, tapbox_env
from ptyrun import kill_and_close, on_pty

INJECTOR = TESTS_DIR / "sandbox_tools" / "tty_inject.py"
PAYLOAD = "echo INJECTED"

# Runs on the pty: tapbox, then whatever input the terminal holds for the next reader.
WRAPPER = """
import json, os, select, subprocess, sys, termios
rc = subprocess.call(json.loads(sys.argv[1]))
attrs = termios.tcgetattr(0)
attrs[3] &= ~(termios.ICANON | termios.ECHO)  # a pending partial line becomes readable
termios.tcsetattr(0, termios.TCSANOW, attrs)
data = b""
while select.select([0], [], [], 0.5)[0]:
    chunk = os.read(0, 4096)
    if not chunk:
        break
    data += chunk
print("AFTER " + json.dumps({"rc": rc, "pending": data.decode("latin-1")}), flush=True)
"""




def json_line(out: bytes, prefix: str = "") -> dict[str, Any]:
    """The JSON object on the line that starts with `prefix` (after it)."""
    for line in out.decode("latin-1").splitlines():
        line = line.strip()
        if line.startswith(prefix + "{"):
            return dict(json.loads(line[len(prefix):]))
    raise AssertionError(f"no {prefix!r}JSON line in {out!r}")


@pytest.mark.parametrize("view", ["project", "host"])
def test_tiocsti_and_tioclinux_are_refused_and_nothing_reaches_the_terminal(view: str) -> None:
    """In every --fs view (the host view keeps the filter)."""
    tapbox = [sys.executable, "-m", "tapbox", "-n", "--fs", view, "--", sys.executable,
              str(INJECTOR), PAYLOAD + "\n"]
    status, out = on_pty([sys.executable, "-c", WRAPPER, json.dumps(tapbox)], tapbox_env(),
                         REPO_ROOT, [])
    assert status == 0, out
    inside = json_line(out)
    after = json_line(out, "AFTER ")
    assert after["rc"] == 0, out
    assert inside["tiocsti"] == errno.EPERM, inside
    assert inside["tiocsti_high"] == errno.EPERM, inside  # high bits of the request set
    assert inside["tiocsti_high2"] == errno.EPERM, inside
    assert inside["tioclinux"] == errno.EPERM, inside
    assert after["pending"] == "", f"characters reached the terminal: {after['pending']!r}"
    assert "INJECTED" not in out.decode("latin-1").replace(PAYLOAD, ""), out
    # The terminal itself still works from inside: window size set and read back.
    assert inside["winsize_errno"] == 0 and inside["winsize"] == [33, 77], inside


def test_job_control_ctrl_c_and_window_size_still_work_under_the_filter() -> None:
    """An interactive shell inside, on the terminal: Ctrl-C, a resize seen by `stty size`."""
    script = (
        "import fcntl, struct, subprocess, sys, termios\n"
        "fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 80, 0, 0))\n"
        "sys.exit(subprocess.call(sys.argv[1:]))\n"
    )
    bash = ["bash", "--norc", "--noprofile", "-i"]
    tapbox = [sys.executable, "-m", "tapbox", "-n", "--", *bash]
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the pty child
        try:
            os.chdir(REPO_ROOT)
            env = tapbox_env({"PS1": "tb$ ", "TERM": "dumb", "HISTFILE": "/dev/null"})
            os.execve(sys.executable, [sys.executable, "-c", script, *tapbox], env)
        finally:
            os._exit(126)
    out = b""

    def expect(pattern: bytes, timeout: float = 20.0) -> None:
        nonlocal out
        deadline = time.monotonic() + timeout
        while pattern not in out:
            assert time.monotonic() < deadline, f"{pattern!r} not seen: {out!r}"
            if select.select([fd], [], [], 0.1)[0]:
                out += os.read(fd, 4096)

    try:
        expect(b"tb$ ")
        os.write(fd, b"stty size; sleep 30\n")
        expect(b"24 80")
        time.sleep(0.3)
        os.write(fd, b"\x03")  # Ctrl-C interrupts sleep, bash stays
        expect(b"tb$ ")
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 132, 0, 0))
        out = b""
        os.write(fd, b"stty size; exit 3\n")
        expect(b"50 132")
        deadline = time.monotonic() + 20
        while True:
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    os.read(fd, 4096)
                except OSError:
                    pass
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                assert os.waitstatus_to_exitcode(status) == 3
                break
            assert time.monotonic() < deadline, "tapbox did not exit"
        assert b"no job control" not in out
    finally:
        kill_and_close(pid, fd)


def test_missing_libseccomp_stops_tapbox_before_the_command(tmp_path: Path) -> None:
    """A libseccomp.so.2 that cannot be loaded: exit 125, one line, the command never runs."""
    broken = tmp_path / "lib"
    broken.mkdir()
    (broken / "libseccomp.so.2").write_bytes(b"not a shared object\n")
    marker = tmp_path / "ran"
    proc = subprocess.run(
        [sys.executable, "-m", "tapbox", "-n", "--write", str(tmp_path), "--", "touch",
         str(marker)],
        cwd=REPO_ROOT, env=tapbox_env({"LD_LIBRARY_PATH": str(broken)}),
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 125, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("tapbox: cannot load libseccomp.so.2")
    assert "libseccomp2" in lines[0] and "seccomp filter" in lines[0]
    assert not marker.exists()
