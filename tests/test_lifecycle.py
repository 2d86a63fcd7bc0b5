"""What happens around the command's exit: nothing it sent is lost."""

from __future__ import annotations

import time

from conftest import RunClient
from fakenet import FakeNet

SIZE = 20_000_000


def test_data_in_flight_when_the_command_exits_still_arrives(run_client: RunClient,
                                                              fakenet: FakeNet) -> None:
    # The client sends 20 MB to a slow reader, closes and exits at once: its kernel is still
    # sending when the command is gone, and tapbox must serve until it reached the server.
    run = run_client("put", "192.0.2.10", "80", str(SIZE), "--no-wait", "--slow",
                     allow=["192.0.2.10:80"])
    assert run.returncode == 0, run.describe()
    header = len(f"SLOWPUT {SIZE}\n")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        done = [c for c in fakenet.connections("192.0.2.10", 80) if c.bytes_in >= SIZE + header]
        if done:
            break
        time.sleep(0.05)
    received = max((c.bytes_in for c in fakenet.connections("192.0.2.10", 80)), default=0)
    assert received == SIZE + header, f"the server got {received} of {SIZE + header} bytes"
