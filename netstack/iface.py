"""The interface: one Ethernet link to the sandbox, as seen from the gateway's side.

How this works: `receive(frame, now)` takes one frame the sandbox wrote to its TAP device.
The frame is checked layer by layer (Ethernet, ARP or IPv4, then ICMP, UDP or TCP); anything
malformed, unexpected or not for us is dropped and counted in `drops` by reason, and nothing
raises out of `receive`. ARP requests for the gateway and DNS addresses and ICMP echo
requests to them are answered here. Everything else is a flow: UDP datagrams become
`UdpDatagram` events, a SYN for a new TCP flow becomes a `TcpConnectRequest` the caller
answers with `tcp_accept` / `tcp_reject`, and accepted connections run the RFC 9293 state
machine in `netstack.tcp`, with data moved by `tcp_send` / `tcp_recv`.

Output is pull-based: `take_frames()` returns the frames to write to the TAP device (ACKs
owed for a batch of received segments are coalesced into one and generated there),
`take_events()` what happened. No packet larger than the link takes is ever built: one that
would not fit the MTU (or the 16-bit IP length fields) is dropped and counted ("out-too-big"),
and `udp_payload_limit()` tells the caller how much one datagram may carry. Timers are data:
`poll_at()` is the next deadline, `poll(now)` runs what is due. The stack never reads a clock
and does no I/O.
"""

from __future__ import annotations

import hashlib
import heapq
import ipaddress
import itertools
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from netstack import events as ev
from netstack import seq
from netstack.tcp import (
    DEFAULT_MSS_IPV4,
    DEFAULT_MSS_IPV6,
    State,
    TcpConfig,
    TcpConnection,
)
from netstack.wire import arp, checksum, ethernet, icmp, icmpv6, ipv4, ipv6, tcp, udp, vnet
from netstack.wire.tcp import ACK, RST, SYN, TcpSegment

ETH_IP_HEADERS = ethernet.HEADER_LEN + ipv4.MIN_HEADER_LEN
ETH_IP6_HEADERS = ethernet.HEADER_LEN + ipv6.HEADER_LEN
NDP_HOP_LIMIT = 255  # RFC 4861 §7.1: ND messages are sent, and must arrive, with 255


@dataclass(frozen=True)
class InterfaceConfig:
    sandbox_ip: str = "10.0.2.100"
    gateway_ip: str = "10.0.2.2"
    dns_ip: str = "10.0.2.3"
    ipv6: bool = True
    sandbox_ip6: str = "fd00::100"
    gateway_ip6: str = "fd00::2"
    dns_ip6: str = "fd00::3"
    gateway_ll6: str = "fe80::2"  # the router's link-local address (RAs come from it)
    prefix6: str = "fd00::"
    prefix6_len: int = 64
    gateway_mac: bytes = bytes.fromhex("525500000202")
    mtu: int = 65520
    tcp: TcpConfig = field(default_factory=TcpConfig)
    max_connections: int = 4096
    max_pending: int = 1024  # SYNs waiting for the caller's decision
    isn_key: bytes = b""  # secret for RFC 6528 initial sequence numbers; pass random bytes
    # Frames in and out carry a virtio-net header (a TAP with IFF_VNET_HDR); with
    # checksum_offload, TCP checksums are left to the kernel (see netstack.wire.vnet).
    vnet_hdr: bool = False
    checksum_offload: bool = False


_Key = tuple[bytes, int, bytes, int]  # (sandbox ip, sandbox port, remote ip, remote port)


