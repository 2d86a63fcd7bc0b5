"""Many concurrent TCP connections from one process, run *inside* the tapbox sandbox.

Theory of operation: one selector loop, non-blocking sockets, three phases so that every
connection really is open at the same time and really moves data:

1. connect all N sockets (to the blob servers' ``ECHO`` protocol, round-robin over the
   given ports) and wait until every one is established;
2. send each connection ``ECHO\\n`` plus its own payload (a few KB, distinct per connection:
   different seed and different length) and read the echo back until all of it has arrived,
   while keeping every connection open;
3. half-close all of them and read until the server's EOF.

The echo of each connection is compared with what it sent. RLIMIT_NOFILE is raised to what
N sockets need first, then a ``{"event": "ready"}`` line is printed and the tool sits idle for
--settle seconds (so the caller can sample tapbox idle). At the end it prints one JSON line:
counts, phase timings, and the failures (at most a few, by connection index) if any, with the
sandbox kernel's view (tap0 counters, ARP, TCP MIB) if not every connection came up; exit
status 0 only if all N echoes were right.

    conns.py HOST PORT[,PORT...] N [--size BYTES] [--timeout SECONDS] [--settle S] [--hold S]
"""

from __future__ import annotations

import argparse
import errno
import json
import random
import resource
import selectors
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Conn:
    index: int
    sock: socket.socket
    payload: bytes
    state: str = "connecting"  # connecting -> connected -> echoing -> closing -> done | failed
    out: memoryview = field(default_factory=lambda: memoryview(b""))
    got: bytearray = field(default_factory=bytearray)
    error: str = ""


def payload_for(index: int, size: int) -> bytes:
    """Distinct content and length per connection (size .. size + 96 bytes)."""
    return random.Random(index * 7919 + 1).randbytes(size + index % 97)


def raise_nofile(need: int) -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class Runner:
    def __init__(self, host: str, ports: list[int], n: int, size: int, deadline: float) -> None:
        self.sel = selectors.DefaultSelector()
        self.deadline = deadline
        self.conns: list[Conn] = []
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for i in range(n):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            err = sock.connect_ex((host, ports[i % len(ports)]))
            conn = Conn(i, sock, payload_for(i, size))
            self.conns.append(conn)
            if err not in (0, errno.EINPROGRESS):
                self.fail(conn, f"connect: {errno.errorcode.get(err, err)}")
                continue
            self.sel.register(sock, selectors.EVENT_WRITE, conn)

    def fail(self, conn: Conn, why: str) -> None:
        conn.state, conn.error = "failed", why
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def count(self, *states: str) -> int:
        return sum(1 for c in self.conns if c.state in states)

    def loop_until(self, done: Callable[[], bool]) -> bool:
        while not done():
            left = self.deadline - time.monotonic()
            if left <= 0:
                return False
            for key, mask in self.sel.select(timeout=min(left, 1.0)):
                self.handle(key.data, mask)
        return True

    def handle(self, conn: Conn, mask: int) -> None:
        sock = conn.sock
        try:
            if conn.state == "connecting":
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self.fail(conn, f"connect: {errno.errorcode.get(err, err)}")
                    return
                conn.state = "connected"
                self.sel.modify(sock, selectors.EVENT_READ, conn)  # EOF or reset shows here
                return
            if mask & selectors.EVENT_WRITE and conn.out:
                sent = sock.send(conn.out)
                conn.out = conn.out[sent:]
                if not conn.out:
                    self.sel.modify(sock, selectors.EVENT_READ, conn)
            if mask & selectors.EVENT_READ:
                data = sock.recv(65536)
                if not data:
                    if conn.state == "closing":
                        conn.state = "done"
                        self.sel.unregister(sock)
                        sock.close()
                    else:
                        self.fail(conn, f"early EOF in state {conn.state} after "
                                        f"{len(conn.got)} bytes")
                    return
                conn.got += data
                if len(conn.got) > len(conn.payload):
                    self.fail(conn, f"too much echoed: {len(conn.got)} > {len(conn.payload)}")
        except OSError as exc:
            self.fail(conn, f"{conn.state}: {exc}")

    def start_echo(self) -> None:
        for conn in self.conns:
            if conn.state == "connected":
                conn.state = "echoing"
                conn.out = memoryview(b"ECHO\n" + conn.payload)
                self.sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def echoed(self) -> bool:
        return all(len(c.got) >= len(c.payload) for c in self.conns if c.state == "echoing")

    def start_close(self) -> None:
        for conn in self.conns:
            if conn.state == "echoing":
                if conn.got != conn.payload:
                    self.fail(conn, "echo differs from what was sent")
                    continue
                conn.state = "closing"
                try:
                    conn.sock.shutdown(socket.SHUT_WR)
                except OSError as exc:
                    self.fail(conn, f"shutdown: {exc}")


