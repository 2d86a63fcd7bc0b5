"""A frame flood from inside the tapbox sandbox, with allowed transfers running meanwhile.

Theory of operation: the sandbox's root owns CAP_NET_RAW in its network namespace, so it can
write whole Ethernet frames to tap0 with an AF_PACKET socket; they reach tapbox's stack as if
the kernel had sent them, but the kernel knows nothing of these "connections" (it ignores the
RSTs and ICMP errors that come back). Every frame is built before the clock starts: one
template per target (Ethernet to the gateway's MAC, IPv4 from 10.0.2.100, then TCP SYN or UDP),
then per frame only the source port and the transport checksum change. The checksum is the
template's one's-complement sum taken once without the port, plus the port, folded.

Pacing (--window, default 256): tap0's queue towards tapbox holds about 1,000 frames and the
sender outruns tapbox by far (about 500,000 frames/s against tens of thousands), so unpaced,
nearly all frames die in that queue. The tool therefore keeps at most --window frames queued
(tap0's tx_packets counts the frames tapbox has read, tx_dropped the ones the queue dropped):
every frame reaches the stack, as fast as tapbox takes them. --window 0 sends unpaced.

Meanwhile a thread runs ``client.py get HOST PORT N`` transfers (each a separate process, as an
ordinary program would, --pause seconds apart) from before the first flood frame until the flood
is over, so at least one transfer overlaps the flood. Prints a ``{"event": "ready"}`` line and
sits idle for --settle seconds first (so the caller can sample tapbox idle), then, at the end,
one JSON line: frames sent, send errors, the flood's duration and rate, tap0's counters
before/after, and every transfer's result with its start and end time.

    flood.py --target tcp:203.0.113.7:80 [--target udp:192.0.2.10:5353:64 ...] --count 100000
             [--transfer 192.0.2.10:80:5000000 --client /path/to/client.py] [--window W]
             [--exit N]

A target is PROTO:ADDR:PORT[:SPORTS]; SPORTS = how many distinct source ports to cycle through
(default: a random port in 1024-65535 for every frame). Frames go round-robin over targets.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

IFNAME = "tap0"
GATEWAY_MAC = bytes.fromhex("525500000202")
SANDBOX_IP = "10.0.2.100"
SIOCGIFHWADDR = 0x8927
PROTO_TCP, PROTO_UDP = 6, 17
TCP_SYN = 0x02
UDP_PAYLOAD = b"tapbox-flood-datagram"


def ones_sum(data: bytes) -> int:
    """The one's-complement sum of 16-bit words (unfolded; data padded to even length)."""
    if len(data) % 2:
        data += b"\0"
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def fold(total: int) -> int:
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def interface_mac(name: str = IFNAME) -> bytes:
    try:
        with open(f"/sys/class/net/{name}/address") as f:
            return bytes.fromhex(f.read().strip().replace(":", ""))
    except OSError:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            ifreq = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR, struct.pack("256s", name.encode()))
            return ifreq[18:24]


def ipv4_header(src: bytes, dst: bytes, proto: int, payload_len: int, ident: int) -> bytes:
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, ident, 0x4000,
                                64, proto, 0, src, dst))
    struct.pack_into("!H", hdr, 10, ~fold(ones_sum(bytes(hdr))) & 0xFFFF)
    return bytes(hdr)


@dataclass
class Template:
    """One target's frame, with the source port and checksum left to patch per frame."""

    frame: bytearray
    sport_at: int  # offset of the source port in the frame
    csum_at: int  # offset of the transport checksum
    base: int  # unfolded one's-complement sum of pseudo header + segment, sport and csum 0
    sports: list[int] | None  # the source ports to cycle through (None: random)


def build_template(proto: str, dst: str, dport: int, src_mac: bytes,
                   sports: int | None) -> Template:
    src_b, dst_b = socket.inet_aton(SANDBOX_IP), socket.inet_aton(dst)
    if proto == "tcp":
        # SYN with an MSS option, as a kernel would send it.
        segment = struct.pack("!HHIIBBHHH", 0, dport, 0x1000_0000, 0, 6 << 4, TCP_SYN, 64240,
                              0, 0) + struct.pack("!BBH", 2, 4, 1460)
        number, csum_off = PROTO_TCP, 16
    elif proto == "udp":
        segment = struct.pack("!HHHH", 0, dport, 8 + len(UDP_PAYLOAD), 0) + UDP_PAYLOAD
        number, csum_off = PROTO_UDP, 6
    else:
        raise SystemExit(f"unknown protocol {proto!r}")
    pseudo = src_b + dst_b + struct.pack("!BBH", 0, number, len(segment))
    eth = GATEWAY_MAC + src_mac + b"\x08\x00"
    ip = ipv4_header(src_b, dst_b, number, len(segment), random.getrandbits(16))
    frame = bytearray(eth + ip + segment)
    start = len(eth) + len(ip)
    ports = None
    if sports:
        ports = random.sample(range(1024, 65536), sports)
    return Template(frame, start, start + csum_off, ones_sum(pseudo + segment), ports)


