"""TCP through tapbox under faults injected at the frame seam (drop, duplicate, reorder, corrupt).

The seam sits between the TAP device and the stack, both directions, seeded (tapbox.net.faults);
the sandbox's own Linux TCP is the peer, so these are real-world recoveries on both sides.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import RunClient, client_cmd
from fakenet import FakeNet

from tapbox.net.faults import ENV_VAR, FaultSpec

SIZE = 50_000_000
FAULTS = "seed={seed},drop=0.02,dup=0.01,reorder=0.02,delay=0.005,corrupt=0.001"
ALLOW = ["192.0.2.10:80"]


def test_fault_spec_parses_and_rejects_unknown_items() -> None:
    spec = FaultSpec.parse(FAULTS.format(seed=4))
    assert (spec.seed, spec.drop, spec.dup, spec.reorder) == (4, 0.02, 0.01, 0.02)
    with pytest.raises(ValueError, match="unknown item"):
        FaultSpec.parse("lose=0.5")


@pytest.mark.slow
def test_50mb_download_under_loss_reordering_duplication(run_client: RunClient,
                                                         fakenet: FakeNet) -> None:
    run = run_client("get", "192.0.2.10", "80", str(SIZE), allow=ALLOW, timeout=300,
                     env={ENV_VAR: FAULTS.format(seed=11)})
    result = run.expect_result()
    assert run.returncode == 0, run.describe()
    assert result["sha256"] == fakenet.blob_sha256(SIZE)


@pytest.mark.slow
def test_50mb_upload_under_loss_reordering_duplication(run_client: RunClient) -> None:
    run = run_client("put", "192.0.2.10", "80", str(SIZE), allow=ALLOW, timeout=300,
                     env={ENV_VAR: FAULTS.format(seed=12)})
    result = run.expect_result()
    assert run.returncode == 0, run.describe()
    assert result["server_sha256"] == result["sent_sha256"]


def _rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@pytest.mark.slow
def test_slow_host_reader_slows_the_sandbox_not_memory(spawn_tapbox) -> None:  # type: ignore[no-untyped-def]
    """A 50 MB upload to a server reading slowly, with faults: memory stays flat."""
    proc = spawn_tapbox(cmd=client_cmd("put", "192.0.2.10", "80", str(SIZE), "--slow"),
                        allow=ALLOW, env={ENV_VAR: FAULTS.format(seed=13)})
    samples: list[int] = []
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        rss = _rss_kib(proc.pid)
        if rss is not None:
            samples.append(rss)
        time.sleep(0.1)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["server_sha256"] == result["sent_sha256"]
    assert result["seconds"] > 2.0, "the slow reader should have slowed the upload down"
    # Had the stack buffered the upload instead of closing its window, RSS would grow by tens
    # of MB; with back-pressure only the per-connection buffers (256 KiB each) are added.
    early, peak = samples[min(5, len(samples) - 1)], max(samples)
    assert peak - early < 16 * 1024, f"RSS grew from {early} KiB to {peak} KiB"