def _ip_bytes(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def _ip_text(raw: bytes) -> str:
    if len(raw) == 4:
        return f"{raw[0]}.{raw[1]}.{raw[2]}.{raw[3]}"
    return ipaddress.IPv6Address(raw).compressed


def _unroutable_ipv4(dst: bytes) -> bool:
    """Never a destination (RFC 1122 §3.2.1.3, RFC 5735): "this network" 0/8, loopback
    127/8, multicast and the reserved range above it, limited broadcast."""
    return dst[0] >= 224 or dst[0] in (0, 127)


def _flow(proto: str, src: bytes, sport: int, dst: bytes, dport: int) -> ev.Flow:
    """The flow as reported: an IPv4 address in an IPv6 form is given as IPv4, `via` the form."""
    embedded = ipv6.embedded_ipv4(dst) if len(dst) == 16 else None
    if embedded is None:
        return ev.Flow(proto, _ip_text(src), sport, _ip_text(dst), dport)
    return ev.Flow(proto, _ip_text(src), sport, _ip_text(embedded), dport, _ip_text(dst))


def _remote_bytes(flow: ev.Flow) -> bytes:
    """The address the sandbox sent `flow` to, as written: replies come from it."""
    return _ip_bytes(flow.via or flow.dst)


class Interface:
    def __init__(self, config: InterfaceConfig | None = None) -> None:
        self.config = cfg = config or InterfaceConfig()
        self.sandbox_ip = _ip_bytes(cfg.sandbox_ip)
        self.local_ips = {_ip_bytes(cfg.gateway_ip), _ip_bytes(cfg.dns_ip)}
        self.sandbox_ip6 = _ip_bytes(cfg.sandbox_ip6)
        self.gateway_ll6 = _ip_bytes(cfg.gateway_ll6)
        self.local_ips6 = {_ip_bytes(cfg.gateway_ip6), _ip_bytes(cfg.dns_ip6), self.gateway_ll6}
        self.sandbox_mac: bytes | None = None
        self.prefix = vnet.HEADER_LEN if cfg.vnet_hdr else 0
        self.offload = cfg.vnet_hdr and cfg.checksum_offload
        self.trusted = False  # this frame's TCP/UDP checksum was vouched for by the kernel
        self.mss_limit = min(cfg.mtu - ipv4.MIN_HEADER_LEN - tcp.MIN_HEADER_LEN, 0xFFFF)
        self.mss_limit6 = min(cfg.mtu - ipv6.HEADER_LEN - tcp.MIN_HEADER_LEN, 0xFFFF)
        # The largest packet we send: the MTU, and the 16-bit total length of IPv4
        # (RFC 791 §3.1) and payload length of IPv6 (RFC 8200 §3).
        self.packet_limit = min(cfg.mtu, 0xFFFF)
        self.packet_limit6 = min(cfg.mtu, ipv6.HEADER_LEN + 0xFFFF)
        self.drops: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self._frames: list[bytes | bytearray] = []
        self._events: list[ev.Event] = []
        self._ack_due: list[TcpConnection] = []
        self._pending: OrderedDict[_Key, tuple[TcpSegment, ev.Flow]] = OrderedDict()
        self._conns: dict[_Key, TcpConnection] = {}
        # Connections in TIME-WAIT, oldest first: the first to go when the table is full (the
        # state only guards against stray segments of our own sandbox; RFC 6191 reasoning).
        self._time_wait: OrderedDict[_Key, TcpConnection] = OrderedDict()
        self._by_flow: dict[ev.Flow, _Key] = {}
        self._timers: list[tuple[float, int, TcpConnection]] = []
        self._timer_seq = itertools.count()
        self._ident = 0
        self._eth_mac = b""  # the sandbox MAC _eth4/_eth6 were built for
        self._eth4 = self._eth6 = b""

    # ----- input ----------------------------------------------------------------------------

    def receive(self, frame: bytes | bytearray | memoryview, now: float) -> None:
        """Process one frame from the sandbox. Never raises: bad input is dropped and counted."""
        self.stats["frames-in"] += 1
        try:
            reason = self._receive(frame, now)
        except Exception as exc:  # a bug, not bad input: count it loudly rather than crash
            reason = f"internal-error-{type(exc).__name__}"
        if reason:
            self.drops[reason] += 1

    def _receive(self, frame: bytes | bytearray | memoryview, now: float) -> str | None:
        if self.prefix:
            header = vnet.parse(frame)
            if header is None:
                return "vnet-truncated"
            self.trusted, gso_type = header
            if gso_type != vnet.GSO_NONE:
                return "vnet-gso-unsupported"  # we never enable segmentation offload
            frame = memoryview(frame)[self.prefix:]
        eth = ethernet.parse(frame)
        if eth is None:
            return "eth-truncated"
        dst_mac, src_mac, ethertype = eth
        # Ours, or a group address (broadcast; 33:33:... for IPv6 multicast, RFC 2464 §7).
        if dst_mac != self.config.gateway_mac and not dst_mac[0] & 1:
            return "eth-not-for-us"
        body = memoryview(frame)[ethernet.HEADER_LEN:]
        if ethertype == ethernet.ETHERTYPE_IPV4:
            return self._ipv4(body, src_mac, now)
        if ethertype == ethernet.ETHERTYPE_ARP:
            return self._arp(body, src_mac)
        if ethertype == ethernet.ETHERTYPE_IPV6:
            return self._ipv6(body, src_mac, now) if self.config.ipv6 else "ipv6-disabled"
        return "eth-unknown-type"

    def _arp(self, body: memoryview, src_mac: bytes) -> str | None:
        """RFC 826: answer requests for the gateway and DNS addresses, from the sandbox only."""
        pkt = arp.parse(body)
        if pkt is None:
            return "arp-malformed"
        if pkt.op != arp.OP_REQUEST:
            return "arp-not-request"
        if pkt.sender_ip != self.sandbox_ip or pkt.sender_mac != src_mac:
            return "arp-foreign-sender"
        if pkt.target_ip not in self.local_ips:
            return "arp-not-ours"
        self.sandbox_mac = src_mac
        reply = arp.build(arp.OP_REPLY, self.config.gateway_mac, pkt.target_ip, src_mac,
                          pkt.sender_ip)
        self._frames.append(bytes(self.prefix) + ethernet.header(
            src_mac, self.config.gateway_mac, ethernet.ETHERTYPE_ARP) + reply)
        return None

    def _ipv4(self, pkt: memoryview, src_mac: bytes, now: float) -> str | None:
        hdr = ipv4.parse(pkt)
        if isinstance(hdr, str):
            return hdr
        if hdr.src != self.sandbox_ip:
            return "ipv4-foreign-source"
        if hdr.is_fragment:
            return "ipv4-fragment"
        if _unroutable_ipv4(hdr.dst):
            return "ipv4-bad-destination"
        self.sandbox_mac = src_mac
        if hdr.ttl <= 1 and hdr.dst not in self.local_ips:
            # We are the first router: the hop limit ends here (RFC 792 time exceeded), which
            # is what a traceroute from the sandbox expects to see.
            self._send_ip(_ip_bytes(self.config.gateway_ip), self.sandbox_ip, ipv4.PROTO_ICMP,
                          icmp.message(icmp.TYPE_TIME_EXCEEDED, 0, 0,
                                       bytes(pkt[:hdr.header_len + 8])))
            return "ttl-expired"
        body = pkt[hdr.header_len:hdr.total_len]
        if hdr.proto == ipv4.PROTO_TCP:
            return self._tcp(hdr.src, hdr.dst, body, now)
        if hdr.proto == ipv4.PROTO_UDP:
            return self._udp(hdr.src, hdr.dst, body, pkt[:hdr.header_len + udp.HEADER_LEN])
        if hdr.proto == ipv4.PROTO_ICMP:
            return self._icmp(hdr, body)
        return "ipv4-unknown-protocol"

    def _ipv6(self, pkt: memoryview, src_mac: bytes, now: float) -> str | None:
        hdr = ipv6.parse(pkt)
        if isinstance(hdr, str):
            return hdr
        embedded = ipv6.embedded_ipv4(hdr.dst)
        if embedded is not None and (_unroutable_ipv4(embedded) or embedded == self.sandbox_ip
                                     or embedded in self.local_ips):
            # An IPv4 address in an IPv6 form is judged as that address: what IPv4 refuses,
            # and our own addresses and the sandbox's, are not reached this way either.
            return "ipv6-bad-destination"
        body = pkt[hdr.upper_offset:ipv6.HEADER_LEN + hdr.payload_len]
        if hdr.proto == ipv6.PROTO_ICMPV6:
            return self._icmpv6(hdr, body, pkt, src_mac)
        if hdr.src != self.sandbox_ip6:
            return "ipv6-foreign-source"
        if hdr.hop_limit <= 1 and hdr.dst not in self.local_ips6:
            return self._hop_limit_exceeded(pkt)
        dst = hdr.dst
        if dst[0] == 0xFF or (dst[0] == 0xFE and dst[1] & 0xC0 == 0x80) or \
                dst == bytes(15) + b"\x01" or dst == bytes(16):
            return "ipv6-bad-destination"  # multicast, link-local, loopback, unspecified
        self.sandbox_mac = src_mac
        if hdr.proto == ipv6.PROTO_TCP:
            return self._tcp(hdr.src, dst, body, now)
        if hdr.proto == ipv6.PROTO_UDP:
            # RFC 4443 §2.4 (c): an error quotes as much as fits in the minimum MTU.
            limit = ipv6.MIN_MTU - ipv6.HEADER_LEN - 8
            return self._udp(hdr.src, dst, body, pkt[:limit])
        return "ipv6-unknown-protocol"

    def _icmpv6(self, hdr: ipv6.Ipv6Header, body: memoryview, pkt: memoryview,
                src_mac: bytes) -> str | None:
        """Neighbor and router discovery for the gateway addresses (RFC 4861), and echo."""
        pseudo = checksum.pseudo_header_sum(hdr.src, hdr.dst, ipv6.PROTO_ICMPV6, len(body))
        parsed = icmpv6.parse(body, pseudo)
        if parsed is None:
            return "icmpv6-malformed"
        icmp_type, _code = parsed
        from_sandbox = hdr.src == self.sandbox_ip6 or (hdr.src[0] == 0xFE and
                                                       hdr.src[1] & 0xC0 == 0x80)
        if not from_sandbox:
            return "icmpv6-foreign-source"  # includes DAD probes from the unspecified address
        if icmp_type == icmpv6.TYPE_NEIGHBOR_SOLICIT:
            target = icmpv6.solicited_target(body)
            if hdr.hop_limit != NDP_HOP_LIMIT or target is None:
                return "ndp-invalid"
            if target not in self.local_ips6:
                return "ndp-not-ours"
            self.sandbox_mac = src_mac
            reply = icmpv6.neighbor_advert_body(target, self.config.gateway_mac, router=True)
            self._send_icmpv6(target, hdr.src, icmpv6.TYPE_NEIGHBOR_ADVERT, reply, NDP_HOP_LIMIT)
            return None
        if icmp_type == icmpv6.TYPE_ROUTER_SOLICIT:
            if hdr.hop_limit != NDP_HOP_LIMIT:
                return "ndp-invalid"
            self.sandbox_mac = src_mac
            prefix = _ip_bytes(self.config.prefix6)
            advert = icmpv6.router_advert_body(self.config.gateway_mac, prefix,
                                               self.config.prefix6_len, self.config.mtu)
            self._send_icmpv6(self.gateway_ll6, hdr.src, icmpv6.TYPE_ROUTER_ADVERT, advert,
                              NDP_HOP_LIMIT)
            return None
        if icmp_type == icmpv6.TYPE_ECHO_REQUEST:
            if hdr.src != self.sandbox_ip6 and hdr.dst not in self.local_ips6:
                return "icmpv6-foreign-source"
            if hdr.dst not in self.local_ips6:
                if hdr.dst[0] == 0xFF or (hdr.dst[0] == 0xFE and hdr.dst[1] & 0xC0 == 0x80):
                    return "icmpv6-echo-not-routable"
                if hdr.hop_limit <= 1:
                    return self._hop_limit_exceeded(pkt)
                self._echo_event(hdr.src, hdr.dst, body)
                return None
            self._send_icmpv6(hdr.dst, hdr.src, icmpv6.TYPE_ECHO_REPLY,
                              icmpv6.echo_reply_body(body))
            return None
        return "icmpv6-ignored"  # MLD reports, advertisements, errors from the sandbox

    def _icmp(self, hdr: ipv4.Ipv4Header, body: memoryview) -> str | None:
        parsed = icmp.parse(body)
        if parsed is None:
            return "icmp-malformed"
        if parsed[0] != icmp.TYPE_ECHO_REQUEST:
            return "icmp-not-echo-request"
        if hdr.dst not in self.local_ips:
            self._echo_event(hdr.src, hdr.dst, body)
            return None
        self._send_ip(hdr.dst, self.sandbox_ip, ipv4.PROTO_ICMP, icmp.echo_reply(body))
        return None

    def _echo_event(self, src: bytes, dst: bytes, body: memoryview) -> None:
        ident, seqno = int.from_bytes(body[4:6], "big"), int.from_bytes(body[6:8], "big")
        flow = _flow("icmp", src, ident, dst, 0)
        self._events.append(ev.IcmpEchoRequest(flow, ident, seqno, bytes(body[8:])))

    def _hop_limit_exceeded(self, pkt: memoryview) -> str:
        """RFC 4443 §3.3: hop limit exceeded in transit, from the gateway."""
        limit = ipv6.MIN_MTU - ipv6.HEADER_LEN - 8
        self._send_icmpv6(_ip_bytes(self.config.gateway_ip6), self.sandbox_ip6,
                          icmpv6.TYPE_TIME_EXCEEDED, icmpv6.error_body(pkt, limit))
        return "hop-limit-expired"

    def _udp(self, src: bytes, dst: bytes, body: memoryview, quote: memoryview) -> str | None:
        parsed = udp.parse(body, checksum.pseudo_header_sum(src, dst, ipv4.PROTO_UDP, len(body)),
                           zero_checksum_ok=len(src) == 4, verify=not self.trusted)
        if isinstance(parsed, str):
            return parsed
        sport, dport, payload = parsed
        if sport == 0 or dport == 0:
            return "udp-port-zero"
        flow = _flow("udp", src, sport, dst, dport)
        self._events.append(ev.UdpDatagram(flow, bytes(payload), bytes(quote)))
        return None

    def _tcp(self, src: bytes, dst: bytes, body: memoryview, now: float) -> str | None:
        trusted = self.trusted
        seg = tcp.parse(body, 0 if trusted else
                        checksum.pseudo_header_sum(src, dst, ipv4.PROTO_TCP, len(body)),
                        verify=not trusted)
        if isinstance(seg, str):
            return seg
        if seg.sport == 0 or seg.dport == 0:
            return "tcp-port-zero"
        key = (src, seg.sport, dst, seg.dport)
        conn = self._conns.get(key)
        flags = seg.flags
        is_syn = flags & (SYN | ACK | RST) == SYN
        if conn is not None:
            if is_syn and conn.state == State.TIME_WAIT and seq.lt(conn.rcv_nxt, seg.seq):
                # A new incarnation of the flow reusing the port (RFC 9293 §3.10.7.4 note,
                # RFC 6191): forget the old connection and treat the SYN as new.
                self._forget(key, conn)
            else:
                conn.on_segment(seg, now)
                if conn.state == State.CLOSED:
                    self._forget(key, conn)
                return None
        if is_syn:
            return self._new_syn(key, seg)
        if key in self._pending:
            if flags & RST:  # the sandbox gave up on its SYN before we answered it
                _, flow = self._pending.pop(key)
                self._by_flow.pop(flow, None)
                self._events.append(ev.TcpClosed(flow, True, "reset by sandbox"))
                return None
            return "tcp-before-accept"
        if flags & RST:
            return "tcp-rst-no-connection"
        # RFC 9293 §3.10.7.1: a segment for no connection draws a reset.
        if flags & ACK:
            self._emit_tcp(key, RST, seg.ack, 0, 0)
        else:
            self._emit_tcp(key, RST | ACK, 0, (seg.seq + seg.seg_len) & 0xFFFFFFFF, 0)
        return "tcp-no-connection"

    def _new_syn(self, key: _Key, seg: TcpSegment) -> str | None:
        if key in self._pending:
            return "tcp-syn-duplicate"
        if len(self._conns) >= self.config.max_connections and self._time_wait:
            old_key, old = self._time_wait.popitem(last=False)
            self._forget(old_key, old)
            self.drops["tcp-time-wait-evicted"] += 1
        if len(self._conns) >= self.config.max_connections:
            self._emit_tcp(key, RST | ACK, 0, (seg.seq + 1) & 0xFFFFFFFF, 0)
            return "tcp-too-many-connections"
        if len(self._pending) >= self.config.max_pending:
            old_key, (old_seg, old_flow) = self._pending.popitem(last=False)
            self._by_flow.pop(old_flow, None)
            self._emit_tcp(old_key, RST | ACK, 0, (old_seg.seq + 1) & 0xFFFFFFFF, 0)
            self._events.append(ev.TcpClosed(old_flow, True, "evicted: too many pending SYNs"))
            self.drops["tcp-syn-evicted"] += 1
        # Data on a SYN is not kept: our SYN-ACK acknowledges only the SYN, so the sender
        # sends it again once the connection is open (RFC 9293 §3.10.7.2 allows either).
        seg.payload = memoryview(b"")
        flow = _flow("tcp", key[0], seg.sport, key[2], seg.dport)
        self._pending[key] = (seg, flow)
        self._by_flow[flow] = key
        self._events.append(ev.TcpConnectRequest(flow))
        return None

    # ----- caller decisions and data ---------------------------------------------------------

    def tcp_accept(self, flow: ev.Flow, now: float) -> bool:
        """Complete the handshake for a pending SYN. False if it is no longer pending."""
        key = self._by_flow.get(flow)
        if key is None or key not in self._pending:
            return False
        seg, _ = self._pending.pop(key)
        iss = self._isn(key, now)
        v6 = len(key[0]) == 16
        conn = TcpConnection(seg, iss, now, self.mss_limit6 if v6 else self.mss_limit,
                             self.config.tcp, self, flow, key,
                             default_mss=DEFAULT_MSS_IPV6 if v6 else DEFAULT_MSS_IPV4)
        self._conns[key] = conn
        return True

    def tcp_reject(self, flow: ev.Flow) -> bool:
        """Refuse a pending SYN with a reset (the sandbox sees "connection refused")."""
        key = self._by_flow.get(flow)
        if key is None or key not in self._pending:
            return False
        seg, _ = self._pending.pop(key)
        del self._by_flow[flow]
        self._emit_tcp(key, RST | ACK, 0, (seg.seq + 1) & 0xFFFFFFFF, 0)
        return True

    def connection(self, flow: ev.Flow) -> TcpConnection | None:
        key = self._by_flow.get(flow)
        return self._conns.get(key) if key is not None else None

    def tcp_send(self, flow: ev.Flow, data: bytes | bytearray | memoryview, now: float,
                 close: bool = False) -> int:
        """Queue data for the sandbox; returns how much was taken (0 when full or closed).
        `close`: no more data follows, the FIN goes with this (if all of it was taken)."""
        conn = self.connection(flow)
        return conn.send(data, now, close) if conn is not None else 0

    def tcp_recv(self, flow: ev.Flow, max_bytes: int) -> bytes | bytearray:
        """Take in-order data the sandbox sent (b"" when none is waiting)."""
        conn = self.connection(flow)
        return conn.recv(max_bytes) if conn is not None else b""

    def tcp_send_space(self, flow: ev.Flow) -> int:
        conn = self.connection(flow)
        return conn.send_space if conn is not None else 0

    def tcp_at_eof(self, flow: ev.Flow) -> bool:
        """True once the sandbox closed its sending side and all its data was taken."""
        conn = self.connection(flow)
        return conn is None or conn.at_eof

    def tcp_close(self, flow: ev.Flow, now: float) -> None:
        """No more data for the sandbox: FIN after what is queued."""
        conn = self.connection(flow)
        if conn is not None:
            conn.close(now)

    def tcp_abort(self, flow: ev.Flow, reason: str = "aborted") -> None:
        """Reset the connection towards the sandbox."""
        key = self._by_flow.get(flow)
        if key is None:
            return
        conn = self._conns.get(key)
        if conn is not None:
            conn.abort(reason)
            self._forget(key, conn)

    def udp_payload_limit(self, flow: ev.Flow) -> int:
        """The most payload one datagram to the sandbox's end of `flow` can carry."""
        if ":" in flow.src:
            return self.packet_limit6 - ipv6.HEADER_LEN - udp.HEADER_LEN
        return self.packet_limit - ipv4.MIN_HEADER_LEN - udp.HEADER_LEN

    def udp_send(self, flow: ev.Flow, payload: bytes | bytearray | memoryview) -> bool:
        """A datagram to the sandbox's end of `flow`, from the destination it talked to.

        False (and counted as dropped) if it is larger than `udp_payload_limit(flow)`."""
        if len(payload) > self.udp_payload_limit(flow):
            self.drops["out-too-big"] += 1
            return False
        sandbox, remote = _ip_bytes(flow.src), _remote_bytes(flow)
        pseudo = checksum.pseudo_header_sum(remote, sandbox, ipv4.PROTO_UDP,
                                            udp.HEADER_LEN + len(payload))
        return self._send_ip(remote, sandbox, ipv4.PROTO_UDP,
                             udp.datagram(flow.dport, flow.sport, payload, pseudo))

    def udp_unreachable(self, datagram: ev.UdpDatagram) -> None:
        """Port unreachable for a datagram (RFC 792 / RFC 4443 §3.1), from its destination."""
        src, dst = _remote_bytes(datagram.flow), _ip_bytes(datagram.flow.src)
        if len(src) == 4:
            self._send_ip(src, dst, ipv4.PROTO_ICMP,
                          icmp.unreachable(icmp.CODE_PORT_UNREACHABLE, datagram.quote))
        else:
            self._send_icmpv6(src, dst, icmpv6.TYPE_DEST_UNREACHABLE,
                              icmpv6.error_body(datagram.quote, len(datagram.quote)),
                              code=icmpv6.CODE_PORT_UNREACHABLE)

    def icmp_echo_reply(self, request: ev.IcmpEchoRequest, payload: bytes | memoryview) -> None:
        """Answer a ping from the sandbox, from the address it pinged."""
        src, dst = _remote_bytes(request.flow), _ip_bytes(request.flow.src)
        if len(src) == 4:
            self._send_ip(src, dst, ipv4.PROTO_ICMP,
                          icmp.echo(icmp.TYPE_ECHO_REPLY, request.ident, request.seq, payload))
        else:
            body = request.ident.to_bytes(2, "big") + request.seq.to_bytes(2, "big") + \
                bytes(payload)
            self._send_icmpv6(src, dst, icmpv6.TYPE_ECHO_REPLY, body)

    def icmp_unreachable(self, request: ev.IcmpEchoRequest) -> None:
        """Tell the sandbox its ping is not allowed: administratively prohibited, from the
        gateway (RFC 1812 §5.2.7.1, RFC 4443 §3.1 code 1)."""
        flow = request.flow
        if ":" not in flow.src:
            original = self._echo_packet(flow, request, 4)
            self._send_ip(_ip_bytes(self.config.gateway_ip), self.sandbox_ip, ipv4.PROTO_ICMP,
                          icmp.unreachable(icmp.CODE_ADMIN_PROHIBITED, original))
        else:
            original = self._echo_packet(flow, request, 16)
            self._send_icmpv6(_ip_bytes(self.config.gateway_ip6), self.sandbox_ip6,
                              icmpv6.TYPE_DEST_UNREACHABLE, icmpv6.error_body(original, 1232),
                              code=icmpv6.CODE_ADMIN_PROHIBITED)

    def _echo_packet(self, flow: ev.Flow, request: ev.IcmpEchoRequest, size: int) -> bytes:
        """The start of the sandbox's echo request, rebuilt for quoting in an error."""
        src, dst = _ip_bytes(flow.src), _remote_bytes(flow)
        head = request.ident.to_bytes(2, "big") + request.seq.to_bytes(2, "big")
        if size == 4:
            body = icmp.echo(icmp.TYPE_ECHO_REQUEST, request.ident, request.seq, request.payload)
            return ipv4.header(src, dst, ipv4.PROTO_ICMP, len(body), 0)[:20] + body[:8]
        pseudo = checksum.pseudo_header_sum(src, dst, ipv6.PROTO_ICMPV6, 8 + len(request.payload))
        body = icmpv6.message(icmpv6.TYPE_ECHO_REQUEST, 0, head + request.payload, pseudo)
        return ipv6.header(src, dst, ipv6.PROTO_ICMPV6, len(body)) + body

    # ----- output and timers -----------------------------------------------------------------

    def take_frames(self) -> list[bytes | bytearray]:
        """Frames for the sandbox, oldest first (coalesced ACKs are generated here)."""
        if self._ack_due:
            due, self._ack_due = self._ack_due, []
            for conn in due:
                if conn.ack_pending:
                    conn.send_ack()
        frames, self._frames = self._frames, []
        return frames

    def take_events(self) -> list[ev.Event]:
        events, self._events = self._events, []
        return events

    def poll_at(self) -> float | None:
        """When `poll` should run next (it may be early; never late)."""
        return self._timers[0][0] if self._timers else None

    def poll(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, _, conn = heapq.heappop(timers)
            if conn.heap_at != when:
                continue
            conn.heap_at = None
            key = conn.key
            if self._conns.get(key) is not conn:
                continue
            try:
                conn.on_timer(now)
            except Exception as exc:  # a bug, not input: that connection ends, not the stack
                self.drops[f"internal-error-{type(exc).__name__}"] += 1
                conn.abort("internal error")
            if conn.state == State.CLOSED:
                self._forget(key, conn)
            else:
                self.tcp_timer_changed(conn)

    @property
    def connection_count(self) -> int:
        return len(self._conns)

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    # ----- TcpOutput (called by connections) -------------------------------------------------

    def tcp_emit(self, conn: TcpConnection, flags: int, seqno: int, ackno: int, window: int,
                 payload: bytes | bytearray | memoryview = b"", options: bytes = b"") -> None:
        self._emit_tcp(conn.key, flags, seqno, ackno, window, payload, options)

    def tcp_readable(self, conn: TcpConnection) -> None:
        self._events.append(ev.TcpReadable(conn.flow))

    def tcp_writable(self, conn: TcpConnection) -> None:
        self._events.append(ev.TcpWritable(conn.flow))

    def tcp_closed(self, conn: TcpConnection, reset: bool, reason: str) -> None:
        if conn.state == State.TIME_WAIT:
            self._time_wait[conn.key] = conn
        self._events.append(ev.TcpClosed(conn.flow, reset, reason))

    def tcp_ack_due(self, conn: TcpConnection) -> None:
        self._ack_due.append(conn)

    def tcp_dropped(self, conn: TcpConnection, reason: str) -> None:
        self.drops[reason] += 1

    def tcp_timer_changed(self, conn: TcpConnection) -> None:
        # One heap entry per connection at a time, at its earliest deadline; a later deadline
        # waits for that entry to fire and re-arm (timers are checked, so early is harmless).
        when = conn.deadline
        if when is None:
            return
        if conn.heap_at is not None and conn.heap_at <= when:
            return
        conn.heap_at = when
        heapq.heappush(self._timers, (when, next(self._timer_seq), conn))

    # ----- framing ---------------------------------------------------------------------------

    def _forget(self, key: _Key, conn: TcpConnection) -> None:
        if self._time_wait.get(key) is conn:
            del self._time_wait[key]
        if self._conns.get(key) is conn:
            del self._conns[key]
            self._by_flow.pop(conn.flow, None)

    def _isn(self, key: _Key, now: float) -> int:
        """RFC 6528: a 4 us clock plus a keyed hash of the connection's addresses."""
        digest = hashlib.blake2s(b"".join([key[0], key[1].to_bytes(2, "big"), key[2],
                                           key[3].to_bytes(2, "big")]),
                                 key=self.config.isn_key[:32], digest_size=4).digest()
        return (int(now * 250_000) + int.from_bytes(digest, "big")) & 0xFFFFFFFF

    def _emit_tcp(self, key: _Key, flags: int, seqno: int, ackno: int, window: int,
                  payload: bytes | bytearray | memoryview = b"", options: bytes = b"") -> None:
        sandbox_ip, sandbox_port, remote_ip, remote_port = key
        seg_len = tcp.MIN_HEADER_LEN + len(options) + len(payload)
        if not self._fits(remote_ip, seg_len):
            return
        start = self.prefix + (ETH_IP_HEADERS if len(remote_ip) == 4 else ETH_IP6_HEADERS)
        frame = bytearray(start + seg_len)
        self._write_headers(frame, remote_ip, sandbox_ip, ipv4.PROTO_TCP, seg_len)
        frame[start + tcp.MIN_HEADER_LEN + len(options):] = payload
        pseudo = checksum.pseudo_header_sum(remote_ip, sandbox_ip, ipv4.PROTO_TCP, seg_len)
        tcp.segment_into(frame, start, remote_port, sandbox_port, seqno, ackno, flags,
                         window, options, len(payload), pseudo, partial=self.offload)
        if self.offload:
            vnet.write_partial(frame, start - self.prefix, tcp.CHECKSUM_OFFSET)
        self._frames.append(frame)

    def _fits(self, src: bytes, payload_len: int) -> bool:
        """Whether an IP packet from `src` carrying `payload_len` bytes fits the link; if not,
        the drop is counted."""
        if len(src) == 4:
            fits = ipv4.MIN_HEADER_LEN + payload_len <= self.packet_limit
        else:
            fits = ipv6.HEADER_LEN + payload_len <= self.packet_limit6
        if not fits:
            self.drops["out-too-big"] += 1
        return fits

    def _send_ip(self, src: bytes, dst: bytes, proto: int, body: bytes,
                 hop_limit: int = ipv6.DEFAULT_HOP_LIMIT) -> bool:
        if not self._fits(src, len(body)):
            return False
        start = self.prefix + (ETH_IP_HEADERS if len(src) == 4 else ETH_IP6_HEADERS)
        frame = bytearray(start + len(body))
        self._write_headers(frame, src, dst, proto, len(body), hop_limit)
        frame[start:] = body
        self._frames.append(frame)
        return True

    def _send_icmpv6(self, src: bytes, dst: bytes, icmp_type: int, body: bytes,
                     hop_limit: int = ipv6.DEFAULT_HOP_LIMIT, code: int = 0) -> None:
        pseudo = checksum.pseudo_header_sum(src, dst, ipv6.PROTO_ICMPV6, 4 + len(body))
        self._send_ip(src, dst, ipv6.PROTO_ICMPV6, icmpv6.message(icmp_type, code, body, pseudo),
                      hop_limit)

    def _write_headers(self, frame: bytearray, src: bytes, dst: bytes, proto: int,
                       payload_len: int, hop_limit: int = ipv6.DEFAULT_HOP_LIMIT) -> None:
        """Ethernet and IP headers after the (zeroed: no offload) virtio-net header, if any."""
        mac = self.sandbox_mac or ethernet.BROADCAST
        if mac != self._eth_mac:  # the Ethernet headers change only with the sandbox's MAC
            self._eth_mac = mac
            self._eth4 = ethernet.header(mac, self.config.gateway_mac, ethernet.ETHERTYPE_IPV4)
            self._eth6 = ethernet.header(mac, self.config.gateway_mac, ethernet.ETHERTYPE_IPV6)
        eth, ip_start = self.prefix, self.prefix + ethernet.HEADER_LEN
        if len(src) == 4:
            frame[eth:ip_start] = self._eth4
            self._ident = ident = (self._ident + 1) & 0xFFFF
            ipv4.header_into(frame, ip_start, src, dst, proto, payload_len, ident)
        else:
            frame[eth:ip_start] = self._eth6
            frame[ip_start:ip_start + ipv6.HEADER_LEN] = ipv6.header(src, dst, proto,
                                                                     payload_len, hop_limit)
