"""Scale and floods: many concurrent connections, and 100,000-frame floods from inside.

Every test runs the real CLI with ``spawn_tapbox`` and a tool from tests/sandbox_tools/ as the
command, and samples the host-side process (``python -m tapbox``: the trio engine with the
stack, every host socket and the audit) for its resident memory (VmRSS) every 50 ms. Each
tool prints a ``{"event": "ready"}`` line and sits idle for a moment before it starts: the
samples in that moment are tapbox's idle RSS. The bounds asserted (idle measured on the
reference machine, Python 3.11, 2 cores: about 32 MB):

- 1,000 concurrent connections: peak <= 250 MB (the issue's target) and peak - idle <= 128 MiB
  (128 KiB per connection; about 27 MB was measured, ~27 KB per connection);
- any flood: peak <= 128 MiB and peak - idle <= 48 MiB (up to ~12 MB was measured: the half-open
  SYNs awaiting a host connect are capped at 1,024, datagram flows at 1,024, and denied flows
  keep no state).

The floods are paced to what tapbox reads (sandbox_tools/flood.py keeps at most 256 frames
queued on tap0), so all 100,000 frames really reach the stack instead of dying in the TAP queue;
the rates in the JSON are therefore tapbox's own. Each flood runs with allowed 5 MB downloads
going on (checked by sha256), and checks that nothing reached a server it must not reach.
The stack's drop counters (``Interface.drops``) are not visible from outside; tap0's counters
in the sandbox stand in for them (frames tapbox read, frames it wrote back).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import CLIENT, TESTS_DIR, SpawnTapbox, kill_group
from fakenet import FakeNet, in_internet

from tapbox.net.engine import EngineConfig

TOOLS = TESTS_DIR / "sandbox_tools"
MIB = 1024  # KiB per MiB (VmRSS is in KiB)

CONNECTIONS = 1000
CONN_PEAK_KIB = 250 * 1000 * 1000 // 1024  # 250 MB, the target
CONN_GROWTH_KIB = 128 * MIB

FLOOD_FRAMES = 100_000
FLOOD_PEAK_KIB = 128 * MIB
FLOOD_GROWTH_KIB = 48 * MIB
TRANSFER = 5_000_000
FLOOD_EXIT = 9  # the flood tool's exit status: tapbox must pass it on
FLOOD_TIMEOUT = 240.0

READY = '{"event": "ready"}'  # the tools' first line
BLACK_HOLE = ("198.51.100.20", 9)  # a listener whose accept queue is full: SYNs vanish


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


@dataclass
class Watched:
    """A finished tapbox run: exit status, output, and RSS samples (seconds, KiB)."""

    returncode: int
    stdout: str
    stderr: str
    samples: list[tuple[float, int]]
    ready_at: float | None  # when the tool printed its ready line (same clock as samples)
    settle: float
    ended_at: float  # when tapbox exited
    lines: list[tuple[float, str]] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max((kib for _, kib in self.samples), default=0)

    @property
    def idle(self) -> int:
        """RSS while the tool sat idle after its ready line (tapbox up, nothing served yet)."""
        if self.ready_at is None:
            return 0
        window = [kib for t, kib in self.samples
                  if self.ready_at <= t <= self.ready_at + self.settle]
        return max(window, default=0)

    def result(self) -> dict[str, Any]:
        for _, line in reversed(self.lines):
            if line.startswith("{") and line != READY:
                value = json.loads(line)
                assert isinstance(value, dict)
                return value
        pytest.fail(f"the tool printed no result\n{self.describe()}", pytrace=False)

    def describe(self) -> str:
        tail = self.stderr[-3000:]
        return (f"exit status {self.returncode}\nstdout:\n{self.stdout[-4000:]}\n"
                f"stderr (tail):\n{tail}\nRSS idle {self.idle} KiB, peak {self.peak} KiB")

    def assert_clean(self, status: int) -> None:
        """Exit status is the command's, and tapbox printed no traceback."""
        assert self.returncode == status, self.describe()
        assert "Traceback" not in self.stderr, self.describe()


def watch(proc: subprocess.Popen[str], timeout: float, settle: float) -> Watched:
    """Drain a spawned tapbox's output and sample its RSS until it exits."""
    lines: list[tuple[float, str]] = []
    err_chunks: list[str] = []

    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout, proc.stderr

    def read_out() -> None:
        for line in out:
            lines.append((time.monotonic(), line.strip()))

    def read_err() -> None:
        err_chunks.append(err.read())

    readers = [threading.Thread(target=read_out, daemon=True),
               threading.Thread(target=read_err, daemon=True)]
    for r in readers:
        r.start()
    samples: list[tuple[float, int]] = []
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        kib = rss_kib(proc.pid)
        if kib is not None:
            samples.append((time.monotonic(), kib))
        time.sleep(0.05)
    if proc.poll() is None:
        kill_group(proc)
        for r in readers:
            r.join(timeout=5)
        pytest.fail(f"tapbox did not finish within {timeout} s (killed)\nstdout:\n"
                    + "\n".join(text for _, text in lines)[-4000:]
                    + f"\nstderr:\n{''.join(err_chunks)[-3000:]}", pytrace=False)
    ended = time.monotonic()
    for r in readers:
        r.join(timeout=10)
    ready = next((t for t, text in lines if text == READY), None)
    return Watched(proc.returncode, "\n".join(text for _, text in lines), "".join(err_chunks),
                   samples, ready, settle, ended, lines)


