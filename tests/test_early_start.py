"""The command starts while the engine's modules are still being imported (tapbox.runner).

Its frames wait in tap0's queue until the engine reads them: nothing it sends in that time passes
undecided or goes unrecorded, even when it exits before the engine is up; an engine that cannot
start still stops the command (exit 125, one line); --timeout counts from the command's start.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT, RunTapbox, tapbox_env
from fakenet import FakeNet

from tapbox.isolate.spawn import Sandbox

PY = sys.executable
# Sends one datagram to a denied and one to an allowed echo server, and exits at once: it is
# gone long before tapbox has imported trio.
SEND_AND_EXIT = (
    "import socket\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.sendto(b'early-denied', ('203.0.113.7', 5353))\n"
    "s.sendto(b'early-allowed', ('192.0.2.10', 5353))\n"
)


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_datagrams_of_a_command_that_exits_at_once_are_decided_and_logged(
        run_tapbox: RunTapbox, fakenet: FakeNet, tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    proc = run_tapbox("--log", str(log), "--ipv6", "off", cmd=[PY, "-c", SEND_AND_EXIT],
                      allow=["192.0.2.10:5353"], timeout=60)
    assert proc.returncode == 0, proc.stderr
    events = read_log(log)
    assert events[0]["event"] == "start" and events[-1]["event"] == "exit", events
    ends = {e["dst"]: e for e in events if e["event"] == "flow_end"}
    assert ends["203.0.113.7"]["verdict"] == "denied", events
    assert ends["192.0.2.10"]["verdict"] == "allowed", events
    # ...and the allowed one really went out, the denied one did not
    deadline = time.monotonic() + 5
    while not fakenet.datagrams("192.0.2.10", 5353) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [d.size for d in fakenet.datagrams("192.0.2.10", 5353)] == [len(b"early-allowed")]
    assert fakenet.datagrams("203.0.113.7", 5353) == []


def test_a_command_that_sends_nothing_has_complete_records(run_tapbox: RunTapbox,
                                                           tmp_path: Path) -> None:
    # Without IPv6 tap0 sends nothing by itself, so `true` ends before the engine's imports
    # and the run ends without the engine: the log must still open and close.
    log = tmp_path / "run.jsonl"
    proc = run_tapbox("--log", str(log), "--ipv6", "off", cmd=["sh", "-c", "exit 3"],
                      allow=["192.0.2.10"], timeout=60)
    assert proc.returncode == 3, proc.stderr
    events = read_log(log)
    assert [e["event"] for e in events] == ["start", "exit"], events
    assert events[-1]["status"] == 3


def test_tap0_has_no_ipv6_when_the_sandbox_has_none(run_tapbox: RunTapbox) -> None:
    script = "cat /proc/sys/net/ipv6/conf/tap0/disable_ipv6"
    off = run_tapbox("--ipv6", "off", cmd=["sh", "-c", script], timeout=60)
    on = run_tapbox("--ipv6", "on", cmd=["sh", "-c", script], timeout=60)
    assert (off.returncode, off.stdout.strip()) == (0, "1"), off.stderr
    assert (on.returncode, on.stdout.strip()) == (0, "0"), on.stderr


def test_an_engine_that_cannot_start_stops_the_command(tmp_path: Path) -> None:
    # The engine's module cannot be imported (as in a broken installation): the command, already
    # started, is killed before it gets to its second step, and tapbox says why in one line.
    marker = tmp_path / "second-step"
    launcher = ("import sys; sys.modules['tapbox.net.engine'] = None\n"
                "from tapbox.cli import main; sys.exit(main(sys.argv[1:]))\n")
    argv = [PY, "-c", launcher, "--write", str(tmp_path), "--allow", "192.0.2.10", "--",
            "sh", "-c", f"sleep 5; touch {marker}"]
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=REPO_ROOT, env=tapbox_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 125, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "the network engine could not start (ModuleNotFoundError" in lines[0]
    assert "the command was stopped" in lines[0]
    assert time.monotonic() - started < 5
    time.sleep(0.2)
    assert not marker.exists()


def test_timeout_counts_from_the_commands_start() -> None:
    left, right = socket.socketpair()
    with left, right:
        sandbox = Sandbox(0, left, None)
        assert sandbox.time_left(None) == float("inf")
        assert sandbox.time_left(2.0) == 2.0  # not started yet: all of it
        sandbox.started_at = time.monotonic() - 1.5
        assert 0.4 < sandbox.time_left(2.0) <= 0.5
        sandbox.started_at = time.monotonic() - 3.0
        assert sandbox.time_left(2.0) == 0.0
        sandbox._sock = None  # nothing to close: the pair is closed by the with


def test_overlapping_engine_imports_restore_the_switch_interval() -> None:
    # Two runs of the API in one process, the first to start ending first: the interval is low
    # while either imports, and the caller's own value is back once both are done.
    from tapbox.runner import IMPORT_SWITCH_INTERVAL, QuickSwitching

    own = 0.004
    before = sys.getswitchinterval()
    sys.setswitchinterval(own)
    try:
        QuickSwitching.enter()
        assert sys.getswitchinterval() == pytest.approx(IMPORT_SWITCH_INTERVAL)
        QuickSwitching.enter()
        QuickSwitching.leave()
        assert sys.getswitchinterval() == pytest.approx(IMPORT_SWITCH_INTERVAL)
        QuickSwitching.leave()
        assert sys.getswitchinterval() == pytest.approx(own)
    finally:
        sys.setswitchinterval(before)
