"""A scapy peer for netstack tests: it plays the sandbox's kernel against one `Interface`.

Theory of operation: the netstack `Interface` stands where the gateway is, so the "peer" of every
test is the sandbox. `Peer` builds the sandbox's frames with scapy (Ether from 02:00:00:00:00:01,
IP from 10.0.2.100, to the gateway MAC), feeds them to the interface with an explicit `now`, and
parses every frame the interface emits with scapy. Each emitted frame is checked on the way out:
scapy must parse it, and rebuilding the IPv4 packet with its IP and TCP/UDP/ICMP checksum fields
deleted (so scapy recomputes them) must give back exactly the bytes netstack wrote. Scapy is the
independent oracle; nothing here reuses netstack code to judge netstack's output.

`Peer` tracks its own sequence space like a minimal TCP sender (`seq` = its SND.NXT, `rcv_nxt` =
what it acknowledges) so tests read like smoltcp's: `peer.handshake()`, `peer.send(b"x")`,
`peer.expect(flags="A", ack=peer.seq)`. Time only moves when a test says so (`peer.advance`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from scapy.compat import raw
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet

from netstack import events as ev
from netstack.iface import Interface, InterfaceConfig
from netstack.tcp import TcpConfig

SANDBOX_MAC = "02:00:00:00:00:01"
SANDBOX_IP = "10.0.2.100"
GATEWAY_IP = "10.0.2.2"
DNS_IP = "10.0.2.3"
GATEWAY_MAC = ":".join(f"{b:02x}" for b in InterfaceConfig().gateway_mac)
REMOTE_IP = "192.0.2.10"  # TEST-NET-1
REMOTE_IP_2 = "198.51.100.7"  # TEST-NET-2
REMOTE_IP_3 = "203.0.113.5"  # TEST-NET-3
ISN_KEY = bytes(range(32))
MOD = 1 << 32


def make_iface(tcp: TcpConfig | None = None, **kwargs: Any) -> Interface:
    """An interface with a fixed ISN key (so runs are reproducible) and optional overrides."""
    cfg = InterfaceConfig(isn_key=ISN_KEY, tcp=tcp or TcpConfig(), **kwargs)
    return Interface(cfg)


def flags_value(flags: str | int) -> int:
    """scapy's spelling of TCP flags ("SA", "PA", "R"...) as the header's bit field."""
    return int(TCP(flags=flags).flags)


def ether(payload: Packet, dst: str = GATEWAY_MAC, src: str = SANDBOX_MAC) -> Ether:
    return Ether(dst=dst, src=src) / payload


def ip_frame(l4: Packet, dst: str = REMOTE_IP, src: str = SANDBOX_IP, **ip_fields: Any) -> bytes:
    """Raw bytes of Ether/IP/`l4` from the sandbox (scapy fills in lengths and checksums)."""
    return raw(ether(IP(src=src, dst=dst, **ip_fields) / l4))


def check_frame(frame: bytes | bytearray) -> Ether:
    """Parse one frame the stack emitted; assert scapy agrees with every checksum and length."""
    data = bytes(frame)
    pkt = Ether(data)
    assert pkt.src == GATEWAY_MAC, f"frame not from the gateway MAC: {pkt.src}"
    if pkt.type == 0x0806:
        assert ARP in pkt, "ARP frame scapy cannot parse"
        assert len(data) == 14 + 28
        return pkt
    if pkt.type == 0x86DD:
        return _check_ipv6(pkt, data[14:])
    assert pkt.type == 0x0800, f"unexpected ethertype {pkt.type:#x}"
    assert IP in pkt
    ip_bytes = data[14:]
    ip = pkt[IP]
    assert ip.version == 4 and ip.ihl == 5, "netstack emits plain 20-byte IPv4 headers"
    assert ip.len == len(ip_bytes), "IP total length must match the frame (no padding)"
    assert ip.frag == 0 and ip.ttl > 0
    rebuilt = IP(ip_bytes)
    del rebuilt.chksum
    l4 = rebuilt.payload
    if isinstance(l4, (TCP, UDP, ICMP)):
        del l4.chksum
    again = raw(rebuilt)
    if again != ip_bytes:
        got, want = IP(ip_bytes), IP(again)
        detail = f"IP chksum {got.chksum:#06x} (scapy {want.chksum:#06x})"
        if isinstance(got.payload, (TCP, UDP, ICMP)):
            detail += (f", {got.payload.name} chksum {got.payload.chksum:#06x}"
                       f" (scapy {want.payload.chksum:#06x})")
        raise AssertionError(f"scapy recomputes different bytes: {detail}")
    return pkt


def _check_ipv6(pkt: Ether, ip_bytes: bytes) -> Ether:
    """IPv6 has no header checksum: recompute the upper layer's (TCP, UDP, ICMPv6) only."""
    ip = pkt[IPv6]
    assert ip.version == 6 and ip.plen == len(ip_bytes) - 40
    rebuilt = IPv6(ip_bytes)
    upper = rebuilt.payload
    for name in ("chksum", "cksum"):
        if upper.fields_desc and any(f.name == name for f in upper.fields_desc):
            delattr(upper, name)
    assert raw(rebuilt) == ip_bytes, "scapy recomputes a different upper-layer checksum"
    return pkt


