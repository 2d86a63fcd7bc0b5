"""The engine: the stack between the TAP link and the host, and the dispatch of its events.

How this works: the engine owns the stack (netstack.Interface) and a loop
(tapbox.net.reactor) that watches the TAP device and every host socket. When the TAP device is
readable, its frames go into the stack; when a host socket is, its flow's handler runs. After
every such pass the loop calls `flush()`, the one place where the stack's events are answered
and its frames written to the link; so anything that changes the stack (a frame, host data, a
timer, an answer from upstream) is followed by a flush without anyone having to remember it.

Each new flow is decided by the policy before anything leaves the machine:
- TCP: allowed -> a `TcpProxy` (tapbox.net.tcpproxy) connects a host socket first; the
  sandbox's SYN is answered with SYN-ACK only once that succeeds, and with RST if it is refused
  or times out. Denied -> RST at once.
- UDP and ping: allowed -> a `DatagramRelay` (tapbox.net.relay) with one connected host
  socket, closed after an idle time; denied -> ICMP unreachable, and the denied flow is
  remembered while the sandbox keeps sending on it (one flow, reported once).
- DNS to the DNS address (UDP, or TCP through a `DnsStream`) goes to the forwarder
  (tapbox.net.dns), never out as it is.
Addresses inside the sandbox's own network are never proxied (only DNS there is served).
A flow's `dst` is always the address decided on (an IPv4 address the sandbox wrote in an IPv6
form is given as IPv4 by the stack); the host socket goes to that address, except that a NAT64
form (64:ff9b::/96) is reached through the host's own translator, as the sandbox asked.

Nothing one flow provokes ends the engine: a host socket that cannot be opened (EMFILE...) or
fails ends that flow (RST or ICMP unreachable to the sandbox, its ending logged), and anything
unexpected in one flow's handling is caught at that flow's edge (`_dispatch_one`, the loop's
`crashed` callbacks), counted, and ends only that flow. Only the TAP link failing
(`EngineError`) ends the engine; the runner then stops the command and exits 125.
"""

from __future__ import annotations

import ipaddress
import os
import socket as pysocket
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import trio

from netstack import events as ev
from netstack.iface import Interface, InterfaceConfig
from netstack.wire.ipv6 import NAT64_PREFIX
from tapbox import layout
from tapbox.attribution import Attributor
from tapbox.audit import Audit
from tapbox.flows import FlowRecord
from tapbox.net.dnsstream import DnsStream
from tapbox.net.faults import FaultInjector, FaultSpec
from tapbox.net.link import CapturedLink, EngineError, FaultyLink, Link, TapLink
from tapbox.net.reactor import EPOLLIN, Reactor
from tapbox.net.relay import DatagramEvent, DatagramRelay, RefusedFlows
from tapbox.net.tcpproxy import TcpProxy
from tapbox.pcap import PcapWriter
from tapbox.policy import SANDBOX_NET4, SANDBOX_NET6, Decision, Policy

if TYPE_CHECKING:
    from tapbox.net.dns import Pending


class Forwarder(Protocol):
    """Answers the sandbox's DNS queries (tapbox.net.dns.DnsForwarder, whose module imports
    dnspython: the runner builds it on first use)."""

    def answer_now(self, query: bytes, *, tcp: bool = False,
                   udp_limit: int = 65535) -> bytes | None | Pending: ...

    async def complete(self, pending: Pending) -> bytes: ...

__all__ = ["Engine", "EngineConfig", "EngineError", "sandbox_interface"]

READ_BATCH = 256  # frames read from the TAP device per pass, at most


def sandbox_interface(**options: Any) -> InterfaceConfig:
    """The stack's configuration for tapbox's address plan (tapbox.layout), with `options`."""
    return InterfaceConfig(
        sandbox_ip=layout.TAP_ADDRESS, gateway_ip=layout.GATEWAY_ADDRESS,
        dns_ip=layout.DNS_ADDRESS, sandbox_ip6=layout.TAP_ADDRESS6,
        gateway_ip6=layout.GATEWAY_ADDRESS6, dns_ip6=layout.DNS_ADDRESS6,
        prefix6=str(SANDBOX_NET6.network_address), prefix6_len=SANDBOX_NET6.prefixlen,
        **options)


