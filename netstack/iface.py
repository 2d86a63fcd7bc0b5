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
`take_events()` what happened. Timers are data: `poll_at()` is the next deadline, `poll(now)`
runs what is due. The stack never reads a clock and does no I/O.
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
from netstack.tcp import State, TcpConfig, TcpConnection
from netstack.wire import arp, checksum, ethernet, icmp, ipv4, tcp, udp
from netstack.wire.tcp import ACK, RST, SYN, TcpSegment

ETH_IP_HEADERS = ethernet.HEADER_LEN + ipv4.MIN_HEADER_LEN


class LocalProtocolError(Exception):
    """The caller used the API wrongly (never raised for anything the sandbox sends)."""


@dataclass(frozen=True)
class InterfaceConfig:
    sandbox_ip: str = "10.0.2.100"
    gateway_ip: str = "10.0.2.2"
    dns_ip: str = "10.0.2.3"
    gateway_mac: bytes = bytes.fromhex("525500000202")
    mtu: int = 65520
    tcp: TcpConfig = field(default_factory=TcpConfig)
    max_connections: int = 4096
    max_pending: int = 1024  # SYNs waiting for the caller's decision
    isn_key: bytes = b""  # secret for RFC 6528 initial sequence numbers; pass random bytes


_Key = tuple[bytes, int, bytes, int]  # (sandbox ip, sandbox port, remote ip, remote port)


