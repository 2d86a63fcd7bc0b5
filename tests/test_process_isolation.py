"""The sandbox's own PID, IPC and UTS namespaces; nothing of it outlives tapbox; the record
files (--log, --pcap, --learn) cannot be rewritten from inside.

End to end through the CLI (the run_tapbox/spawn_tapbox fixtures, in the fake internet, or
`-n`). Processes are looked for from outside by their exact command line, with arguments no
other test uses (sleep 31415...).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, TESTS_DIR, RunTapbox, SpawnTapbox, read_line
from fakenet import FakeNet

PY = sys.executable
ATTACK = TESTS_DIR / "sandbox_tools" / "record_attack.py"
SHORT = 30.0


def running(argv: list[str]) -> list[int]:
    """Host pids of live processes whose command line is exactly argv."""
    wanted = ("\0".join(argv) + "\0").encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry.name}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if cmdline == wanted and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def gone(argv: list[str], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while running(argv):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def kill_leftovers(*argvs: list[str]) -> None:
    for argv in argvs:
        for pid in running(argv):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ------------------------------------------------------------------------------------------------
# What the command sees


def test_ps_inside_shows_only_the_sandbox(run_tapbox: RunTapbox) -> None:
    script = 'echo "me $$"; for p in /proc/[0-9]*; do echo "proc ${p#/proc/} $(cat $p/comm)"; done'
    proc = run_tapbox("-n", cmd=["sh", "-c", script], timeout=SHORT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    procs = {int(ln.split()[1]): ln.split(None, 2)[2] for ln in lines if ln.startswith("proc ")}
    me = int(lines[0].removeprefix("me "))
    # the command runs under tapbox's init, never as pid 1 (its exact pid depends on what ran
    # in the namespace before it, e.g. a library lookup of the Python that set it up)
    assert procs[1] == "tapbox-init" and me > 1 and procs[me] == "sh", procs
    assert set(procs.values()) <= {"tapbox-init", "sh", "cat"}, procs
    assert len(procs) <= 4, procs


def test_own_hostname_and_ipc_uts_pid_namespaces(run_tapbox: RunTapbox) -> None:
    script = "hostname; readlink /proc/self/ns/ipc /proc/self/ns/uts /proc/self/ns/pid"
    proc = run_tapbox("-n", cmd=["sh", "-c", script], timeout=SHORT)
    assert proc.returncode == 0, proc.stderr
    hostname, *links = proc.stdout.split()
    assert hostname == "tapbox"
    for kind, link in zip(("ipc", "uts", "pid"), links, strict=True):
        assert link.startswith(f"{kind}:[") and link != os.readlink(f"/proc/self/ns/{kind}"), link
    assert os.uname().nodename != "tapbox"  # the host keeps its own name


# ------------------------------------------------------------------------------------------------
# Nothing outlives tapbox


@pytest.mark.parametrize("network", [True, False])
def test_a_daemon_left_behind_dies_when_tapbox_exits(run_tapbox: RunTapbox, fakenet: FakeNet,
                                                     network: bool) -> None:
    daemon = ["sleep", "31415"]
    background = ["sleep", "31416"]
    script = ("setsid sleep 31415 </dev/null >/dev/null 2>&1 & "
              "sleep 31416 </dev/null >/dev/null 2>&1 & sleep 0.3; exit 7")
    try:
        proc = run_tapbox(*([] if network else ["-n"]), cmd=["sh", "-c", script], timeout=SHORT)
        assert proc.returncode == 7, proc.stderr
        assert not running(daemon), "the setsid daemon outlived tapbox"
        assert not running(background), "a background job outlived tapbox"
    finally:
        kill_leftovers(daemon, background)


def test_sigkill_of_tapbox_takes_the_whole_sandbox(spawn_tapbox: SpawnTapbox,
                                                   fakenet: FakeNet) -> None:
    daemon = ["sleep", "31417"]
    background = ["sleep", "31418"]
    script = ("setsid sleep 31417 </dev/null >/dev/null 2>&1 & "
              "sleep 31418 </dev/null >/dev/null 2>&1 & echo ready; wait")
    try:
        proc = spawn_tapbox(cmd=["sh", "-c", script])
        assert read_line(proc.stdout, SHORT) == "ready\n"
        deadline = time.monotonic() + SHORT
        while not (running(daemon) and running(background)):
            assert time.monotonic() < deadline, "the sandbox's processes did not start"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # tapbox itself: no clean-up of its own runs
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert gone(daemon), "the setsid daemon outlived a SIGKILLed tapbox"
        assert gone(background), "a background job outlived a SIGKILLed tapbox"
    finally:
        kill_leftovers(daemon, background)


# ------------------------------------------------------------------------------------------------
# The record files


def test_record_files_cannot_be_rewritten_from_inside(run_tapbox: RunTapbox, fakenet: FakeNet,
                                                      tmp_path: Path) -> None:
    rec = tmp_path / "rec"
    rec.mkdir()
    log, pcap, learn = rec / "run.jsonl", rec / "run.pcap", rec / "learned.allow"
    # The directory is writable in the sandbox (--write), as a user's project directory would
    # be: the record files in it are not.
    proc = run_tapbox("--log", str(log), "--pcap", str(pcap), "--learn", str(learn),
                      "--write", str(tmp_path),
                      cmd=[PY, str(ATTACK), str(log), str(pcap), str(learn)], timeout=SHORT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {
        "append_log": errno.EROFS, "truncate_log": errno.EROFS, "truncate_call": errno.EROFS,
        "unlink_log": errno.EBUSY, "rename_log": errno.EBUSY, "hardlink_log": errno.EXDEV,
        "chmod_log": errno.EROFS, "write_pcap": errno.EROFS, "write_learn": errno.EROFS,
        "rename_dir": errno.EBUSY, "umount_log": errno.EPERM, "remount_rw": errno.EPERM,
    }
    for name, err in expected.items():
        assert result[name] == err, (name, errno.errorcode.get(result[name]), result)
    # In a nested user+mount namespace the copies of these mounts are locked (EINVAL).
    assert result["nested_umount"] == errno.EINVAL, result
    assert result["fd_to_record"] is False, result
    assert result["other_write"] == 0, result  # the directory itself stays writable
    assert (rec / "other.txt").read_text() == "forged\n"
    # What tapbox wrote is there, whole, and nothing forged.
    assert rec.is_dir() and not (tmp_path / "rec.moved").exists()
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "exit", events
    for path in (log, learn, pcap):
        assert b"forged" not in path.read_bytes(), path
    assert struct.unpack("<I", pcap.read_bytes()[:4])[0] == 0xA1B2C3D4
    assert learn.exists()


def test_a_learn_file_that_was_never_written_is_not_left_behind(run_tapbox: RunTapbox,
                                                                 tmp_path: Path) -> None:
    """tapbox holds the --learn path with an empty placeholder during the run; a run that
    stops before the learned file is written removes it again."""
    learn = tmp_path / "never.allow"
    proc = run_tapbox("--learn", str(learn), "--dns-upstream", "not an address",
                      cmd=["true"], timeout=SHORT)
    assert proc.returncode == 125, proc.stderr
    assert not learn.exists()


@pytest.mark.parametrize("view", ["project", "host"])
def test_verbose_prints_the_sandbox_plan(run_tapbox: RunTapbox, fakenet: FakeNet,
                                         tmp_path: Path, view: str) -> None:
    log = tmp_path / "run.jsonl"
    proc = run_tapbox("-v", "--fs", view, "--log", str(log), cmd=["true"], timeout=SHORT)
    assert proc.returncode == 0, proc.stderr
    plan = [ln.removeprefix("tapbox: sandbox: ") for ln in proc.stderr.splitlines()
            if ln.startswith("tapbox: sandbox: ")]
    if view == "host":
        assert plan[0].startswith("sysfs /sys") and plan[1].startswith("bind ")
        assert plan[2] == "proc /proc (the sandbox's PID namespace)"
        assert plan[3] == f"read-only {log}"
    else:
        mounts = plan[: next(i for i, ln in enumerate(plan) if ln.startswith("pivot_root")) + 1]
        assert mounts[0].startswith("new root"), plan
        assert "proc /proc (the sandbox's PID namespace)" in plan
        assert f"bind {os.path.realpath(REPO_ROOT)} (the working directory)" in plan
        assert "tmpfs /tmp (mode 1777; private)" in plan
        assert f"read-only {log}" in plan  # (not in the view: the sandbox's /tmp is its own)
    assert f"pin {tmp_path} (cannot be renamed or removed)" in plan
    assert "system calls: default; refused calls are named" in plan


def test_the_command_knows_it_is_sandboxed(run_tapbox: RunTapbox, fakenet: FakeNet) -> None:
    for args in ((), ("-n",)):
        proc = run_tapbox(*args, cmd=["sh", "-c", 'echo "TAPBOX=${TAPBOX-unset}"'],
                          env={"TAPBOX": "outer value"}, timeout=SHORT)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "TAPBOX=1", (args, proc.stdout)