def take(iface: Interface) -> list[Ether]:
    """Every frame the interface has for the sandbox, each checked by `check_frame`."""
    return [check_frame(f) for f in iface.take_frames()]


class Peer:
    """The sandbox's TCP for one flow, driven by hand.

    `seq` is the peer's next sequence number, `rcv_nxt` the next byte it expects from the stack
    (set from the SYN-ACK); `now` is the clock passed to every call into the interface.
    """

    def __init__(self, iface: Interface | None = None, *, sport: int = 40000,
                 dst: str = REMOTE_IP, dport: int = 443, isn: int = 1_000_000,
                 now: float = 100.0) -> None:
        self.iface = iface if iface is not None else make_iface()
        self.sport, self.dst, self.dport = sport, dst, dport
        self.isn = isn
        self.seq = isn
        self.rcv_nxt = 0
        self.irs = 0  # the stack's ISN, from its SYN-ACK
        self.now = now
        self.window = 65535
        self.flow = ev.Flow("tcp", SANDBOX_IP, sport, dst, dport)
        self.backlog: list[Ether] = []
        self.events: list[ev.Event] = []

    # ----- input to the stack ---------------------------------------------------------------

    def feed(self, frame: bytes) -> None:
        self.iface.receive(frame, self.now)

    def segment(self, flags: str | int = "A", *, seq: int | None = None, ack: int | None = None,
                payload: bytes = b"", window: int | None = None,
                options: Sequence[tuple[str, Any]] = (), chksum: int | None = None,
                sport: int | None = None) -> bytes:
        """Build the raw frame of one segment of this flow (not sent)."""
        f = flags_value(flags)
        if ack is None:
            ack = self.rcv_nxt if f & 0x10 else 0
        layer = TCP(sport=self.sport if sport is None else sport, dport=self.dport,
                    seq=(self.seq if seq is None else seq) % MOD, ack=ack % MOD, flags=f,
                    window=self.window if window is None else window, options=list(options))
        if chksum is not None:
            layer.chksum = chksum
        return ip_frame(layer / payload if payload else layer, dst=self.dst)

    def tcp(self, flags: str | int = "A", **kwargs: Any) -> None:
        """Send one segment to the stack (sequence state is the caller's business)."""
        self.feed(self.segment(flags, **kwargs))

    def syn(self, *, mss: int | None = 1460, wscale: int | None = None, window: int = 65535,
            payload: bytes = b"", seq: int | None = None) -> None:
        opts: list[tuple[str, Any]] = []
        if mss is not None:
            opts.append(("MSS", mss))
        if wscale is not None:
            opts += [("NOP", None), ("WScale", wscale)]
        self.tcp("S", seq=self.isn if seq is None else seq, ack=0, window=window,
                 options=opts, payload=payload)
        self.seq = (self.isn + 1) % MOD

    def send(self, data: bytes, flags: str = "PA", **kwargs: Any) -> None:
        """Data at the peer's SND.NXT; advances it."""
        self.tcp(flags, seq=self.seq, payload=data, **kwargs)
        self.seq = (self.seq + len(data) + (1 if "F" in flags else 0)) % MOD

    def ack(self, ack: int | None = None, **kwargs: Any) -> None:
        self.tcp("A", seq=self.seq, ack=self.rcv_nxt if ack is None else ack, **kwargs)

    def fin(self, data: bytes = b"") -> None:
        self.send(data, flags="FA" if not data else "FPA")

    def handshake(self, *, mss: int | None = 1460, wscale: int | None = None,
                  window: int = 65535, accept: bool = True) -> TCP:
        """SYN -> TcpConnectRequest -> tcp_accept -> SYN-ACK -> ACK; returns the SYN-ACK."""
        self.syn(mss=mss, wscale=wscale, window=window)
        events = self.iface.take_events()
        assert events == [ev.TcpConnectRequest(self.flow)], events
        assert self.iface.tcp_accept(self.flow, self.now)
        synack = self.expect(flags="SA", ack=self.seq)
        self.irs = synack.seq
        self.rcv_nxt = (synack.seq + 1) % MOD
        if accept:
            self.ack()
            assert self.take_frames() == []
            assert self.state() == "ESTABLISHED"
            self.events += self.iface.take_events()
        return synack

    # ----- output of the stack --------------------------------------------------------------

    def take_frames(self) -> list[Ether]:
        """Checked frames not yet consumed by `expect`, then everything new."""
        frames = self.backlog + take(self.iface)
        self.backlog = []
        return frames

    def take_events(self) -> list[ev.Event]:
        events = self.events + self.iface.take_events()
        self.events = []
        return events

    def segments(self) -> list[TCP]:
        """All TCP segments the stack has for this peer, in order; fails on anything else."""
        out = []
        for pkt in self.take_frames():
            assert TCP in pkt, pkt.summary()
            ip = pkt[IP]
            assert (ip.src, ip.dst) == (self.dst, SANDBOX_IP), pkt.summary()
            seg = pkt[TCP]
            assert (seg.sport, seg.dport) == (self.dport, self.sport), pkt.summary()
            assert pkt.dst in (SANDBOX_MAC, "ff:ff:ff:ff:ff:ff")
            out.append(seg)
        return out

    def expect(self, *, flags: str | int | None = None, seq: int | None = None,
               ack: int | None = None, payload: bytes | None = None,
               window: int | None = None) -> TCP:
        """Exactly one segment is waiting and it matches every field given."""
        segs = self.segments()
        assert len(segs) == 1, f"expected one segment, got {[s.summary() for s in segs]}"
        return self.match(segs[0], flags=flags, seq=seq, ack=ack, payload=payload, window=window)

    @staticmethod
    def match(seg: TCP, *, flags: str | int | None = None, seq: int | None = None,
              ack: int | None = None, payload: bytes | None = None,
              window: int | None = None) -> TCP:
        if flags is not None:
            assert int(seg.flags) == flags_value(flags), f"flags {seg.flags} != {flags}"
        if seq is not None:
            assert seg.seq == seq % MOD, f"seq {seg.seq} != {seq % MOD}"
        if ack is not None:
            assert seg.ack == ack % MOD, f"ack {seg.ack} != {ack % MOD}"
        if payload is not None:
            assert bytes(seg.payload) == payload, f"payload {bytes(seg.payload)!r} != {payload!r}"
        if window is not None:
            assert seg.window == window, f"window {seg.window} != {window}"
        return seg

    def expect_none(self) -> None:
        frames = self.take_frames()
        assert frames == [], [f.summary() for f in frames]

    # ----- time and state -------------------------------------------------------------------

    def advance(self, dt: float) -> None:
        """Move the clock forward and run the interface's due timers."""
        self.now += dt
        self.iface.poll(self.now)

    def poll_until(self, when: float) -> None:
        self.now = when
        self.iface.poll(when)

    def state(self) -> str | None:
        conn = self.iface.connection(self.flow)
        return conn.state.value if conn is not None else None

    def recv_all(self) -> bytes:
        return self.iface.tcp_recv(self.flow, 1 << 30)


def payload_of(seg: TCP) -> bytes:
    return bytes(seg.payload)


def rel(value: int, base: int) -> int:
    """`value - base` modulo 2**32, for reading the stack's sequence numbers relatively."""
    return (value - base) % MOD