def _ip_bytes(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


def _ip_text(raw: bytes) -> str:
    return f"{raw[0]}.{raw[1]}.{raw[2]}.{raw[3]}"


class Interface:
    def __init__(self, config: InterfaceConfig | None = None) -> None:
        self.config = cfg = config or InterfaceConfig()
        self.sandbox_ip = _ip_bytes(cfg.sandbox_ip)
        self.local_ips = {_ip_bytes(cfg.gateway_ip), _ip_bytes(cfg.dns_ip)}
        self.sandbox_mac: bytes | None = None
        self.mss_limit = min(cfg.mtu - ipv4.MIN_HEADER_LEN - tcp.MIN_HEADER_LEN, 0xFFFF)
        self.drops: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self._frames: list[bytes | bytearray] = []
        self._events: list[ev.Event] = []
        self._ack_due: list[TcpConnection] = []
        self._pending: OrderedDict[_Key, tuple[TcpSegment, ev.Flow]] = OrderedDict()
        self._conns: dict[_Key, TcpConnection] = {}
        self._by_flow: dict[ev.Flow, _Key] = {}
        self._timers: list[tuple[float, int, TcpConnection]] = []
        self._timer_seq = itertools.count()
        self._ident = 0

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
        eth = ethernet.parse(frame)
        if eth is None:
            return "eth-truncated"
        dst_mac, src_mac, ethertype = eth
        if dst_mac != self.config.gateway_mac and dst_mac != ethernet.BROADCAST:
            return "eth-not-for-us"
        body = memoryview(frame)[ethernet.HEADER_LEN:]
        if ethertype == ethernet.ETHERTYPE_IPV4:
            return self._ipv4(body, src_mac, now)
        if ethertype == ethernet.ETHERTYPE_ARP:
            return self._arp(body, src_mac)
        if ethertype == ethernet.ETHERTYPE_IPV6:
            return "ipv6-unsupported"
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
        self._frames.append(ethernet.header(src_mac, self.config.gateway_mac,
                                            ethernet.ETHERTYPE_ARP) + reply)
        return None

    def _ipv4(self, pkt: memoryview, src_mac: bytes, now: float) -> str | None:
        hdr = ipv4.parse(pkt)
        if isinstance(hdr, str):
            return hdr
        if hdr.src != self.sandbox_ip:
            return "ipv4-foreign-source"
        if hdr.is_fragment:
            return "ipv4-fragment"
        if hdr.dst[0] >= 224 or hdr.dst == b"\xff\xff\xff\xff" or hdr.dst[0] in (0, 127):
            return "ipv4-bad-destination"
        self.sandbox_mac = src_mac
        body = pkt[hdr.header_len:hdr.total_len]
        if hdr.proto == ipv4.PROTO_TCP:
            return self._tcp(hdr, body, now)
        if hdr.proto == ipv4.PROTO_UDP:
            return self._udp(hdr, body, pkt)
        if hdr.proto == ipv4.PROTO_ICMP:
            return self._icmp(hdr, body)
        return "ipv4-unknown-protocol"

    def _icmp(self, hdr: ipv4.Ipv4Header, body: memoryview) -> str | None:
        parsed = icmp.parse(body)
        if parsed is None:
            return "icmp-malformed"
        if parsed[0] != icmp.TYPE_ECHO_REQUEST:
            return "icmp-not-echo-request"
        if hdr.dst not in self.local_ips:
            return "icmp-echo-not-local"
        self._send_ip(hdr.dst, ipv4.PROTO_ICMP, icmp.echo_reply(body))
        return None

    def _udp(self, hdr: ipv4.Ipv4Header, body: memoryview, pkt: memoryview) -> str | None:
        parsed = udp.parse(body, checksum.pseudo_header_sum(hdr.src, hdr.dst, ipv4.PROTO_UDP,
                                                            len(body)))
        if isinstance(parsed, str):
            return parsed
        sport, dport, payload = parsed
        if sport == 0 or dport == 0:
            return "udp-port-zero"
        flow = ev.Flow("udp", _ip_text(hdr.src), sport, _ip_text(hdr.dst), dport)
        quote = bytes(pkt[:hdr.header_len + udp.HEADER_LEN])
        self._events.append(ev.UdpDatagram(flow, bytes(payload), quote))
        return None

    def _tcp(self, hdr: ipv4.Ipv4Header, body: memoryview, now: float) -> str | None:
        seg = tcp.parse(body, checksum.pseudo_header_sum(hdr.src, hdr.dst, ipv4.PROTO_TCP,
                                                         len(body)))
        if isinstance(seg, str):
            return seg
        if seg.sport == 0 or seg.dport == 0:
            return "tcp-port-zero"
        key = (hdr.src, seg.sport, hdr.dst, seg.dport)
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
            return self._new_syn(key, seg, hdr)
        if key in self._pending:
            return "tcp-before-accept"
        if flags & RST:
            return "tcp-rst-no-connection"
        # RFC 9293 §3.10.7.1: a segment for no connection draws a reset.
        if flags & ACK:
            self._emit_tcp(key, RST, seg.ack, 0, 0)
        else:
            self._emit_tcp(key, RST | ACK, 0, (seg.seq + seg.seg_len) & 0xFFFFFFFF, 0)
        return "tcp-no-connection"

    def _new_syn(self, key: _Key, seg: TcpSegment, hdr: ipv4.Ipv4Header) -> str | None:
        if key in self._pending:
            return "tcp-syn-duplicate"
        if len(self._conns) >= self.config.max_connections:
            self._emit_tcp(key, RST | ACK, 0, (seg.seq + 1) & 0xFFFFFFFF, 0)
            return "tcp-too-many-connections"
        if len(self._pending) >= self.config.max_pending:
            old_key, (old_seg, old_flow) = self._pending.popitem(last=False)
            self._by_flow.pop(old_flow, None)
            self._emit_tcp(old_key, RST | ACK, 0, (old_seg.seq + 1) & 0xFFFFFFFF, 0)
            self.drops["tcp-syn-evicted"] += 1
        # Data on a SYN is not kept: our SYN-ACK acknowledges only the SYN, so the sender
        # sends it again once the connection is open (RFC 9293 §3.10.7.2 allows either).
        seg.payload = memoryview(b"")
        flow = ev.Flow("tcp", _ip_text(hdr.src), seg.sport, _ip_text(hdr.dst), seg.dport)
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
        conn = TcpConnection(seg, iss, now, self.mss_limit, self.config.tcp, self, flow, key)
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

    def tcp_send(self, flow: ev.Flow, data: bytes | bytearray | memoryview, now: float) -> int:
        """Queue data for the sandbox; returns how much was taken (0 when full or closed)."""
        conn = self.connection(flow)
        return conn.send(data, now) if conn is not None else 0

    def tcp_recv(self, flow: ev.Flow, max_bytes: int) -> bytes:
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

    def udp_send(self, flow: ev.Flow, payload: bytes | bytearray | memoryview) -> None:
        """A datagram to the sandbox's end of `flow`, from the destination it talked to."""
        sandbox, remote = _ip_bytes(flow.src), _ip_bytes(flow.dst)
        pseudo = checksum.pseudo_header_sum(remote, sandbox, ipv4.PROTO_UDP,
                                            udp.HEADER_LEN + len(payload))
        self._send_ip(remote, ipv4.PROTO_UDP, udp.datagram(flow.dport, flow.sport, payload, pseudo),
                      dst=sandbox)

    def udp_unreachable(self, datagram: ev.UdpDatagram) -> None:
        """ICMP port unreachable for a datagram (RFC 792), from its destination address."""
        self._send_ip(_ip_bytes(datagram.flow.dst), ipv4.PROTO_ICMP,
                      icmp.unreachable(icmp.CODE_PORT_UNREACHABLE, datagram.quote))

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
            conn.on_timer(now)
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
        self._events.append(ev.TcpClosed(conn.flow, reset, reason))

    def tcp_ack_due(self, conn: TcpConnection) -> None:
        self._ack_due.append(conn)

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
        if self._conns.get(key) is conn:
            del self._conns[key]
            self._by_flow.pop(conn.flow, None)

    def _isn(self, key: _Key, now: float) -> int:
        """RFC 6528: a 4 us clock plus a keyed hash of the connection's addresses."""
        digest = hashlib.blake2s(b"".join([key[0], key[1].to_bytes(2, "big"), key[2],
                                           key[3].to_bytes(2, "big")]),
                                 key=self.config.isn_key[:32], digest_size=4).digest()
        return (int(now * 250_000) + int.from_bytes(digest, "big")) & 0xFFFFFFFF

    def _next_ident(self) -> int:
        self._ident = (self._ident + 1) & 0xFFFF
        return self._ident

    def _emit_tcp(self, key: _Key, flags: int, seqno: int, ackno: int, window: int,
                  payload: bytes | bytearray | memoryview = b"", options: bytes = b"") -> None:
        sandbox_ip, sandbox_port, remote_ip, remote_port = key
        seg_len = tcp.MIN_HEADER_LEN + len(options) + len(payload)
        frame = bytearray(ETH_IP_HEADERS + seg_len)
        self._write_headers(frame, remote_ip, sandbox_ip, ipv4.PROTO_TCP, seg_len)
        start = ETH_IP_HEADERS + tcp.MIN_HEADER_LEN + len(options)
        frame[start:] = payload
        pseudo = checksum.pseudo_header_sum(remote_ip, sandbox_ip, ipv4.PROTO_TCP, seg_len)
        tcp.segment_into(frame, ETH_IP_HEADERS, remote_port, sandbox_port, seqno, ackno, flags,
                         window, options, len(payload), pseudo)
        self._frames.append(frame)
        self.stats["tcp-out"] += 1

    def _send_ip(self, src: bytes, proto: int, body: bytes, dst: bytes | None = None) -> None:
        frame = bytearray(ETH_IP_HEADERS + len(body))
        self._write_headers(frame, src, dst or self.sandbox_ip, proto, len(body))
        frame[ETH_IP_HEADERS:] = body
        self._frames.append(frame)

    def _write_headers(self, frame: bytearray, src: bytes, dst: bytes, proto: int,
                       payload_len: int) -> None:
        mac = self.sandbox_mac or ethernet.BROADCAST
        frame[0:ethernet.HEADER_LEN] = ethernet.header(mac, self.config.gateway_mac,
                                                       ethernet.ETHERTYPE_IPV4)
        frame[ethernet.HEADER_LEN:ETH_IP_HEADERS] = ipv4.header(src, dst, proto, payload_len,
                                                                self._next_ident())