def tool(name: str, *args: str) -> list[str]:
    return [sys.executable, str(TOOLS / name), *args]


def rss_report(w: Watched) -> str:
    return f"tapbox RSS: idle {w.idle / MIB:.1f} MiB, peak {w.peak / MIB:.1f} MiB"


# ------------------------------------------------------------------------------------------------
# 1,000 concurrent connections


def test_1000_concurrent_connections_each_echo_their_own_payload(
        spawn_tapbox: SpawnTapbox, fakenet: FakeNet) -> None:
    settle = 0.5
    proc = spawn_tapbox(cmd=tool("conns.py", "192.0.2.10", "80", str(CONNECTIONS),
                                 "--size", "4000", "--settle", str(settle), "--hold", "0.5",
                                 "--timeout", "90"),
                        allow=["192.0.2.10:80"])
    w = watch(proc, timeout=150, settle=settle)
    result = w.result()
    print(f"\n1,000 connections: {rss_report(w)}; {json.dumps(result)}")
    w.assert_clean(0)
    assert result["connected"] == CONNECTIONS, w.describe()
    assert result["open_after_echo"] == CONNECTIONS, "not all connections were open at once"
    assert result["ok"] == CONNECTIONS and result["failed"] == 0, w.describe()

    echoes = [c for c in fakenet.connections("192.0.2.10", 80) if c.command == "ECHO"]
    assert len(echoes) == CONNECTIONS, f"fakenet saw {len(echoes)} ECHO connections"
    sizes = sorted(4000 + i % 97 for i in range(CONNECTIONS))
    assert sorted(c.bytes_out for c in echoes) == sizes, "the server echoed other amounts"
    assert sum(c.bytes_out for c in echoes) == result["bytes_each_way"]

    assert w.idle > 0, "no RSS sample while the tool sat idle"
    assert w.peak <= CONN_PEAK_KIB, rss_report(w)
    assert w.peak - w.idle <= CONN_GROWTH_KIB, rss_report(w)


# ------------------------------------------------------------------------------------------------
# Floods


@pytest.fixture
def black_hole() -> Iterator[tuple[str, int]]:
    """A listener on BLACK_HOLE that never accepts, its accept queue filled first: a host
    connect to it neither succeeds nor fails (its SYNs are dropped) until tapbox gives up."""
    def listen() -> socket.socket:  # on the fake internet, where BLACK_HOLE's address is
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(BLACK_HOLE)
        sock.listen(0)
        return sock

    listener = in_internet(listen)
    fillers = []
    for _ in range(2):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex(BLACK_HOLE)
        fillers.append(s)
    time.sleep(0.1)
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.settimeout(0.3)
    try:
        probe.connect(BLACK_HOLE)
        pytest.fail("the black hole accepted a connection: its queue is not full")
    except TimeoutError:
        pass
    finally:
        probe.close()
    yield BLACK_HOLE
    for s in fillers:
        s.close()
    listener.close()


def run_flood(spawn_tapbox: SpawnTapbox, targets: list[str], allow: list[str]) -> Watched:
    settle = 0.5
    args: list[str] = []
    for target in targets:
        args += ["--target", target]
    args += ["--count", str(FLOOD_FRAMES), "--transfer", f"192.0.2.10:80:{TRANSFER}",
             "--client", str(CLIENT), "--settle", str(settle), "--exit", str(FLOOD_EXIT)]
    proc = spawn_tapbox(cmd=tool("flood.py", *args), allow=allow)
    return watch(proc, timeout=FLOOD_TIMEOUT, settle=settle)


