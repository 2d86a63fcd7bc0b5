"""Resets cross tapbox in both directions (RFC 9293 §3.10.7.4): an abort on one side is an
abort on the other, never a clean end of stream."""

from __future__ import annotations

import time

from conftest import RunClient
from fakenet import FakeNet

ALLOW = ["203.0.113.10:80"]


def test_host_reset_reaches_the_sandbox_as_a_reset(run_client: RunClient,
                                                    fakenet: FakeNet) -> None:
    run = run_client("reset-me", "203.0.113.10", "80", allow=ALLOW, tapbox_args=("-v",))
    assert run.expect_result()["result"] == "reset", run.describe()
    assert "ended: reset by host" in run.stderr, run.describe()


def test_sandbox_reset_reaches_the_host_as_a_reset(run_client: RunClient,
                                                    fakenet: FakeNet) -> None:
    run = run_client("reset-them", "203.0.113.10", "80", allow=ALLOW)
    assert run.expect_result() == run.result and run.get("echoed") == "abc", run.describe()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        seen = [c.ending for c in fakenet.connections("203.0.113.10", 80)]
        if seen and seen[0]:
            break
        time.sleep(0.05)
    assert [c.ending for c in fakenet.connections("203.0.113.10", 80)] == ["reset"]