@dataclass
class EngineConfig:
    interface: InterfaceConfig = field(default_factory=sandbox_interface)
    connect_timeout: float = 15.0
    udp_idle_timeout: float = 60.0
    max_udp_flows: int = 1024
    max_refused_flows: int = 4096  # denied datagram flows remembered (oldest ended first)
    faults: FaultSpec | None = None  # test-only frame seam (tapbox.net.faults)


class Engine:
    def __init__(self, tap_fd: int, policy: Policy, forwarder: Forwarder, audit: Audit,
                 config: EngineConfig | None = None) -> None:
        self.tap_fd = tap_fd
        self.policy = policy
        self.forwarder = forwarder
        self.audit = audit
        self.config = config or EngineConfig()
        self.stack = Interface(self.config.interface)
        iface = self.config.interface
        self.dns_ips = {iface.dns_ip, iface.dns_ip6} if iface.ipv6 else {iface.dns_ip}
        self.tcp: dict[ev.Flow, TcpProxy | DnsStream] = {}
        self.udp: dict[ev.Flow, DatagramRelay] = {}  # UDP and ICMP echo flows
        self.refused = RefusedFlows(self.config.max_refused_flows, self.config.udp_idle_timeout,
                                    self.audit.flow_ended)
        self._refusing: set[int] = set()  # ids of records whose refusal awaits attribution
        self.internal_errors: Counter[str] = Counter()  # by exception type: bugs, not input
        self.link: Link = TapLink(tap_fd, iface.mtu + 64)
        self.reactor = Reactor(self.flush, self._tick, self._deadline)
        self.capture: PcapWriter | None = None  # --pcap: every frame read and written (runner)
        self.attributor: Attributor | None = None  # --log: which process opened a flow (runner)
        self._expiring = False

    # ----- the loop -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the sandbox until cancelled; reports started once frames are being read."""
        os.set_blocking(self.tap_fd, False)
        if self.capture is not None:
            self.link = CapturedLink(self.link, self.capture, self.stack.prefix)
        if self.config.faults is not None:
            self.link = FaultyLink(self.link, FaultInjector(self.config.faults,
                                                            self.stack.prefix),
                                   trio.current_time)
        self.reactor.watch(self.tap_fd, EPOLLIN, self._from_tap)
        try:
            await self.reactor.run(task_status=task_status)
        finally:
            self._stop()
            self.reactor.close()

    def _from_tap(self, mask: int) -> None:
        now = trio.current_time()
        receive = self.stack.receive
        frames, _ = self.link.receive(now, READ_BATCH)
        for frame in frames:
            receive(frame, now)

    def _tick(self, now: float) -> None:
        """Timers that are due: held frames, the stack's."""
        receive = self.stack.receive
        for frame in self.link.release(now):
            receive(frame, now)
        self.stack.poll(now)

    def _deadline(self) -> float | None:
        at = self.stack.poll_at()
        held = self.link.next_at()
        if held is not None and (at is None or held < at):
            return held
        return at

    def flush(self) -> None:
        """Answer the stack's events and write its frames to the link, until it is quiet."""
        stack, send = self.stack, self.link.send
        while True:
            events = stack.take_events()
            for event in events:
                self._dispatch_one(event)
            frames = stack.take_frames()
            if not frames and not events:
                break
            for frame in frames:
                send(frame)
        self.reactor.rearm()

    def _stop(self) -> None:
        """tapbox stops: every flow still open ends so."""
        for handler in list(self.tcp.values()):
            if isinstance(handler, TcpProxy):
                handler.finish("open when tapbox stopped")
            else:
                handler.finish()
        for relay in list(self.udp.values()):
            relay.finish("open when tapbox stopped")
        self.refused.end_all()

    async def drain(self, idle: float = 0.05) -> None:
        """Return once no TCP connection with the sandbox is left (data still in flight from
        a command that already exited — its kernel keeps sending after close — reaches the host
        first). Host connects still pending have nothing to deliver and do not count."""
        while any(self.stack.connection(flow) is not None for flow in self.tcp):
            await trio.sleep(idle)

    def drop_counts(self) -> dict[str, int]:
        """Frames dropped so far, by reason (the stack's, plus a full TAP queue)."""
        counts = dict(self.stack.drops)
        if self.link.dropped:
            counts["tap-queue-full"] = self.link.dropped
        for name, count in self.internal_errors.items():
            counts[f"engine-internal-error-{name}"] = count
        return counts

    # ----- events ---------------------------------------------------------------------------

    def _dispatch_one(self, event: ev.Event) -> None:
        """Answer one event; whatever goes wrong ends only the event's flow."""
        try:
            self._dispatch(event)
        except EngineError:
            raise
        except Exception as exc:
            flow = getattr(event, "flow", None)
            handler = self.tcp.get(flow) if flow is not None else None
            if handler is not None:
                handler.crashed(exc)
            else:
                self._internal_error(exc, flow)

    def _dispatch(self, event: ev.Event) -> None:
        if isinstance(event, ev.TcpReadable):
            handler = self.tcp.get(event.flow)
            if handler is not None:
                handler.on_readable()
        elif isinstance(event, ev.UdpDatagram):
            self._on_udp(event)
        elif isinstance(event, ev.TcpWritable):
            handler = self.tcp.get(event.flow)
            if handler is not None:
                handler.on_writable()
        elif isinstance(event, ev.TcpClosed):
            handler = self.tcp.get(event.flow)
            if handler is not None:
                handler.on_closed(event.reset, event.reason)
        elif isinstance(event, ev.TcpConnectRequest):
            self._on_connect(event.flow)
        elif isinstance(event, ev.IcmpEchoRequest):
            self._on_echo(event)

    def _internal_error(self, exc: Exception, flow: ev.Flow | None) -> str:
        """Count an unexpected failure in one flow's handling and end that flow (a TCP flow
        gets a reset). Returns the flow's ending. The first one is told on stderr."""
        name = type(exc).__name__
        if not self.internal_errors:
            self.audit.say(f"internal error in the network engine ({name}); the flow it "
                           "happened in was ended, the engine goes on")
        self.internal_errors[name] += 1
        if flow is not None and flow.proto == "tcp":
            self._fail_tcp(flow, "internal error")
        return f"internal error: {name}"

    def _fail_tcp(self, flow: ev.Flow, reason: str) -> None:
        """Reset a TCP flow towards the sandbox, whether its SYN is still pending or not."""
        if not self.stack.tcp_reject(flow):
            self.stack.tcp_abort(flow, reason)

    # ----- decisions ------------------------------------------------------------------------

    def _decide(self, flow: ev.Flow) -> Decision:
        address = ipaddress.ip_address(flow.dst)
        if address in (SANDBOX_NET4 if address.version == 4 else SANDBOX_NET6):
            return Decision(False, None, None, "the sandbox's own network is not proxied")
        return self.policy.decide(flow.dst, flow.dport, trio.current_time())

    def _begin(self, flow: ev.Flow, refuse: str | None = None,
               end_denied: bool = True) -> FlowRecord:
        """Decide a new flow and report it; denied flows are reported ended at once unless
        `end_denied` is False (the caller ends them)."""
        decision = self._decide(flow)
        would_deny = decision.would_deny and refuse is None  # audit mode: let through
        allowed = (decision.allowed or would_deny) and refuse is None
        record = FlowRecord(flow, allowed, refuse or decision.reason,
                            decision.rule.text if decision.rule else None, decision.name,
                            time.time(), would_deny=would_deny)
        if self.attributor is not None:
            self.attributor.start(record)
        self.audit.flow_started(record)
        if not allowed and end_denied:
            self._end(record, "denied")
        return record

    def _refuse(self, record: FlowRecord, refuse: Callable[[], object]) -> None:
        """Send the refusal (RST, ICMP unreachable) now, or once the flow's process is found:
        the refusal makes the sandbox drop the socket, and with it the trace to the process."""
        attributor = self.attributor
        if attributor is None or not record.attributing:
            refuse()
        elif id(record) not in self._refusing:  # one waiting refusal answers the socket
            self._refusing.add(id(record))

            def then(_: object) -> None:
                self._refusing.discard(id(record))
                refuse()

            self.reactor.later(lambda: attributor.settled(record), then,
                               _FlowOwner(self, record.flow))

    def _end(self, record: FlowRecord | None, ending: str) -> None:
        if record is not None and record.ended is None:
            record.ended = time.time()
            record.ending = ending
            self.audit.flow_ended(record)

    # ----- TCP ------------------------------------------------------------------------------

    def _on_connect(self, flow: ev.Flow) -> None:
        if flow.dst in self.dns_ips and flow.dport == 53:
            self.tcp[flow] = DnsStream(flow, self.stack, self.reactor, self.forwarder,
                                       self._dns_stream_finished, self._internal_error)
            self.stack.tcp_accept(flow, trio.current_time())
            return
        record = self._begin(flow)
        if not record.allowed:
            self._refuse(record, lambda: self.stack.tcp_reject(flow))
            return
        proxy = TcpProxy(flow, record, (_reach(flow), flow.dport), self.stack, self.reactor,
                         self.attributor, self.config.connect_timeout, self._proxy_finished,
                         self._internal_error)
        self.tcp[flow] = proxy
        try:
            proxy.start()
        except OSError as exc:  # EMFILE, ENOBUFS...: this flow cannot be, the engine goes on
            proxy.finish(f"host error: {os.strerror(exc.errno) if exc.errno else exc}")
            self._fail_tcp(flow, "host side failed")

    def _proxy_finished(self, proxy: TcpProxy, ending: str) -> None:
        if self.tcp.get(proxy.flow) is proxy:
            del self.tcp[proxy.flow]
        self._end(proxy.record, ending)

    def _dns_stream_finished(self, stream: DnsStream) -> None:
        if self.tcp.get(stream.flow) is stream:
            del self.tcp[stream.flow]

    # ----- UDP and ping ---------------------------------------------------------------------

    def _on_udp(self, datagram: ev.UdpDatagram) -> None:
        flow = datagram.flow
        if flow.dport == 53 and flow.dst in self.dns_ips:
            self._answer_dns(datagram)
            return
        relay = self.udp.get(flow) or self._open_relay(
            datagram, pysocket.SOCK_DGRAM, 0, (_reach(flow), flow.dport),
            deliver=lambda data: self.stack.udp_send(flow, data),
            refused=self._udp_refused)
        if relay is not None:
            relay.send(datagram, datagram.payload, len(datagram.payload))

    def _udp_refused(self, latest: DatagramEvent) -> None:
        assert isinstance(latest, ev.UdpDatagram)
        self.stack.udp_unreachable(latest)

    def _answer_dns(self, datagram: ev.UdpDatagram) -> None:
        """A query to the DNS address: answered in this pass when no upstream is needed."""
        limit = self.stack.udp_payload_limit(datagram.flow)

        def then(reply: bytes | None) -> None:
            if reply is not None:
                self.stack.udp_send(datagram.flow, reply)

        reply = self.forwarder.answer_now(datagram.payload, udp_limit=limit)
        if reply is None or isinstance(reply, bytes):
            then(reply)
            return
        pending = reply
        self.reactor.later(lambda: self.forwarder.complete(pending), then,
                           _FlowOwner(self, datagram.flow))

    def _on_echo(self, request: ev.IcmpEchoRequest) -> None:
        """Ping through an unprivileged ICMP socket (the kernel sets the identifier)."""
        flow = request.flow
        target = _reach(flow)
        v6 = ":" in target
        proto = pysocket.IPPROTO_ICMPV6 if v6 else pysocket.IPPROTO_ICMP

        def deliver(reply: bytes) -> None:
            if len(reply) >= 8 and reply[0] == (129 if v6 else 0):  # echo reply
                seqno = int.from_bytes(reply[6:8], "big")
                self.stack.icmp_echo_reply(ev.IcmpEchoRequest(flow, flow.sport, seqno, b""),
                                           reply[8:])

        relay = self.udp.get(flow) or self._open_relay(
            request, pysocket.SOCK_DGRAM, proto, (target, 0), deliver=deliver,
            refused=self._echo_refused)
        if relay is not None:
            header = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, 0, request.seq)
            relay.send(request, header + request.payload, len(request.payload))

    def _echo_refused(self, latest: DatagramEvent) -> None:
        assert isinstance(latest, ev.IcmpEchoRequest)
        self.stack.icmp_unreachable(latest)

    def _reject_datagram(self, event: DatagramEvent) -> None:
        if isinstance(event, ev.UdpDatagram):
            self.stack.udp_unreachable(event)
        else:
            self.stack.icmp_unreachable(event)

    def _open_relay(self, event: DatagramEvent, kind: int, proto: int,
                    address: tuple[str, int], deliver: Callable[[bytes], None],
                    refused: Callable[[DatagramEvent], None]) -> DatagramRelay | None:
        """Decide a new datagram flow and, if allowed, open its host socket and relay.
        A datagram of a flow already refused and still refused is counted on that flow."""
        flow = event.flow
        full = len(self.udp) >= self.config.max_udp_flows
        known = self.refused.get(flow)
        if known is not None:
            if self._still_refused(known.record, flow, full):
                known = self.refused.used(flow, trio.current_time())
                self._refuse(known.record, lambda: self._reject_datagram(event))
                return None
            self.refused.end(flow)  # decided again below, as a new flow
        record = self._begin(flow, refuse="too many datagram flows" if full else None,
                             end_denied=False)
        if not record.allowed:
            record.datagrams_out = 1
            self._remember_refused(record)
            self._refuse(record, lambda: self._reject_datagram(event))
            return None
        try:
            sock = pysocket.socket(_family(address[0]), kind, proto)
        except PermissionError:  # ICMP sockets need the group in net.ipv4.ping_group_range
            self._reject_datagram(event)
            self._end(record, "ping not permitted on this host (net.ipv4.ping_group_range)")
            return None
        except OSError as exc:  # EMFILE, ENOBUFS...: this flow cannot be, the engine goes on
            self._reject_datagram(event)
            self._end(record, f"host error: {exc.strerror or exc}")
            return None
        sock.setblocking(False)
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            self._reject_datagram(event)
            self._end(record, f"unreachable upstream: {exc.strerror or exc}")
            return None
        relay = DatagramRelay(flow, sock, record, event, deliver, refused, self.reactor,
                              self.config.udp_idle_timeout, self._relay_finished,
                              self._internal_error)
        self.udp[flow] = relay
        attributor = self.attributor
        relay.start(None if attributor is None or not record.attributing
                    else lambda: attributor.settled(record))
        return relay

    def _relay_finished(self, relay: DatagramRelay, ending: str) -> None:
        if self.udp.get(relay.flow) is relay:
            del self.udp[relay.flow]
        self._end(relay.record, ending)

    def _still_refused(self, record: FlowRecord, flow: ev.Flow, full: bool) -> bool:
        """Whether a new decision for a refused flow would refuse it again."""
        if record.reason == "too many datagram flows":
            return full
        decision = self._decide(flow)
        return not (decision.allowed or decision.would_deny)

    def _remember_refused(self, record: FlowRecord) -> None:
        self.refused.remember(record, trio.current_time())
        if not self._expiring:
            self._expiring = True
            self._expire_later()

    def _expire_later(self) -> None:
        idle = self.config.udp_idle_timeout
        self.reactor.call_at(trio.current_time() + max(1.0, idle / 4), self._expire_refused)

    def _expire_refused(self) -> None:
        self.refused.expire(trio.current_time())
        if len(self.refused):
            self._expire_later()
        else:
            self._expiring = False


class _FlowOwner:
    """Deferred work about one flow: what it raises ends that flow."""

    def __init__(self, engine: Engine, flow: ev.Flow) -> None:
        self.engine = engine
        self.flow = flow

    def ready(self, mask: int) -> None:
        pass

    def crashed(self, exc: Exception) -> None:
        handler = self.engine.tcp.get(self.flow)
        if handler is not None:
            handler.crashed(exc)
        else:
            self.engine._internal_error(exc, self.flow)


def _family(address: str) -> int:
    return pysocket.AF_INET6 if ":" in address else pysocket.AF_INET


def _reach(flow: ev.Flow) -> str:
    """Where the host socket goes: the address decided on, or a NAT64 form as written (the
    host's translator reaches the IPv4 address in it, RFC 6052)."""
    if flow.via and ipaddress.IPv6Address(flow.via).packed[:12] == NAT64_PREFIX:
        return flow.via
    return flow.dst