def build_frames(templates: list[Template], count: int) -> list[bytes]:
    frames: list[bytes] = []
    for i in range(count):
        t = templates[i % len(templates)]
        sport = t.sports[(i // len(templates)) % len(t.sports)] if t.sports else \
            random.randrange(1024, 65536)
        csum = ~fold(t.base + sport) & 0xFFFF
        struct.pack_into("!H", t.frame, t.sport_at, sport)
        struct.pack_into("!H", t.frame, t.csum_at, csum or 0xFFFF)
        frames.append(bytes(t.frame))
    return frames


def tap_counters() -> dict[str, int]:
    out: dict[str, int] = {}
    for name in ("tx_packets", "tx_dropped", "rx_packets", "rx_dropped"):
        try:
            with open(f"/sys/class/net/{IFNAME}/statistics/{name}") as f:
                out[name] = int(f.read())
        except OSError:
            pass
    return out


class Transfers(threading.Thread):
    """``client.py get`` back to back until told to stop (and at least once)."""

    def __init__(self, client: str, host: str, port: int, n: int, pause: float) -> None:
        super().__init__(daemon=True)
        self.argv = [sys.executable, client, "get", host, str(port), str(n)]
        self.pause = pause
        self.stop = threading.Event()
        self.started_one = threading.Event()
        self.results: list[dict[str, Any]] = []

    def run(self) -> None:
        while True:
            start = time.monotonic()
            proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
            self.started_one.set()
            try:
                out, err = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                err += "\n(killed after 120 s)"
            end = time.monotonic()
            try:
                result = json.loads(out.strip().splitlines()[-1])
            except (ValueError, IndexError):
                result = {"error": "no JSON", "stdout": out[-500:]}
            result.update(status=proc.returncode, start=start, end=end, stderr=err[-500:])
            self.results.append(result)
            if self.stop.wait(self.pause):
                return


class Counter:
    """One of tap0's counters, re-read cheaply (sysfs attributes re-read with pread at 0)."""

    def __init__(self, name: str) -> None:
        self.fd = os.open(f"/sys/class/net/{IFNAME}/statistics/{name}", os.O_RDONLY)

    def read(self) -> int:
        return int(os.pread(self.fd, 32, 0))

    def close(self) -> None:
        os.close(self.fd)


def flood(frames: list[bytes], window: int) -> dict[str, Any]:
    """Send every frame; with a window, keep at most that many queued towards tapbox.

    tap0's tx_packets counts the frames tapbox has read and tx_dropped those the full queue
    dropped, so frames sent minus both is what still waits in the queue. Without a window the
    frames go as fast as the socket takes them and most die in the queue (counted).
    """
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((IFNAME, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    send = sock.send
    errors: dict[str, int] = {}
    tx, dropped = Counter("tx_packets"), Counter("tx_dropped")
    before = tap_counters()
    tx0, dropped0 = tx.read(), dropped.read()
    total, sent, waits = len(frames), 0, 0
    start = time.monotonic()
    while sent < total:
        burst = total - sent
        if window:
            queued = sent - (tx.read() - tx0) - (dropped.read() - dropped0)
            burst = min(burst, window - queued, 64)
            if burst <= 0:
                waits += 1
                time.sleep(0.0001)
                continue
        for frame in frames[sent:sent + burst]:
            try:
                send(frame)
            except OSError as exc:
                name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                errors[name] = errors.get(name, 0) + 1
        sent += burst
    end = time.monotonic()
    sock.close()
    deadline = time.monotonic() + 10  # let the queue drain before reading the counters
    while time.monotonic() < deadline and \
            tx.read() - tx0 + dropped.read() - dropped0 < total:
        time.sleep(0.01)
    time.sleep(0.2)
    tx.close()
    dropped.close()
    after = tap_counters()
    seconds = max(end - start, 1e-6)
    return {
        "frames": total,
        "window": window,
        "send_errors": errors,
        "start": start,
        "end": end,
        "seconds": round(seconds, 3),
        "rate_pps": round(total / seconds),
        "waits": waits,
        "tap0_delta": {k: after[k] - before.get(k, 0) for k in after},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flood.py")
    p.add_argument("--target", action="append", required=True,
                   help="PROTO:ADDR:PORT[:SPORTS], may repeat (round-robin)")
    p.add_argument("--count", type=int, default=100_000)
    p.add_argument("--transfer", help="HOST:PORT:N for client.py get during the flood")
    p.add_argument("--client", help="path of tests/client.py")
    p.add_argument("--pause", type=float, default=1.0,
                   help="seconds between two transfers (the flood gets the engine meanwhile)")
    p.add_argument("--settle", type=float, default=0.3,
                   help="seconds to sit idle after printing the ready line (for sampling)")
    p.add_argument("--exit", type=int, default=0, help="exit status once done")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--window", type=int, default=256,
                   help="frames queued towards tapbox at most (0: unpaced, as fast as possible)")
    args = p.parse_args(argv)
    random.seed(args.seed)
    print(json.dumps({"event": "ready"}), flush=True)
    time.sleep(args.settle)

    mac = interface_mac()
    templates = []
    for spec in args.target:
        parts = spec.split(":")
        sports = int(parts[3]) if len(parts) > 3 else None
        templates.append(build_template(parts[0], parts[1], int(parts[2]), mac, sports))
    t = time.monotonic()
    frames = build_frames(templates, args.count)
    result: dict[str, Any] = {"build_seconds": round(time.monotonic() - t, 3),
                              "sandbox_mac": mac.hex(":")}

    transfers = None
    if args.transfer:
        host, port, n = args.transfer.rsplit(":", 2)
        transfers = Transfers(args.client or "client.py", host, int(port), int(n), args.pause)
        transfers.start()
        transfers.started_one.wait(30)
        time.sleep(0.05)  # the first transfer is under way (its process is starting)
    result["flood"] = flood(frames, args.window)
    if transfers is not None:
        transfers.stop.set()
        transfers.join(timeout=300)
        result["transfers"] = transfers.results
    print(json.dumps(result), flush=True)
    return args.exit


if __name__ == "__main__":
    sys.exit(main())