def diagnostics() -> dict[str, object]:
    """What the sandbox's kernel knows, for a failure report: tap0 counters, ARP, TCP MIB."""
    info: dict[str, object] = {}
    stats = "/sys/class/net/tap0/statistics"
    try:
        info["tap0"] = {
            name: int(open(f"{stats}/{name}").read())
            for name in ("tx_packets", "tx_dropped", "rx_packets", "rx_dropped")
        }
    except OSError as exc:
        info["tap0"] = str(exc)
    for key, path in (("arp", "/proc/net/arp"), ("snmp", "/proc/net/snmp")):
        try:
            info[key] = [line for line in open(path).read().splitlines()
                         if key == "arp" or line.startswith("Tcp:")]
        except OSError as exc:
            info[key] = str(exc)
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="conns.py")
    p.add_argument("host")
    p.add_argument("ports", help="comma-separated, used round-robin")
    p.add_argument("n", type=int)
    p.add_argument("--size", type=int, default=4000, help="payload bytes (plus index %% 97)")
    p.add_argument("--timeout", type=float, default=90.0)
    p.add_argument("--settle", type=float, default=0.3,
                   help="seconds to sit idle after printing the ready line (for sampling)")
    p.add_argument("--hold", type=float, default=0.0,
                   help="seconds to keep all connections open after the echoes (for sampling)")
    args = p.parse_args(argv)
    ports = [int(x) for x in args.ports.split(",")]
    limits = raise_nofile(args.n + 64)
    print(json.dumps({"event": "ready"}), flush=True)
    time.sleep(args.settle)
    start = time.monotonic()
    r = Runner(args.host, ports, args.n, args.size, start + args.timeout)
    result: dict[str, object] = {"n": args.n, "nofile": list(limits)}

    r.loop_until(lambda: r.count("connecting") == 0)
    result["connected"] = r.count("connected")
    result["connect_seconds"] = round(time.monotonic() - start, 3)
    if r.count("connected") < args.n:
        result["diagnostics"] = diagnostics()

    t = time.monotonic()
    r.start_echo()
    r.loop_until(r.echoed)
    result["open_after_echo"] = r.count("echoing")  # all still open, all data back
    result["echo_seconds"] = round(time.monotonic() - t, 3)
    if args.hold > 0:
        time.sleep(args.hold)

    t = time.monotonic()
    r.start_close()
    r.loop_until(lambda: r.count("closing") == 0)
    result["close_seconds"] = round(time.monotonic() - t, 3)
    for conn in r.conns:
        if conn.state not in ("done", "failed"):
            r.fail(conn, f"timed out in state {conn.state}")
    result["ok"] = r.count("done")
    result["bytes_each_way"] = sum(len(c.payload) for c in r.conns if c.state == "done")
    failures = [f"#{c.index}: {c.error}" for c in r.conns if c.state == "failed"]
    result["failed"] = len(failures)
    result["failures"] = failures[:10]
    result["seconds"] = round(time.monotonic() - start, 3)
    print(json.dumps(result), flush=True)
    return 0 if r.count("done") == args.n else 1


if __name__ == "__main__":
    sys.exit(main())
