"""Packet capture: `--pcap FILE` writes tap0's frames in classic pcap format (read back here with
scapy, an independent reader), both directions, bounded by --pcap-limit; and PcapWriter alone."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CLIENT, RunTapbox
from fakenet import FakeNet
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import ARP, Ether
from scapy.utils import rdpcap

from tapbox.pcap import GLOBAL_HEADER, PcapWriter, parse_size

SHORT = 30.0


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def test_pcap_holds_the_handshake_of_a_flow(run_tapbox: RunTapbox, fakenet: FakeNet,
                                            tmp_path: Path) -> None:
    pcap = tmp_path / "run.pcap"
    proc = run_tapbox("--pcap", str(pcap), allow=["192.0.2.10:80"],
                      cmd=[sys.executable, str(CLIENT), "hello", "192.0.2.10", "80"],
                      timeout=SHORT)
    assert proc.returncode == 0, describe(proc)
    assert f"frames to {pcap}" in proc.stderr, describe(proc)
    raw = pcap.read_bytes()
    assert raw[:24] == GLOBAL_HEADER
    magic, major, minor, _, _, _, linktype = struct.unpack("<IHHiIII", raw[:24])
    assert (magic, major, minor, linktype) == (0xA1B2C3D4, 2, 4, 1)

    packets = rdpcap(str(pcap))
    assert all(isinstance(p, Ether) for p in packets)
    assert any(ARP in p for p in packets), "the sandbox's ARP for its gateway is missing"
    tcp = [p for p in packets if TCP in p and IP in p
           and {p[TCP].sport, p[TCP].dport} & {80}]
    out = [p for p in tcp if p[IP].dst == "192.0.2.10" and p[TCP].dport == 80]
    back = [p for p in tcp if p[IP].src == "192.0.2.10" and p[TCP].sport == 80]
    syn = [p for p in out if p[TCP].flags == "S"]
    synack = [p for p in back if p[TCP].flags == "SA"]
    assert len(syn) == 1 and len(synack) == 1, [p.summary() for p in tcp]
    assert synack[0][TCP].ack == syn[0][TCP].seq + 1
    client_port = syn[0][TCP].sport
    ack = [p for p in out if p[TCP].flags == "A" and p[TCP].sport == client_port
           and p[TCP].ack == synack[0][TCP].seq + 1]
    assert ack, "the third packet of the handshake is missing"
    assert packets.index(syn[0]) < packets.index(synack[0]) < packets.index(ack[0])
    sent = b"".join(bytes(p[TCP].payload) for p in out)
    received = b"".join(bytes(p[TCP].payload) for p in back)
    assert sent == b"HELLO\n" and received == b"hello from 192.0.2.10:80\n"
    stamps = [float(p.time) for p in packets]
    assert stamps == sorted(stamps) and stamps[-1] - stamps[0] < SHORT


def test_pcap_limit_stops_capture_and_says_so(run_tapbox: RunTapbox, fakenet: FakeNet,
                                              tmp_path: Path) -> None:
    pcap = tmp_path / "run.pcap"
    proc = run_tapbox("--pcap", str(pcap), "--pcap-limit", "400", allow=["192.0.2.10:80"],
                      cmd=[sys.executable, str(CLIENT), "hello", "192.0.2.10", "80"],
                      timeout=SHORT)
    assert proc.returncode == 0, describe(proc)  # the sandbox runs on
    assert "reached --pcap-limit (400 bytes)" in proc.stderr, describe(proc)
    assert 24 < pcap.stat().st_size <= 400
    assert len(rdpcap(str(pcap))) >= 1


def test_bad_pcap_options_stop_before_the_command(run_tapbox: RunTapbox, tmp_path: Path) -> None:
    for args in (["--pcap", str(tmp_path / "no-dir" / "x.pcap")],
                 ["--pcap", str(tmp_path / "x.pcap"), "--pcap-limit", "lots"],
                 ["-n", "--pcap", str(tmp_path / "x.pcap")]):
        proc = run_tapbox(*args, cmd=["sh", "-c", "echo COMMAND-RAN"], timeout=SHORT)
        assert proc.returncode == 125, (args, describe(proc))
        assert "COMMAND-RAN" not in proc.stdout and "pcap" in proc.stderr, describe(proc)


# ------------------------------------------------------------------------------------------------
# PcapWriter on its own


def test_writer_records_frames_scapy_can_read(tmp_path: Path) -> None:
    path = tmp_path / "w.pcap"
    writer = PcapWriter(str(path))
    frames = [bytes(Ether(dst="02:00:00:00:00:01") / IP(dst="192.0.2.10") / TCP(dport=p))
              for p in (80, 443)]
    for frame in frames:
        writer.write(frame)
    writer.write(bytearray(frames[0]))
    writer.close()
    packets = rdpcap(str(path))
    assert [bytes(p) for p in packets] == [frames[0], frames[1], frames[0]]
    assert writer.frames == 3 and writer.size == path.stat().st_size


def test_writer_stops_at_the_limit_once(tmp_path: Path) -> None:
    path = tmp_path / "w.pcap"
    told: list[str] = []
    frame = bytes(60)
    limit = 24 + 2 * (16 + 60) + 10
    writer = PcapWriter(str(path), limit=limit, on_stop=told.append)
    for _ in range(5):
        writer.write(frame)
    writer.close()
    assert writer.frames == 2 and len(told) == 1 and "pcap-limit" in told[0]
    assert path.stat().st_size == 24 + 2 * (16 + 60)
    assert len(rdpcap(str(path))) == 2


@pytest.mark.parametrize(("text", "size"), [("100M", 100_000_000), ("64MiB", 64 << 20),
                                            ("500k", 500_000), ("123", 123)])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "0", "-5", "5ib"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)
