"""Real programs run unchanged under the default system-call filter.

Each runs inside tapbox (the default policy, violations named) and must do its usual job, with
no refused call named on stderr - except gdb's attempt to turn ASLR off for its inferior, which
the policy refuses on purpose (gdb warns and carries on).
"""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import sys
import zipfile
from pathlib import Path

from conftest import RunTapbox
from fakenet import FakeNet

PY = sys.executable
SHORT = 120.0


def refused(stderr: str) -> list[str]:
    """The system calls tapbox named as refused (its lines may interleave the program's)."""
    return re.findall(r"tapbox: system call (\S+) by pid", stderr)


def test_python(run_tapbox: RunTapbox, tmp_path: Path) -> None:
    script = (
        "import asyncio, hashlib, json, multiprocessing, sqlite3, ssl, subprocess, threading\n"
        "subprocess.run(['true'], check=True)\n"
        "t = threading.Thread(target=lambda: None); t.start(); t.join()\n"
        "with multiprocessing.Pool(2) as pool: assert pool.map(abs, [-1, -2]) == [1, 2]\n"
        "asyncio.run(asyncio.sleep(0))\n"
        "db = sqlite3.connect(':memory:'); db.execute('create table t (x)')\n"
        "print('ok')\n")
    proc = run_tapbox("-n", cmd=[PY, "-c", script], timeout=SHORT)
    assert (proc.returncode, proc.stdout) == (0, "ok\n"), proc.stderr
    assert refused(proc.stderr) == []


def test_git(run_tapbox: RunTapbox, tmp_path: Path) -> None:
    assert shutil.which("git"), "git is needed (apt-get install git)"
    repo = tmp_path / "repo"
    script = (f"set -e; git init -q {repo}; cd {repo}; git config user.email t@example.com; "
              "git config user.name t; echo hi > f; git add f; git commit -qm first; "
              "git log --format=%s; git gc -q; git status --short | wc -l")
    proc = run_tapbox("-n", "--write", str(tmp_path), cmd=["sh", "-c", script], timeout=SHORT)
    assert (proc.returncode, proc.stdout) == (0, "first\n0\n"), proc.stderr
    assert refused(proc.stderr) == []


def test_tar(run_tapbox: RunTapbox, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("a" * 10000)
    script = (f"set -e; cd {tmp_path}; tar czf t.tgz in; mkdir out; tar xzf t.tgz -C out; "
              "cmp in/a.txt out/in/a.txt && echo same")
    proc = run_tapbox("-n", "--write", str(tmp_path), cmd=["sh", "-c", script], timeout=SHORT)
    assert (proc.returncode, proc.stdout) == (0, "same\n"), proc.stderr
    assert refused(proc.stderr) == []


def test_cc(run_tapbox: RunTapbox, tmp_path: Path) -> None:
    assert shutil.which("cc"), "a C compiler is needed (apt-get install gcc)"
    src = tmp_path / "t.c"
    src.write_text('#include <pthread.h>\n#include <stdio.h>\n'
                   'static void *f(void *a) { return a; }\n'
                   'int main(void) { pthread_t t; pthread_create(&t, 0, f, 0); '
                   'pthread_join(t, 0); puts("built"); return 0; }\n')
    script = f"set -e; cc -O2 -pthread -o {tmp_path}/t {src}; {tmp_path}/t"
    proc = run_tapbox("-n", "--write", str(tmp_path), cmd=["sh", "-c", script], timeout=SHORT)
    assert (proc.returncode, proc.stdout) == (0, "built\n"), proc.stderr
    assert refused(proc.stderr) == []


def test_curl(run_tapbox: RunTapbox, fakenet: FakeNet, tmp_path: Path) -> None:
    """curl through tapbox's DNS and proxy (the fake servers answer like HTTP/0.9), and to a
    server on the sandbox's own loopback."""
    (tmp_path / "page.txt").write_text("local page\n")
    script = (f"set -e; curl -s --http0.9 http://api.example.test/ ; "
              f"cd {tmp_path}; {PY} -m http.server -b 127.0.0.1 8765 >/dev/null 2>&1 & "
              "for i in 1 2 3 4 5 6 7 8 9 10; do curl -sf http://127.0.0.1:8765/page.txt "
              "&& break; sleep 0.3; done; kill $!")
    proc = run_tapbox("--read", str(tmp_path), cmd=["sh", "-c", script],
                      allow=["api.example.test:80"], timeout=SHORT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "error unknown command\nlocal page\n", proc.stdout
    assert refused(proc.stderr) == []


def test_gdb(run_tapbox: RunTapbox) -> None:
    assert shutil.which("gdb"), "gdb is needed (apt-get install gdb)"
    proc = run_tapbox("-n", cmd=["gdb", "-q", "-batch", "-ex", "run", "-ex", "bt", "--args",
                                 PY, "-c", "import os; os.abort()"], timeout=SHORT)
    assert proc.returncode == 0, proc.stderr
    assert "SIGABRT" in proc.stdout and "#0 " in proc.stdout, proc.stdout
    # Only gdb's request to turn ASLR off is refused, and named.
    assert refused(proc.stderr) == ["personality"], proc.stderr


def test_strace_follows_and_attaches(run_tapbox: RunTapbox) -> None:
    assert shutil.which("strace"), "strace is needed (apt-get install strace)"
    script = ("set -e; strace -f -qq -e trace=execve -o /dev/stdout sh -c 'exec true' "
              "| grep -c 'execve(.* = 0$'; "
              "sleep 5 & pid=$!; timeout -s INT 1 strace -p $pid 2>&1 | head -1; kill $pid")
    proc = run_tapbox("-n", cmd=["sh", "-c", script], timeout=SHORT)
    lines = proc.stdout.splitlines()
    assert lines[0] == "2", proc.stdout + proc.stderr  # sh, then true (found on PATH)
    assert lines[1].startswith("strace: Process ") and lines[1].endswith(" attached"), lines
    assert refused(proc.stderr) == []


def _wheel(directory: Path) -> Path:
    """A pure-Python wheel made here (a package manager needs something to install)."""
    name, version = "tapbox_probe_pkg", "1.0"
    files = {f"{name}/__init__.py": b"VALUE = 42\n",
             f"{name}-{version}.dist-info/METADATA":
                 f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{name}-{version}.dist-info/WHEEL":
                 b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"  # noqa: E501
        for path, data in files.items()) + f"{name}-{version}.dist-info/RECORD,,\n"
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
        z.writestr(f"{name}-{version}.dist-info/RECORD", record)
    return wheel


def test_pip_installs_a_package(run_tapbox: RunTapbox, tmp_path: Path) -> None:
    wheel = _wheel(tmp_path)
    target = tmp_path / "site"
    script = (f"set -e; {PY} -m pip install -q --no-index --no-deps --disable-pip-version-check "
              f"--target {target} {wheel}; PYTHONPATH={target} {PY} -c "
              "'import tapbox_probe_pkg as p; print(p.VALUE)'")
    proc = run_tapbox("-n", "--write", str(tmp_path), cmd=["sh", "-c", script], timeout=SHORT)
    assert (proc.returncode, proc.stdout) == (0, "42\n"), proc.stderr
    assert refused(proc.stderr) == []