def check_flood(w: Watched, fakenet: FakeNet) -> dict[str, Any]:
    """What every flood must leave true; returns the tool's result."""
    result = w.result()
    flood = result["flood"]
    print(f"\nflood {flood['frames']} frames in {flood['seconds']} s = {flood['rate_pps']}/s, "
          f"tap0 {flood['tap0_delta']}; {rss_report(w)}; transfers: "
          + ", ".join(f"{t.get('seconds', 0):.2f} s" for t in result["transfers"]))
    w.assert_clean(FLOOD_EXIT)
    # The flood really reached the stack, and the stack answered it.
    delta = flood["tap0_delta"]
    assert flood["send_errors"] == {}, flood
    assert delta["tx_packets"] >= 0.95 * FLOOD_FRAMES, f"tapbox read too few frames: {flood}"
    assert delta["rx_packets"] >= 0.9 * FLOOD_FRAMES, f"tapbox answered too few frames: {flood}"
    # Every allowed transfer completed intact, and at least one ran during the flood.
    transfers = result["transfers"]
    assert transfers, w.describe()
    want = fakenet.blob_sha256(TRANSFER)
    for t in transfers:
        assert t["status"] == 0 and t.get("sha256") == want and t.get("bytes") == TRANSFER, t
    assert any(t["start"] < flood["end"] and t["end"] > flood["start"] for t in transfers), \
        "no transfer overlapped the flood"
    reached = [(c.local_addr, c.local_port, c.command) for c in fakenet.connections()]
    assert reached == [("192.0.2.10", 80, f"GET {TRANSFER}")] * len(transfers), \
        f"the servers saw more than the transfers: {reached[:20]}"
    # Memory stayed bounded.
    assert w.idle > 0, "no RSS sample while the tool sat idle"
    assert w.peak <= FLOOD_PEAK_KIB, rss_report(w)
    assert w.peak - w.idle <= FLOOD_GROWTH_KIB, rss_report(w)
    return result


@pytest.mark.slow
def test_syn_flood_to_a_denied_address(spawn_tapbox: SpawnTapbox, fakenet: FakeNet) -> None:
    w = run_flood(spawn_tapbox, ["tcp:203.0.113.7:80"], allow=["192.0.2.10:80"])
    check_flood(w, fakenet)
    assert fakenet.connections("203.0.113.7") == [], "a denied SYN reached its server"
    assert w.stderr.count("denied tcp 203.0.113.7:80") == 1, \
        "a denied destination should be named once, not once per SYN"


@pytest.mark.slow
def test_syn_flood_to_allowed_but_dead_destinations(
        spawn_tapbox: SpawnTapbox, fakenet: FakeNet, black_hole: tuple[str, int]) -> None:
    # Refused by the host (nothing listens on 192.0.2.10:9), unreachable (no route to
    # 198.51.100.99), and a black hole (connects hang until evicted by newer SYNs).
    # Up to 1,024 of the black-hole SYNs are still pending when the command exits; tapbox
    # today waits for those too before it exits (see the black-hole exit test below).
    targets = ["tcp:192.0.2.10:9", "tcp:198.51.100.99:80",
               f"tcp:{black_hole[0]}:{black_hole[1]}"]
    w = run_flood(spawn_tapbox, targets, allow=["192.0.2.10", "198.51.100.0/24"])
    check_flood(w, fakenet)


@pytest.mark.slow
def test_udp_flood_to_allowed_and_denied_ports(spawn_tapbox: SpawnTapbox,
                                               fakenet: FakeNet) -> None:
    # Allowed: 64 flows from fixed ports, and a new flow per datagram (beyond the flow cap);
    # denied: an address with an echo server, and a port of an allowed address.
    targets = ["udp:192.0.2.10:5353:64", "udp:192.0.2.10:5353", "udp:203.0.113.7:5353",
               "udp:192.0.2.10:53"]
    w = run_flood(spawn_tapbox, targets, allow=["192.0.2.10:80", "192.0.2.10:5353"])
    check_flood(w, fakenet)
    assert fakenet.datagrams("203.0.113.7") == [], "a denied datagram reached its server"
    assert fakenet.datagrams("192.0.2.10", 53) == []
    arrived = fakenet.datagrams("192.0.2.10", 5353)
    assert len(arrived) >= FLOOD_FRAMES // 10, f"only {len(arrived)} allowed datagrams arrived"
    flows = {d.peer_port for d in arrived}  # one host socket per datagram flow
    assert 64 <= len(flows) <= EngineConfig().max_udp_flows, len(flows)


def test_black_hole_connect_does_not_hold_tapbox_after_the_command_exits(
        spawn_tapbox: SpawnTapbox, fakenet: FakeNet, black_hole: tuple[str, int]) -> None:
    """A command that gave up on a connect (its SYN never answered: the destination is a black
    hole) and exited: tapbox has nothing left to deliver and must exit with it, not wait
    for its own host connect to time out."""
    code = ("import socket, sys\n"
            "s = socket.socket(); s.settimeout(0.5)\n"
            f"try: s.connect({black_hole!r})\n"
            "except OSError: sys.exit(3)\n")
    start = time.monotonic()
    proc = spawn_tapbox(cmd=[sys.executable, "-c", code], allow=[black_hole[0]])
    w = watch(proc, timeout=60, settle=0)
    elapsed = time.monotonic() - start
    w.assert_clean(3)
    assert elapsed < 5.0, f"tapbox exited {elapsed:.1f} s after start (command: ~0.5 s)"
