"""Hand-made hostile frames from inside the tapbox sandbox, and what came back for each.

Theory of operation: the sandbox's root owns CAP_NET_RAW in its network namespace, so it can
write any Ethernet frame to tap0 (AF_PACKET) and read every frame tapbox writes back. Frames
are built with scapy, one *scenario* at a time (a spoofed source, an IPv4 option, a fragment
trick, an ARP lie, an IPv6 extension-header chain, ...). After each scenario the tool listens
for a short while and keeps the frames that answer it: TCP segments to the scenario's own
source port (every scenario has a distinct one), ICMP/ICMPv6 errors quoting that port, ARP
replies and neighbor advertisements. The test (tests/test_hostile.py) then checks the replies
here and, more importantly, what the fake servers outside recorded: nothing may reach a
destination the allowlist denies, and spoofed or malformed frames reach nothing at all.

After the scenarios the tool runs ``client.py hello`` (an ordinary program) to show that the
engine still works, and prints one JSON line: {"scenarios": [{"name", "start", "end",
"replies"}], "hello": {...}}. Exit status: --exit (default 0) once everything ran.

    hostile.py ipv4|ipv6 --client /path/to/client.py --hello HOST:PORT [--exit N]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_LSRR, IPOption_RR
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6NDOptDstLLAddr,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    PadN,
)
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet, Raw

IFNAME = "tap0"
GATEWAY_MAC = "52:55:00:00:02:02"
OTHER_MAC = "02:00:00:00:00:99"  # nobody on this link
LIAR_MAC = "02:00:00:00:00:66"  # what the ARP/NDP lies claim the gateway's MAC is
ME4, GW4, DNS4 = "10.0.2.100", "10.0.2.2", "10.0.2.3"
ME6, GW6, DNS6 = "fd00::100", "fd00::2", "fd00::3"
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
LISTEN = 0.25  # seconds to wait for answers after each scenario
PATIENCE = 3.0  # ...or, where an answer is due, until it arrives (at most this long)
# The answers a correct tapbox gives at once (no host round trip) or after one: waited for,
# so that a slow machine does not turn a late answer into a missing one.
AWAITED = {
    "control-syn-allowed": "tcp:SA",
    "udp-control-allowed": "udp",
    "ipopt-rr-denied": "tcp:RA",
    "ipopt-rr-denied-port": "tcp:RA",
    "ipopt-lsrr-to-denied": "tcp:RA",
    "udp-ipopt-denied": "icmp:",
    "arp-ask-gateway": "arp-reply",
    "v6-control-syn-allowed": "tcp:SA",
    "v6-hbh-dest-routing-denied": "tcp:RA",
    "v6-hbh-dest-denied-port": "tcp:RA",
    "v6-rh0-to-denied-naming-allowed": "tcp:RA",
    "v6-udp-chain-denied": "icmp6:",
    "v6-ndp-ask-gateway": "na:",
}


@dataclass
class Scenario:
    name: str
    frames: list[Packet]
    sport: int | None = None  # replies are TCP/UDP to this port, or ICMP errors quoting it
    arp: bool = False  # collect ARP replies / neighbor advertisements from the gateway
    result: dict[str, Any] = field(default_factory=dict)


class Link:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((IFNAME, 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.settimeout(0.02)
        with open(f"/sys/class/net/{IFNAME}/address") as f:
            self.mac = f.read().strip()

    def send(self, frame: Packet) -> None:
        self.sock.send(bytes(frame))

    def drain(self) -> None:
        self.sock.setblocking(False)
        try:
            while True:
                self.sock.recv(65536)
        except BlockingIOError:
            pass
        self.sock.settimeout(0.02)

    def collect(self, seconds: float) -> list[Ether]:
        """Frames tapbox wrote to the sandbox within `seconds` (not the ones we sent)."""
        frames: list[Ether] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data, addr = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            if addr[2] != PACKET_OUTGOING:
                frames.append(Ether(data))
        return frames


def describe(frame: Ether, scenario: Scenario) -> str | None:
    """A short name for a frame that answers `scenario`, or None if it answers something else."""
    if scenario.arp:
        if ARP in frame and frame[ARP].op == 2:
            return f"arp-reply:{frame[ARP].psrc}:{frame[ARP].hwsrc}"
        if ICMPv6ND_NA in frame:
            mac = frame[ICMPv6NDOptDstLLAddr].lladdr if ICMPv6NDOptDstLLAddr in frame else "?"
            return f"na:{frame[ICMPv6ND_NA].tgt}:{mac}"
        return None
    port = scenario.sport
    if port is None:
        return None
    if ICMP in frame:
        if frame[ICMP].type in (3, 11) and quoted_sport(bytes(frame[ICMP].payload)) == port:
            return f"icmp:{frame[ICMP].type}/{frame[ICMP].code}"
        return None
    if ICMPv6DestUnreach in frame:
        quoted = bytes(frame[ICMPv6DestUnreach].payload)
        if quoted_sport(quoted) == port:
            return f"icmp6:1/{frame[ICMPv6DestUnreach].code}"
        return None
    if TCP in frame and frame[TCP].dport == port:
        return f"tcp:{frame[TCP].flags}"
    if UDP in frame and frame[UDP].dport == port:
        return "udp"
    return None


def quoted_sport(quoted: bytes) -> int | None:
    """The source port of the datagram an ICMP error quotes (IPv6: past its extension headers)."""
    if len(quoted) >= 20 and quoted[0] >> 4 == 4:
        at = (quoted[0] & 0x0F) * 4
    elif len(quoted) >= 40 and quoted[0] >> 4 == 6:
        nxt, at = quoted[6], 40
        while nxt in (0, 43, 60) and len(quoted) >= at + 2:  # hop-by-hop, routing, dest opts
            nxt, at = quoted[at], at + (quoted[at + 1] + 1) * 8
    else:
        return None
    return int.from_bytes(quoted[at:at + 2], "big") if len(quoted) >= at + 2 else None


# ------------------------------------------------------------------------------------------------
# Scenarios


class Ports:
    def __init__(self, first: int) -> None:
        self.next = first

    def take(self) -> int:
        self.next += 1
        return self.next


def internet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_header_bytes(src: str, dst: str, sport: int, dport: int, flags: str = "S",
                     v6: bool = False) -> bytes:
    """A TCP header (with MSS option) whose checksum is right for src/dst."""
    ip = IPv6(src=src, dst=dst) if v6 else IP(src=src, dst=dst)
    pkt = ip / TCP(sport=sport, dport=dport, flags=flags, seq=1000,
                   options=[("MSS", 1460), ("NOP", None), ("NOP", None)])
    return bytes(pkt[TCP])


def ipv4_scenarios(me: str, ports: Ports) -> list[Scenario]:
    eth = Ether(src=me, dst=GATEWAY_MAC)
    raw4 = Ether(src=me, dst=GATEWAY_MAC, type=0x0800)  # for hand-made IPv4 bytes
    out: list[Scenario] = []

    def syn(name: str, dst: str, dport: int, src: str = ME4, ether: Ether | None = None,
            **ip_fields: Any) -> None:
        p = ports.take()
        frame = (ether or eth) / IP(src=src, dst=dst, **ip_fields) / \
            TCP(sport=p, dport=dport, flags="S", seq=1000, options=[("MSS", 1460)])
        out.append(Scenario(name, [frame], p))

    # The control: a well-formed raw SYN to an allowed destination is answered and proxied.
    syn("control-syn-allowed", "192.0.2.10", 80)
    # Spoofed sources towards allowed destinations.
    syn("spoof-src-10.0.2.50", "198.51.100.20", 80, src="10.0.2.50")
    syn("spoof-src-192.0.2.99", "192.0.2.21", 80, src="192.0.2.99")
    syn("spoof-src-gateway", "198.51.100.20", 80, src=GW4)
    syn("spoof-src-dns", "192.0.2.21", 80, src=DNS4)
    syn("spoof-src-0.0.0.0", "192.0.2.21", 80, src="0.0.0.0")
    # Not addressed to the gateway's MAC.
    syn("wrong-dst-mac", "198.51.100.20", 80, ether=Ether(src=me, dst=OTHER_MAC))
    # Broken checksums.
    p = ports.take()
    bad_ip = eth / IP(src=ME4, dst="192.0.2.21", chksum=0x1234) / TCP(sport=p, dport=80,
                                                                        flags="S")
    out.append(Scenario("bad-ip-checksum", [bad_ip], p))
    p = ports.take()
    bad_tcp = eth / IP(src=ME4, dst="192.0.2.21") / TCP(sport=p, dport=80, flags="S",
                                                         chksum=0x1234)
    out.append(Scenario("bad-tcp-checksum", [bad_tcp], p))
    # Data and ACKs with no handshake: answered with RST, never proxied.
    p = ports.take()
    out.append(Scenario("ack-without-handshake", [
        eth / IP(src=ME4, dst="198.51.100.20") / TCP(sport=p, dport=80, flags="PA", seq=5,
                                                      ack=77) / Raw(b"GET 1000\n")], p))
    # Odd flag combinations to a denied port (a SYN+FIN is still a SYN to decide).
    for flags in ("SF", "SU", "SEC", "SR", "FPU"):
        p = ports.take()
        out.append(Scenario(f"flags-{flags}-denied", [
            eth / IP(src=ME4, dst="203.0.113.7") / TCP(sport=p, dport=80, flags=flags)], p))
    # IPv4 options: the SYN is still decided on its destination (RST from a denied one).
    syn("ipopt-rr-denied", "203.0.113.7", 80, options=[IPOption_RR(routers=["0.0.0.0"] * 4)])
    syn("ipopt-rr-denied-port", "192.0.2.10", 443,
        options=[IPOption_RR(routers=["0.0.0.0"] * 9)])
    # Source routes. The TCP checksum covers the IPv4 header's destination (the one tapbox
    # decides on): scapy would take the route's last hop, and the segment would just drop.
    for name, dst, via in (("ipopt-lsrr-to-allowed-via-203.0.113.7", "192.0.2.20",
                            "203.0.113.7"),
                           ("ipopt-lsrr-to-denied", "203.0.113.10", "192.0.2.20")):
        p = ports.take()
        out.append(Scenario(name, [
            eth / IP(src=ME4, dst=dst, proto=6,
                     options=[IPOption_LSRR(routers=[via], pointer=4)]) /
            Raw(tcp_header_bytes(ME4, dst, p, 80))], p))
    p = ports.take()
    garbage = bytearray(bytes(IP(src=ME4, dst="203.0.113.7",
                                 options=[IPOption_RR(routers=["0.0.0.0"])]) /
                              TCP(sport=p, dport=443, flags="S")))
    garbage[21] = 0xFF  # the option's length runs past the header (checksum made right again)
    garbage[10:12] = b"\0\0"
    garbage[10:12] = internet_checksum(bytes(garbage[:(garbage[0] & 0x0F) * 4])).to_bytes(2,
                                                                                          "big")
    out.append(Scenario("ipopt-garbage-length-denied", [raw4 / Raw(bytes(garbage))], p))
    # Fragments: the stack never reassembles, so none of these may open a flow anywhere.
    p = ports.take()
    hdr = tcp_header_bytes(ME4, "203.0.113.7", p, 80)
    out.append(Scenario("frag-syn-denied", [
        eth / IP(src=ME4, dst="203.0.113.7", proto=6, id=701, flags="MF", frag=0) /
        Raw(hdr[:8]),
        eth / IP(src=ME4, dst="203.0.113.7", proto=6, id=701, frag=1) / Raw(hdr[8:])], p))
    p = ports.take()
    hdr = tcp_header_bytes(ME4, "203.0.113.10", p, 80)
    out.append(Scenario("frag-first-without-flags-denied", [
        # 8 bytes: the ports and the sequence number, but no flags: a filter looking only at
        # the first fragment cannot tell a SYN.
        eth / IP(src=ME4, dst="203.0.113.10", proto=6, id=702, flags="MF") / Raw(hdr[:8]),
        eth / IP(src=ME4, dst="203.0.113.10", proto=6, id=702, frag=1) / Raw(hdr[8:])], p))
    # RFC 1858 overlap: the first fragment says port 80 (allowed); another fragment at offset
    # 0 says 443 (denied); a reassembler that lets new data win would connect to 443.
    for name, order in (("frag-overlap-rewrites-port", (0, 1, 2)),
                        ("frag-overlap-reverse", (2, 1, 0))):
        p = ports.take()
        allowed_hdr = tcp_header_bytes(ME4, "192.0.2.10", p, 80)
        denied_hdr = tcp_header_bytes(ME4, "192.0.2.10", p, 443)
        pieces = [
            eth / IP(src=ME4, dst="192.0.2.10", proto=6, id=703, flags="MF") /
            Raw(allowed_hdr[:8]),
            eth / IP(src=ME4, dst="192.0.2.10", proto=6, id=703, flags="MF") /
            Raw(denied_hdr[:8]),
            eth / IP(src=ME4, dst="192.0.2.10", proto=6, id=703, frag=1) / Raw(denied_hdr[8:])]
        out.append(Scenario(name, [pieces[i] for i in order], p))
    p = ports.take()
    udp_frags = bytes(IP(src=ME4, dst="203.0.113.7") / UDP(sport=p, dport=5353) /
                      Raw(b"x" * 40))[20:]
    out.append(Scenario("frag-udp-denied", [
        eth / IP(src=ME4, dst="203.0.113.7", proto=17, id=705, flags="MF") /
        Raw(udp_frags[:16]),
        eth / IP(src=ME4, dst="203.0.113.7", proto=17, id=705, frag=2) / Raw(udp_frags[16:])],
        p))
    # UDP: a legitimate datagram (echoed), a spoofed one, and one to a denied address.
    for name, src, dst, size in (("udp-control-allowed", ME4, "192.0.2.10", 111),
                                 ("udp-spoof-src", "10.0.2.50", "192.0.2.10", 222),
                                 ("udp-spoof-src-public", "192.0.2.99", "192.0.2.10", 223),
                                 ("udp-ipopt-denied", ME4, "203.0.113.7", 333)):
        p = ports.take()
        opts = [IPOption_RR(routers=["0.0.0.0"] * 2)] if "ipopt" in name else []
        out.append(Scenario(name, [eth / IP(src=src, dst=dst, options=opts) /
                                   UDP(sport=p, dport=5353) / Raw(b"u" * size)], p))
    # ARP lies about the gateway and the DNS address, then a proper question.
    lies = [
        Ether(src=LIAR_MAC, dst="ff:ff:ff:ff:ff:ff") /
        ARP(op=2, hwsrc=LIAR_MAC, psrc=GW4, hwdst="ff:ff:ff:ff:ff:ff", pdst=GW4),
        Ether(src=LIAR_MAC, dst=GATEWAY_MAC) /
        ARP(op=2, hwsrc=LIAR_MAC, psrc=DNS4, hwdst=GATEWAY_MAC, pdst=GW4),
        Ether(src=LIAR_MAC, dst="ff:ff:ff:ff:ff:ff") /
        ARP(op=1, hwsrc=LIAR_MAC, psrc=GW4, pdst=GW4),  # gratuitous request
        Ether(src=me, dst="ff:ff:ff:ff:ff:ff") /
        ARP(op=1, hwsrc=me, psrc="10.0.2.50", pdst=GW4),  # a foreign sender asking
    ]
    out.append(Scenario("arp-lies", lies, arp=True))
    out.append(Scenario("arp-ask-gateway", [
        Ether(src=me, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=me, psrc=ME4, pdst=GW4),
        Ether(src=me, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=me, psrc=ME4, pdst=DNS4)],
        arp=True))
    # Malformed frames: dropped and counted, nothing else.
    p = ports.take()
    out.append(Scenario("malformed", [
        Raw(b"\x00" * 14),  # a bare Ethernet header of zeros
        Ether(src=me, dst=GATEWAY_MAC, type=0x0800),  # IPv4 with no header at all
        Ether(src=me, dst=GATEWAY_MAC, type=0x88B5) / Raw(b"local experimental"),
        raw4 / Raw(b"\x45\x00"),  # a truncated IPv4 header
        raw4 / Raw(bytes(IP(src=ME4, dst="203.0.113.7", len=4000) /
                        TCP(sport=p, dport=80, flags="S"))),
        raw4 / Raw(b"\x4f" + bytes(IP(src=ME4, dst="203.0.113.7") /
                                  TCP(sport=p, dport=80, flags="S"))[1:]),
        eth / IP(src=ME4, dst="203.0.113.7", version=5) / TCP(sport=p, dport=80, flags="S"),
        eth / IP(src=ME4, dst="203.0.113.7") / TCP(sport=p, dport=80, flags="S", dataofs=15),
        eth / IP(src=ME4, dst="203.0.113.7") / UDP(sport=p, dport=5353, len=4000) / Raw(b"x"),
        eth / IP(src=ME4, dst="203.0.113.7", proto=1) / Raw(b"\x08"),
        eth / IP(src=ME4, dst="203.0.113.7", proto=132) / Raw(b"sctp?"),
        eth / IP(src=ME4, dst="203.0.113.7") / TCP(sport=0, dport=80, flags="S"),
        eth / IP(src=ME4, dst="203.0.113.7") / TCP(sport=p, dport=0, flags="S"),
        eth / IP(src=ME4, dst="255.255.255.255") / TCP(sport=p, dport=80, flags="S"),
        eth / IP(src=ME4, dst="127.0.0.1") / TCP(sport=p, dport=80, flags="S"),
        eth / IP(src=ME4, dst="224.0.0.1") / UDP(sport=p, dport=5353),
    ], p))
    return out


def ipv6_scenarios(me: str, ports: Ports) -> list[Scenario]:
    eth = Ether(src=me, dst=GATEWAY_MAC)
    out: list[Scenario] = []

    def hbh() -> Packet:
        return IPv6ExtHdrHopByHop(options=[PadN(optdata=b"\0" * 4)])

    def dest() -> Packet:
        return IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\0" * 4)])

    def tcp_syn(p: int, dport: int) -> Packet:
        return TCP(sport=p, dport=dport, flags="S", seq=1000, options=[("MSS", 1440)])

    def add(name: str, dst: str, dport: int, chain: Callable[[], list[Packet]],
            src: str = ME6, ether: Ether | None = None) -> None:
        p = ports.take()
        pkt: Packet = IPv6(src=src, dst=dst)
        for ext in chain():
            pkt = pkt / ext
        out.append(Scenario(name, [(ether or eth) / pkt / tcp_syn(p, dport)], p))

    add("v6-control-syn-allowed", "2001:db8::10", 80, list)
    add("v6-spoof-src-fd00::50", "2001:db8::10", 80, list, src="fd00::50")
    add("v6-spoof-src-2001:db8::99", "2001:db8::10", 80, list, src="2001:db8::99")
    add("v6-spoof-src-link-local", "2001:db8::10", 80, list, src="fe80::99")
    add("v6-wrong-dst-mac", "2001:db8::10", 80, list, ether=Ether(src=me, dst=OTHER_MAC))
    # Extension-header chains: a SYN behind them is still decided on its destination.
    add("v6-hbh-dest-routing-denied", "2001:db8::53", 53,
        lambda: [hbh(), dest(), IPv6ExtHdrRouting(type=0, segleft=0, addresses=[]), dest()])
    add("v6-hbh-dest-denied-port", "2001:db8::10", 443, lambda: [hbh(), dest()])
    def long_chain() -> list[Packet]:
        return [hbh()] + [dest() for _ in range(20)]

    add("v6-long-chain-denied", "2001:db8::53", 53, long_chain)
    add("v6-long-chain-to-allowed", "2001:db8::10", 80, long_chain)
    # Routing header type 0 (deprecated, RFC 5095) naming the other address: the flow's
    # destination is the one in the IPv6 header, decided as such; never the listed one.
    # Routing header type 0 (deprecated, RFC 5095) naming the other address. The TCP checksum
    # covers the IPv6 header's destination (scapy would use the route's last address, and the
    # segment would just drop): the flow is decided, and proxied, to that destination only.
    for name, dst, via, dport in (("v6-rh0-to-allowed-naming-2001:db8::53", "2001:db8::10",
                                   "2001:db8::53", 80),
                                  ("v6-rh0-to-denied-naming-allowed", "2001:db8::53",
                                   "2001:db8::10", 53)):
        p = ports.take()
        out.append(Scenario(name, [
            eth / IPv6(src=ME6, dst=dst) /
            IPv6ExtHdrRouting(nh=6, type=0, segleft=1, addresses=[via]) /
            Raw(tcp_header_bytes(ME6, dst, p, dport, v6=True))], p))
    # Fragment headers: an atomic fragment (offset 0, M=0) and a real split.
    add("v6-atomic-fragment-denied", "2001:db8::53", 53,
        lambda: [IPv6ExtHdrFragment(offset=0, m=0, id=0x777)])
    add("v6-hbh-then-fragment-denied", "2001:db8::53", 53,
        lambda: [hbh(), IPv6ExtHdrFragment(offset=0, m=0, id=0x778)])
    p = ports.take()
    hdr = tcp_header_bytes(ME6, "2001:db8::53", p, 53, v6=True)
    out.append(Scenario("v6-fragmented-syn-denied", [
        eth / IPv6(src=ME6, dst="2001:db8::53") / IPv6ExtHdrFragment(nh=6, offset=0, m=1,
                                                                      id=0x779) / Raw(hdr[:8]),
        eth / IPv6(src=ME6, dst="2001:db8::53") / IPv6ExtHdrFragment(nh=6, offset=1, m=0,
                                                                      id=0x779) / Raw(hdr[8:])],
        p))
    p = ports.take()
    allowed_hdr = tcp_header_bytes(ME6, "2001:db8::10", p, 80, v6=True)
    denied_hdr = tcp_header_bytes(ME6, "2001:db8::10", p, 5353, v6=True)
    out.append(Scenario("v6-frag-overlap-rewrites-port", [
        eth / IPv6(src=ME6, dst="2001:db8::10") /
        IPv6ExtHdrFragment(nh=6, offset=0, m=1, id=0x77A) / Raw(allowed_hdr[:8]),
        eth / IPv6(src=ME6, dst="2001:db8::10") /
        IPv6ExtHdrFragment(nh=6, offset=0, m=0, id=0x77A) / Raw(denied_hdr)], p))
    # Broken chains: lengths past the packet, an unknown next header.
    p = ports.take()
    base = bytes(IPv6(src=ME6, dst="2001:db8::53") / hbh() / tcp_syn(p, 53))
    cut = bytearray(base)
    cut[41] = 200  # the hop-by-hop header's length runs far past the payload
    unknown = bytearray(base)
    unknown[40] = 253  # next header: experimental, after hop-by-hop
    raw6 = Ether(src=me, dst=GATEWAY_MAC, type=0x86DD)
    out.append(Scenario("v6-broken-chains", [raw6 / Raw(bytes(cut)), raw6 / Raw(bytes(unknown)),
                                             raw6 / Raw(base[:44])], p))
    # UDP behind a chain to a denied port; and spoofed UDP.
    p = ports.take()
    out.append(Scenario("v6-udp-chain-denied", [
        eth / IPv6(src=ME6, dst="2001:db8::10") / hbh() / dest() / UDP(sport=p, dport=53) /
        Raw(b"q" * 20)], p))
    p = ports.take()
    out.append(Scenario("v6-udp-spoof-src", [
        eth / IPv6(src="fd00::50", dst="2001:db8::10") / UDP(sport=p, dport=5353) /
        Raw(b"s" * 222)], p))
    # NDP lies about the gateway, then a proper question.
    lies = [
        Ether(src=LIAR_MAC, dst="33:33:00:00:00:01") /
        IPv6(src="fe80::66", dst="ff02::1", hlim=255) /
        ICMPv6ND_NA(tgt=GW6, R=1, S=0, O=1) / ICMPv6NDOptDstLLAddr(lladdr=LIAR_MAC),
        Ether(src=LIAR_MAC, dst=GATEWAY_MAC) /
        IPv6(src=ME6, dst=GW6, hlim=255) /
        ICMPv6ND_NA(tgt=DNS6, R=1, S=1, O=1) / ICMPv6NDOptDstLLAddr(lladdr=LIAR_MAC),
    ]
    out.append(Scenario("v6-ndp-lies", lies, arp=True))
    out.append(Scenario("v6-ndp-ask-gateway", [
        Ether(src=me, dst="33:33:ff:00:00:02") /
        IPv6(src=ME6, dst="ff02::1:ff00:2", hlim=255) / ICMPv6ND_NS(tgt=GW6) /
        ICMPv6NDOptSrcLLAddr(lladdr=me)], arp=True))
    return out


# ------------------------------------------------------------------------------------------------


def hello(client: str, target: str) -> dict[str, Any]:
    host, port = target.rsplit(":", 1)
    proc = subprocess.run([sys.executable, client, "hello", host.strip("[]"), port],
                          capture_output=True, text=True, timeout=60)
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        result = {"error": "no JSON", "stdout": proc.stdout[-500:]}
    result.update(status=proc.returncode, stderr=proc.stderr[-500:])
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hostile.py")
    p.add_argument("family", choices=["ipv4", "ipv6"])
    p.add_argument("--client", required=True)
    p.add_argument("--hello", required=True, help="HOST:PORT for client.py hello afterwards")
    p.add_argument("--exit", type=int, default=0)
    args = p.parse_args(argv)
    link = Link()
    ports = Ports(41000 if args.family == "ipv4" else 42000)
    scenarios = (ipv4_scenarios if args.family == "ipv4" else ipv6_scenarios)(link.mac, ports)
    link.drain()
    for sc in scenarios:
        start = time.monotonic()
        errors = []
        for frame in sc.frames:
            try:
                link.send(frame)
            except OSError as exc:  # reported: the test wants every frame sent
                errors.append(f"{exc.strerror} ({len(frame)} bytes)")
        replies = [d for f in link.collect(LISTEN) if (d := describe(f, sc)) is not None]
        awaited = AWAITED.get(sc.name)
        deadline = start + PATIENCE
        while awaited and not any(r.startswith(awaited) for r in replies) and \
                time.monotonic() < deadline:
            replies += [d for f in link.collect(0.05) if (d := describe(f, sc)) is not None]
        sc.result = {"name": sc.name, "start": start, "end": time.monotonic(),
                     "sport": sc.sport, "replies": replies, "send_errors": errors}
    out = {"family": args.family, "mac": link.mac,
           "scenarios": [sc.result for sc in scenarios],
           "hello": hello(args.client, args.hello)}
    print(json.dumps(out), flush=True)
    return args.exit


if __name__ == "__main__":
    sys.exit(main())
