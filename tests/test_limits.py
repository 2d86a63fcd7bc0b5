"""Resource limits: --timeout (the whole sandbox, exit 124), --memory, --max-procs, --max-files.

End to end through the CLI; each limit is triggered by a small program and the run reports it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import RunTapbox, setpriv_prefix
from fakenet import FakeNet
from test_process_isolation import gone, kill_leftovers, running

PY = sys.executable
SHORT = 60.0
NOBODY = 65534


def test_timeout_kills_the_whole_sandbox_and_exits_124(run_tapbox: RunTapbox,
                                                       fakenet: FakeNet, tmp_path: Path) -> None:
    daemon = ["sleep", "31416"]
    log = tmp_path / "run.jsonl"
    try:
        started = time.monotonic()
        proc = run_tapbox("--log", str(log), "--timeout", "2s",
                          cmd=["sh", "-c", "setsid sleep 31416 & exec sleep 31415"],
                          allow=["api.example.test"], timeout=SHORT)
        took = time.monotonic() - started
        assert proc.returncode == 124, proc.stderr
        assert took < 20, took
        assert "the command ran out of time (--timeout 2s): the whole sandbox was killed" \
            in proc.stderr
        assert proc.stderr.rstrip().endswith("killed after --timeout 2s (exit status 124)")
        assert gone(daemon, timeout=5) and gone(["sleep", "31415"], timeout=5)
        events = [json.loads(line) for line in log.read_text().splitlines()]
        assert events[-1]["event"] == "exit" and events[-1]["status"] == 124
        assert events[-1]["timed_out"] == 2.0
        assert events[0]["limits"] == "time 2s for the whole sandbox"
    finally:
        kill_leftovers(daemon, ["sleep", "31415"])


def test_timeout_without_network(run_tapbox: RunTapbox) -> None:
    proc = run_tapbox("-n", "--timeout", "1", cmd=["sleep", "31417"], timeout=SHORT)
    assert proc.returncode == 124, proc.stderr
    assert "killed after --timeout 1s (exit status 124)" in proc.stderr
    assert not running(["sleep", "31417"])


def test_a_command_that_finishes_in_time_keeps_its_status(run_tapbox: RunTapbox) -> None:
    proc = run_tapbox("-n", "--timeout", "1m", cmd=["sh", "-c", "exit 7"], timeout=SHORT)
    assert proc.returncode == 7 and "timeout" not in proc.stderr


def test_memory_limit(run_tapbox: RunTapbox) -> None:
    script = ("import sys\n"
              "small = bytearray(10_000_000)\n"
              "try:\n"
              "    big = bytearray(300_000_000)\n"
              "    print('big allocated')\n"
              "except MemoryError:\n"
              "    print('MemoryError')\n")
    limited = run_tapbox("-n", "--memory", "150M", cmd=[PY, "-c", script], timeout=SHORT)
    assert limited.stdout == "MemoryError\n", limited.stderr
    free = run_tapbox("-n", cmd=[PY, "-c", script], timeout=SHORT)
    assert free.stdout == "big allocated\n", free.stderr


def test_max_procs_counts_the_sandbox_only(run_tapbox: RunTapbox) -> None:
    """The limit counts the sandbox's own processes (its user namespace), not the user's
    others; pid 1 of the sandbox is not counted against it."""
    script = ("import os, time\n"
              "pids = []\n"
              "try:\n"
              "    for i in range(10):\n"
              "        pid = os.fork()\n"
              "        if pid == 0:\n"
              "            time.sleep(5); os._exit(0)\n"
              "        pids.append(pid)\n"
              "except BlockingIOError as e:\n"
              "    print('refused after', len(pids))\n"
              "for pid in pids:\n"
              "    os.kill(pid, 9)\n")
    # Another process of the same user outside, alive during the run: not counted.
    with subprocess.Popen([*setpriv_prefix(NOBODY), "sleep", "31418"]) as outside:
        try:
            proc = run_tapbox("-n", "--max-procs", "4", cmd=[PY, "-c", script], user=NOBODY,
                              timeout=SHORT)
        finally:
            outside.kill()
    assert proc.stdout == "refused after 3\n", proc.stdout + proc.stderr  # 4 with itself


def test_max_procs_as_root_is_refused(run_tapbox: RunTapbox) -> None:
    """Root is exempt from RLIMIT_NPROC: tapbox says so rather than pretend to limit."""
    proc = run_tapbox("-n", "--max-procs", "4", cmd=["true"], timeout=SHORT)
    assert proc.returncode == 125
    assert "--max-procs cannot be enforced when tapbox runs as root" in proc.stderr


def test_max_files(run_tapbox: RunTapbox) -> None:
    script = ("import os\n"
              "fds = []\n"
              "try:\n"
              "    while len(fds) < 100:\n"
              "        fds.append(os.open('/dev/null', os.O_RDONLY))\n"
              "except OSError as e:\n"
              "    print(e.strerror, max(fds))\n")
    proc = run_tapbox("-n", "--max-files", "20", cmd=[PY, "-c", script], timeout=SHORT)
    assert proc.stdout == "Too many open files 19\n", proc.stdout + proc.stderr


def test_limits_are_named_with_how_they_are_enforced(run_tapbox: RunTapbox) -> None:
    show = "import resource as r; print(*(r.getrlimit(x)[0] for x in " \
        "(r.RLIMIT_NOFILE, r.RLIMIT_DATA, r.RLIMIT_NPROC)))"
    proc = run_tapbox("-n", "-v", "--memory", "1G", "--max-procs", "50", "--max-files", "64",
                      cmd=[PY, "-c", show], user=NOBODY, timeout=SHORT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["64", "1000000000", "51"]
    assert ("tapbox: sandbox: limits: memory 1000000000 bytes per process (RLIMIT_DATA); 50 "
            "processes and threads (RLIMIT_NPROC, counted in the sandbox's user namespace); 64 "
            "open files per process (RLIMIT_NOFILE)") in proc.stderr


def test_limits_default_to_none(run_tapbox: RunTapbox) -> None:
    outside = os.popen("sh -c 'ulimit -n; ulimit -d'").read().split()  # noqa: S605
    proc = run_tapbox("-n", cmd=["sh", "-c", "ulimit -n; ulimit -d"], timeout=SHORT)
    assert proc.stdout.split() == outside, proc.stderr


def test_a_limit_above_the_hard_limit_is_a_clear_error(run_tapbox: RunTapbox) -> None:
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    proc = run_tapbox("-n", "--max-files", str(hard + 1), cmd=["true"], timeout=SHORT)
    assert proc.returncode == 125
    assert proc.stderr == (f"tapbox: --max-files: {hard + 1} is above the hard limit tapbox was "
                           f"given ({hard}): ask for less, or raise it (ulimit -H)\n")
