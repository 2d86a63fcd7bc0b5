"""Raw SYNs from inside the tapbox sandbox to destinations written as the test wants them.

Theory of operation: a program's kernel never puts an IPv4-mapped (::ffff:a.b.c.d) or
IPv4-compatible (::a.b.c.d) destination on the wire, but the sandbox's root can (CAP_NET_RAW in
its namespace): this tool writes one hand-made Ethernet/IPv6 (or IPv4) SYN per target to tap0,
each from its own source port, and reports what came back for it within a few seconds:
"tcp:SA" (accepted: tapbox reached the destination), "tcp:RA" (refused) or nothing (dropped).
It reuses hostile.py's link and reply matching. Output: one JSON line
{"TARGET": [replies...], ...}.

    synprobe.py [V6ADDR]:PORT ... | V4ADDR:PORT ...
"""

from __future__ import annotations

import json
import sys
import time

from hostile import GATEWAY_MAC, ME4, ME6, Link, Scenario, describe
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

LISTEN = 3.0  # seconds to wait for an answer to each SYN (a refusal may wait for attribution)
FIRST_PORT = 43000


def main(argv: list[str]) -> int:
    link = Link()
    link.drain()
    out: dict[str, list[str]] = {}
    for index, target in enumerate(argv):
        host, port = target.rsplit(":", 1)
        host = host.strip("[]")
        sport = FIRST_PORT + index
        ip = IPv6(src=ME6, dst=host) if ":" in host else IP(src=ME4, dst=host)
        frame = Ether(src=link.mac, dst=GATEWAY_MAC) / ip / TCP(
            sport=sport, dport=int(port), flags="S", seq=1000, options=[("MSS", 1400)])
        scenario = Scenario(target, [frame], sport=sport)
        link.send(frame)
        replies: list[str] = []
        deadline = time.monotonic() + LISTEN
        while not replies and time.monotonic() < deadline:
            replies += [d for f in link.collect(0.05) if (d := describe(f, scenario))]
        out[target] = replies
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
