"""The engine: a trio event loop that joins the TAP device, the stack, the policy and the host.

How this works: one task reads frames from the TAP fd (draining it until EAGAIN on every
wake-up) into `netstack.Interface.receive`, then `_service()` answers the stack's events and
writes the frames the stack produced back to the TAP fd. Every other task that touches the
stack (host-socket pumps, DNS answers, UDP relays, the timer) calls `_service()` right after,
so there is one owner in effect: trio runs one task at a time and none awaits mid-update.

Each new flow is decided by the policy before anything leaves the machine:
- TCP: allowed -> connect a host socket first; the sandbox's SYN is answered with SYN-ACK only
  once that succeeds, and with RST if it is refused or times out. Denied -> RST at once.
  Then two pumps move bytes: sandbox -> host takes data out of the stack only as fast as the
  host socket accepts it (so the window the stack advertises closes when the host is slow), and
  host -> sandbox reads from the host only while the stack's send buffer has room.
- UDP: one connected host socket per flow, closed after an idle timeout; denied -> ICMP port
  unreachable. Datagrams to the DNS address go to `tapbox.dns` instead. A denied datagram
  flow (UDP, or a ping) is remembered while the sandbox keeps sending on it (`_Refused`): its
  further datagrams are refused and counted on the same record, so a loop sending to one
  denied destination is one flow, reported once, not one per datagram. It ends after the same
  idle timeout as an allowed flow, or at once when a new decision would differ (DNS has since
  admitted the address, a full flow table has room again).
Addresses inside the sandbox's own network are never proxied (only DNS there is served).
A flow's `dst` is always the address decided on (an IPv4 address the sandbox wrote in an IPv6
form is given as IPv4 by the stack); the host socket goes to that address, except that a NAT64
form (64:ff9b::/96) is reached through the host's own translator, as the sandbox asked.

Nothing one flow provokes ends the engine: a host socket that cannot be opened (EMFILE...) or
fails ends that flow (RST or ICMP unreachable to the sandbox, its ending logged), and anything
unexpected in one flow's task or event is caught at that flow's edge (`_guarded`,
`_dispatch_one`), counted, and ends only that flow. Only the TAP device failing (`EngineError`)
ends the engine; the runner then stops the command and exits 125.
"""

from __future__ import annotations

import errno
import ipaddress
import math
import os
import socket as pysocket
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from netstack import events as ev
from netstack.iface import Interface, InterfaceConfig
from netstack.wire.ipv6 import NAT64_PREFIX
from tapbox.attribution import Attributor
from tapbox.audit import Audit
from tapbox.dns import DnsForwarder, TcpDnsFramer
from tapbox.faults import INBOUND, OUTBOUND, FaultInjector, FaultSpec
from tapbox.flows import FlowRecord
from tapbox.pcap import PcapWriter
from tapbox.policy import SANDBOX_NET4, SANDBOX_NET6, Decision, Policy

READ_BATCH = 256  # frames per wake-up before yielding to other tasks
PUMP_CHUNK = 256 * 1024


@dataclass
class EngineConfig:
    interface: InterfaceConfig = field(default_factory=InterfaceConfig)
    connect_timeout: float = 15.0
    udp_idle_timeout: float = 60.0
    max_udp_flows: int = 1024
    max_refused_flows: int = 4096  # denied datagram flows remembered (oldest ended first)
    faults: FaultSpec | None = None  # test-only frame seam (tapbox.faults)


class EngineError(Exception):
    """The engine cannot go on (the TAP device failed)."""


class _TcpProxy:
    """Per-connection state shared by the dispatcher and the connection's task.

    Sandbox -> host runs in the dispatcher (`Engine._to_host`): data the stack has is sent on
    the non-blocking host socket at once, with no task switch; only when that socket is full
    does a short task wait for it to drain (`blocked`). Host -> sandbox runs in the task.
    `readable` / `writable` wake a task waiting for the stack; `cancel` ends the task.
    """

    def __init__(self, flow: ev.Flow, record: FlowRecord | None = None) -> None:
        self.flow = flow
        self.record = record
        self.readable = trio.Event()
        self.writable = trio.Event()
        self.closed = False
        self.reset = False
        self.reset_reason = ""
        self.cancel = trio.CancelScope()
        self.sock: pysocket.socket | None = None
        self.connected = False
        self.pending = memoryview(b"")  # taken from the stack, not yet taken by the host socket
        self.blocked = False  # the host socket is full: a task waits for it to drain
        self.shut_wr = False  # the sandbox's end of stream was passed on to the host
        self.error: OSError | None = None  # the host socket failed while sending

    def wake(self) -> None:
        self.readable.set()
        self.writable.set()


@dataclass
class _Refused:
    """A denied datagram flow, remembered while the sandbox keeps sending on it."""

    record: FlowRecord
    last_used: float
    last_wall: float


class _DatagramRelay:
    """One UDP or ICMP-echo flow: a connected, non-blocking host socket (sends never wait:
    datagrams may drop, as at a router). `deliver` hands a reply to the stack; `refused`
    reports an ICMP error the host got back."""

    def __init__(self, flow: ev.Flow, sock: pysocket.socket, record: FlowRecord,
                 deliver: Callable[[bytes], None], refused: Callable[[], None]) -> None:
        self.flow = flow
        self.record = record
        self.sock = sock
        self.deliver = deliver
        self.refused = refused
        self.last_used = 0.0


class Engine:
    def __init__(self, tap_fd: int, policy: Policy, forwarder: DnsForwarder, audit: Audit,
                 config: EngineConfig | None = None) -> None:
        self.tap_fd = tap_fd
        self.policy = policy
        self.forwarder = forwarder
        self.audit = audit
        self.config = config or EngineConfig()
        self.stack = Interface(self.config.interface)
        iface = self.config.interface
        self.dns_ips = {iface.dns_ip, iface.dns_ip6} if iface.ipv6 else {iface.dns_ip}
        self.tcp: dict[ev.Flow, _TcpProxy] = {}
        self.udp: dict[ev.Flow, _DatagramRelay] = {}  # UDP and ICMP echo flows
        self.refused: OrderedDict[ev.Flow, _Refused] = OrderedDict()  # least recent first
        self._refusing: set[int] = set()  # ids of records whose refusal awaits attribution
        self.frames_dropped = 0
        self.internal_errors: Counter[str] = Counter()  # by exception type: bugs, not input
        self.faults = FaultInjector(self.config.faults, self.stack.prefix) \
            if self.config.faults else None
        self._nursery: trio.Nursery | None = None
        self._timer_scope: trio.CancelScope | None = None
        self.capture: PcapWriter | None = None  # --pcap: every frame read and written (runner)
        self.attributor: Attributor | None = None  # --log: which process opened a flow (runner)

    # ----- main loop ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the sandbox until cancelled; reports started once frames are being read."""
        os.set_blocking(self.tap_fd, False)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._timer_loop)
                nursery.start_soon(self._expire_refused)
                task_status.started()
                await self._read_loop()
        finally:
            while self.refused:
                self._end_refused(next(iter(self.refused)))

    async def _read_loop(self) -> None:
        fd = self.tap_fd
        bufsize = self.config.interface.mtu + 64
        receive = self.stack.receive
        while True:
            await trio.lowlevel.wait_readable(fd)
            now = trio.current_time()
            drained = False
            for _ in range(READ_BATCH):
                try:
                    frame = os.read(fd, bufsize)
                except BlockingIOError:
                    drained = True
                    break
                except OSError as exc:
                    raise EngineError(f"reading the TAP device failed: {exc}") from exc
                if not frame:
                    raise EngineError("the TAP device was closed")
                if self.capture is not None:
                    self.capture.write(memoryview(frame)[self.stack.prefix:])
                if self.faults is None:
                    receive(frame, now)
                else:
                    for passed in self.faults.apply(INBOUND, frame, now):
                        receive(passed, now)
            self._service()
            if not drained:  # more frames wait: let other tasks run before the next batch
                await trio.lowlevel.checkpoint()

    async def _timer_loop(self) -> None:
        while True:
            with trio.CancelScope() as scope:
                self._timer_scope = scope
                self._set_timer()
                await trio.sleep_forever()
            self._timer_scope = None
            now = trio.current_time()
            if self.faults is not None:
                for direction, frame in self.faults.due(now):
                    if direction == INBOUND:
                        self.stack.receive(frame, now)
                    else:
                        self._write(frame)
            self.stack.poll(now)
            self._service()

    async def drain(self, idle: float = 0.05) -> None:
        """Return once no TCP connection with the sandbox is left (data still in flight from
        a command that already exited — its kernel keeps sending after close — reaches the host
        first). Host connects still pending have nothing to deliver and do not count."""
        while any(self.stack.connection(flow) is not None for flow in self.tcp):
            await trio.sleep(idle)

    def drop_counts(self) -> dict[str, int]:
        """Frames dropped so far, by reason (the stack's, plus a full TAP queue)."""
        counts = dict(self.stack.drops)
        if self.frames_dropped:
            counts["tap-queue-full"] = self.frames_dropped
        for name, count in self.internal_errors.items():
            counts[f"engine-internal-error-{name}"] = count
        return counts

    def _set_timer(self) -> None:
        if self._timer_scope is not None:
            at = self.stack.poll_at()
            if self.faults is not None and self.faults.held:
                at = min(at or math.inf, self.faults.held[0][0])
            self._timer_scope.deadline = math.inf if at is None else at

    def _service(self) -> None:
        """Answer the stack's events and flush its frames to the TAP device."""
        stack = self.stack
        while True:
            events = stack.take_events()
            for event in events:
                self._dispatch_one(event)
            frames = stack.take_frames()
            if not frames and not events:
                break
            if self.faults is None:
                for frame in frames:
                    self._write(frame)
            else:
                now = trio.current_time()
                for frame in frames:
                    for passed in self.faults.apply(OUTBOUND, bytes(frame), now):
                        self._write(passed)
        self._set_timer()

    def _write(self, frame: bytes | bytearray) -> None:
        try:
            os.write(self.tap_fd, frame)
            if self.capture is not None:
                self.capture.write(memoryview(frame)[self.stack.prefix:])
        except BlockingIOError:
            self.frames_dropped += 1  # TCP recovers; a full TAP queue is congestion
        except OSError as exc:
            raise EngineError(f"writing to the TAP device failed: {exc}") from exc

    # ----- events ---------------------------------------------------------------------------

    def _dispatch_one(self, event: ev.Event) -> None:
        """Answer one event; whatever goes wrong ends only the event's flow."""
        try:
            self._dispatch(event)
        except EngineError:
            raise
        except Exception as exc:
            self._internal_error(exc, getattr(event, "flow", None))

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

    def _dispatch(self, event: ev.Event) -> None:
        if isinstance(event, ev.TcpReadable):
            proxy = self.tcp.get(event.flow)
            if proxy:
                proxy.readable.set()
                if proxy.connected:
                    self._to_host(proxy)
        elif isinstance(event, ev.TcpWritable):
            proxy = self.tcp.get(event.flow)
            if proxy:
                proxy.writable.set()
        elif isinstance(event, ev.TcpClosed):
            proxy = self.tcp.get(event.flow)
            if proxy:
                proxy.closed = True
                proxy.reset = event.reset
                proxy.reset_reason = event.reason
                if event.reset:
                    proxy.cancel.cancel()
                proxy.wake()
        elif isinstance(event, ev.UdpDatagram):
            self._on_udp(event)
        elif isinstance(event, ev.TcpConnectRequest):
            self._on_connect(event.flow)
        elif isinstance(event, ev.IcmpEchoRequest):
            self._on_echo(event)

    def _spawn(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._guarded, fn, *args)

    async def _guarded(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        """Run one per-flow task; an unexpected failure in it is that flow's alone (the
        tasks end their own flows; this is the last line)."""
        try:
            await fn(*args)
        except EngineError:
            raise
        except Exception as exc:
            self._internal_error(exc, None)

    def _on_connect(self, flow: ev.Flow) -> None:
        if flow.dst in self.dns_ips and flow.dport == 53:
            proxy = _TcpProxy(flow)
            self.tcp[flow] = proxy
            self.stack.tcp_accept(flow, trio.current_time())
            self._spawn(self._serve_dns_tcp, proxy)
            return
        record = self._begin(flow)
        if not record.allowed:
            self._refuse(record, lambda: self.stack.tcp_reject(flow))
            return
        proxy = _TcpProxy(flow, record)
        self.tcp[flow] = proxy
        self._spawn(self._proxy_tcp, proxy)

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
        if self.attributor is None or not record.attributing:
            refuse()
        elif id(record) not in self._refusing:  # one waiting refusal answers the socket
            self._refusing.add(id(record))
            self._spawn(self._refuse_attributed, record, refuse)

    async def _refuse_attributed(self, record: FlowRecord, refuse: Callable[[], object]) -> None:
        assert self.attributor is not None
        try:
            await self.attributor.settled(record)
        finally:
            self._refusing.discard(id(record))
        refuse()
        self._service()

    def _end(self, record: FlowRecord | None, ending: str) -> None:
        if record is not None and record.ended is None:
            record.ended = time.time()
            record.ending = ending
            self.audit.flow_ended(record)

    # ----- TCP ------------------------------------------------------------------------------

    async def _proxy_tcp(self, proxy: _TcpProxy) -> None:
        flow = proxy.flow
        sock: pysocket.socket | None = None
        ending = "closed"
        try:
            # One cancel scope for the whole life of the flow: a reset from the sandbox, a
            # failed send to the host, or the stack giving up on the pending SYN ends it.
            with proxy.cancel:
                sock = pysocket.socket(_family(_reach(flow)), pysocket.SOCK_STREAM)  # EMFILE
                sock.setblocking(False)
                proxy.sock = sock
                error = await self._connect(sock, flow)
                if self.attributor is not None and proxy.record is not None:
                    # The process waits in connect() until its SYN is answered: find it first.
                    await self.attributor.settled(proxy.record)
                if error is not None:
                    ending = error
                    self.stack.tcp_reject(flow)
                    self._service()
                    return
                sock.setsockopt(pysocket.IPPROTO_TCP, pysocket.TCP_NODELAY, 1)
                proxy.connected = True
                if not self.stack.tcp_accept(flow, trio.current_time()):
                    ending = "given up by the sandbox"
                    return  # the SYN was given up on meanwhile
                self._service()
                await self._to_sandbox(proxy, sock)
            if proxy.error is not None:
                raise proxy.error
            if proxy.reset:
                ending = proxy.reset_reason or "reset"
                _linger_zero(sock)  # the sandbox reset: reset the host side too
        except OSError as exc:  # the host side failed (or never opened): reset the sandbox side
            ending = "reset by host" if isinstance(exc, (ConnectionResetError, BrokenPipeError)) \
                else f"host error: {os.strerror(exc.errno) if exc.errno else exc}"
            self._fail_tcp(flow, "host side failed")
            self._service()
        except trio.Cancelled:
            ending = "open when tapbox stopped"
            raise
        except EngineError:
            raise
        except Exception as exc:
            ending = self._internal_error(exc, flow)
            self._service()
        finally:
            proxy.connected = False
            if sock is not None:
                trio.lowlevel.notify_closing(sock)
                sock.close()
            self.tcp.pop(flow, None)
            self._end(proxy.record, ending)

    async def _connect(self, sock: pysocket.socket, flow: ev.Flow) -> str | None:
        """None once connected, else how the host-side connect failed."""
        code = sock.connect_ex((_reach(flow), flow.dport))
        if code == errno.EINPROGRESS:
            with trio.move_on_after(self.config.connect_timeout):
                await trio.lowlevel.wait_writable(sock)
                code = sock.getsockopt(pysocket.SOL_SOCKET, pysocket.SO_ERROR)
            if code == errno.EINPROGRESS:
                return "connect timeout"
        if code == 0:
            return None
        if code == errno.ECONNREFUSED:
            return "refused upstream"
        return f"unreachable upstream: {os.strerror(code)}"

    def _to_host(self, proxy: _TcpProxy) -> None:
        """Sandbox -> host, from the dispatcher: take data from the stack only as fast as the
        host socket takes it, so the window the stack offers closes when the host is slow."""
        sock, stack, flow = proxy.sock, self.stack, proxy.flow
        if sock is None or proxy.blocked or proxy.error is not None:
            return
        while True:
            if not proxy.pending:
                data = stack.tcp_recv(flow, PUMP_CHUNK)
                if not data:
                    if stack.tcp_at_eof(flow) and not proxy.shut_wr and not proxy.reset:
                        proxy.shut_wr = True
                        try:
                            sock.shutdown(pysocket.SHUT_WR)
                        except OSError:
                            pass
                        proxy.readable.set()
                    return
                proxy.pending = memoryview(data)
                if proxy.record is not None:
                    proxy.record.bytes_out += len(data)
            try:
                sent = sock.send(proxy.pending)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                proxy.error = exc
                proxy.cancel.cancel()
                return
            proxy.pending = proxy.pending[sent:]
            if proxy.pending:
                proxy.blocked = True
                self._spawn(self._host_drained, proxy)
                return

    async def _host_drained(self, proxy: _TcpProxy) -> None:
        """The host socket was full: wait until it takes data again, then carry on."""
        assert proxy.sock is not None
        try:
            await trio.lowlevel.wait_writable(proxy.sock)
        except (trio.ClosedResourceError, OSError):
            return  # the connection ended meanwhile
        proxy.blocked = False
        self._to_host(proxy)
        self._service()

    async def _to_sandbox(self, proxy: _TcpProxy, sock: pysocket.socket) -> None:
        """Host -> sandbox: read from the host only while the stack has room to queue it; then
        wait until the sandbox's side is finished too."""
        flow, stack = proxy.flow, self.stack
        while True:
            space = stack.tcp_send_space(flow)
            if space == 0:
                if proxy.closed or stack.connection(flow) is None:
                    return
                proxy.writable = trio.Event()
                await proxy.writable.wait()
                continue
            try:
                data = sock.recv(min(space, PUMP_CHUNK))
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            if not data:
                stack.tcp_close(flow, trio.current_time())
                self._service()
                break
            stack.tcp_send(flow, data, trio.current_time())
            if proxy.record is not None:
                proxy.record.bytes_in += len(data)
            self._service()
        while not (proxy.closed or (proxy.shut_wr and not proxy.pending)):
            proxy.readable = trio.Event()
            await proxy.readable.wait()

    # ----- DNS ------------------------------------------------------------------------------

    async def _serve_dns_tcp(self, proxy: _TcpProxy) -> None:
        """DNS over TCP (RFC 7766) on the DNS address: framed queries in, framed answers out."""
        try:
            with proxy.cancel:
                await self._dns_over_tcp(proxy)
        except EngineError:
            raise
        except Exception as exc:
            self._internal_error(exc, proxy.flow)
            self._service()
        finally:
            self.tcp.pop(proxy.flow, None)

    async def _dns_over_tcp(self, proxy: _TcpProxy) -> None:
        flow, stack = proxy.flow, self.stack
        framer = TcpDnsFramer()
        while not proxy.closed:
            proxy.readable = trio.Event()
            data = stack.tcp_recv(flow, PUMP_CHUNK)
            if data:
                self._service()
                for query in framer.feed(data):
                    reply = await self.forwarder.answer(query, tcp=True)
                    if reply is not None:
                        await self._send_all(proxy, TcpDnsFramer.frame(reply))
                continue
            if stack.tcp_at_eof(flow):
                stack.tcp_close(flow, trio.current_time())
                self._service()
                return
            await proxy.readable.wait()

    async def _send_all(self, proxy: _TcpProxy, data: bytes) -> None:
        view = memoryview(data)
        while view and not proxy.closed:
            proxy.writable = trio.Event()
            n = self.stack.tcp_send(proxy.flow, view, trio.current_time())
            self._service()
            view = view[n:]
            if view:
                await proxy.writable.wait()

    async def _answer_dns_udp(self, datagram: ev.UdpDatagram) -> None:
        limit = self.stack.udp_payload_limit(datagram.flow)
        reply = await self.forwarder.answer(datagram.payload, udp_limit=limit)
        if reply is not None:
            self.stack.udp_send(datagram.flow, reply)
            self._service()

    # ----- UDP ------------------------------------------------------------------------------

    def _on_udp(self, datagram: ev.UdpDatagram) -> None:
        flow = datagram.flow
        if flow.dst in self.dns_ips and flow.dport == 53:
            self._spawn(self._answer_dns_udp, datagram)
            return
        quote = [datagram.quote]  # of the latest datagram, for an ICMP error back
        relay = self.udp.get(flow) or self._open_relay(
            flow, pysocket.SOCK_DGRAM, 0, (_reach(flow), flow.dport),
            deliver=lambda data: self.stack.udp_send(flow, data),
            refused=lambda: self.stack.udp_unreachable(ev.UdpDatagram(flow, b"", quote[0])),
            reject=lambda: self.stack.udp_unreachable(datagram))
        if relay is not None:
            quote[0] = datagram.quote
            self._relay_send(relay, datagram.payload, len(datagram.payload))

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
            flow, pysocket.SOCK_DGRAM, proto, (target, 0), deliver=deliver,
            refused=lambda: self.stack.icmp_unreachable(request),
            reject=lambda: self.stack.icmp_unreachable(request))
        if relay is not None:
            header = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, 0, request.seq)
            self._relay_send(relay, header + request.payload, len(request.payload))

    def _open_relay(self, flow: ev.Flow, kind: int, proto: int, address: tuple[str, int],
                    deliver: Callable[[bytes], None], refused: Callable[[], None],
                    reject: Callable[[], None]) -> _DatagramRelay | None:
        """Decide a new datagram flow and, if allowed, open its host socket and relay task.
        A datagram of a flow already refused and still refused is counted on that flow."""
        full = len(self.udp) >= self.config.max_udp_flows
        known = self.refused.get(flow)
        if known is not None:
            if self._still_refused(known, flow, full):
                self.refused.move_to_end(flow)
                known.record.datagrams_out += 1
                known.last_used, known.last_wall = trio.current_time(), time.time()
                self._refuse(known.record, reject)
                return None
            self._end_refused(flow)  # decided again below, as a new flow
        record = self._begin(flow, refuse="too many datagram flows" if full else None,
                             end_denied=False)
        if not record.allowed:
            record.datagrams_out = 1
            self._remember_refused(record)
            self._refuse(record, reject)
            return None
        try:
            sock = pysocket.socket(_family(address[0]), kind, proto)
        except PermissionError:  # ICMP sockets need the group in net.ipv4.ping_group_range
            reject()
            self._end(record, "ping not permitted on this host (net.ipv4.ping_group_range)")
            return None
        except OSError as exc:  # EMFILE, ENOBUFS...: this flow cannot be, the engine goes on
            reject()
            self._end(record, f"host error: {exc.strerror or exc}")
            return None
        sock.setblocking(False)
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            reject()
            self._end(record, f"unreachable upstream: {exc.strerror or exc}")
            return None
        relay = _DatagramRelay(flow, sock, record, deliver, refused)
        self.udp[flow] = relay
        self._spawn(self._relay, relay)
        return relay

    # ----- refused datagram flows ------------------------------------------------------------

    def _still_refused(self, known: _Refused, flow: ev.Flow, full: bool) -> bool:
        """Whether a new decision for a refused flow would refuse it again."""
        if known.record.reason == "too many datagram flows":
            return full
        decision = self._decide(flow)
        return not (decision.allowed or decision.would_deny)

    def _remember_refused(self, record: FlowRecord) -> None:
        flow = record.flow
        self.refused[flow] = _Refused(record, trio.current_time(), time.time())
        while len(self.refused) > self.config.max_refused_flows:
            self._end_refused(next(iter(self.refused)))

    def _end_refused(self, flow: ev.Flow) -> None:
        known = self.refused.pop(flow)
        record = known.record
        if record.ended is None:
            record.ended = known.last_wall  # the flow was last active then
            record.ending = "denied"
            self.audit.flow_ended(record)

    async def _expire_refused(self) -> None:
        """End the refused flows the sandbox has stopped sending on."""
        idle = self.config.udp_idle_timeout
        while True:
            await trio.sleep(max(1.0, idle / 4))
            cutoff = trio.current_time() - idle
            while self.refused:
                flow, known = next(iter(self.refused.items()))
                if known.last_used > cutoff:
                    break
                self._end_refused(flow)

    # ----- UDP relays -----------------------------------------------------------------------

    def _relay_send(self, relay: _DatagramRelay, data: bytes, payload_len: int) -> None:
        relay.last_used = trio.current_time()
        relay.record.bytes_out += payload_len
        relay.record.datagrams_out += 1
        try:
            relay.sock.send(data)
        except OSError:
            pass  # a full socket buffer or an ICMP error: datagrams may drop, as a router would

    async def _relay(self, relay: _DatagramRelay) -> None:
        """Replies from the host back to the sandbox, until the flow has been idle too long."""
        sock = relay.sock
        ending = "open when tapbox stopped"
        try:
            while True:
                with trio.move_on_after(self.config.udp_idle_timeout) as scope:
                    await trio.lowlevel.wait_readable(sock)
                    if self.attributor is not None and relay.record.attributing:
                        await self.attributor.settled(relay.record)  # the sender awaits this
                    try:
                        data = sock.recv(65535)
                    except BlockingIOError:
                        continue
                    except ConnectionRefusedError:
                        relay.refused()
                        self._service()
                        continue
                    relay.last_used = trio.current_time()
                    relay.record.bytes_in += len(data)
                    relay.record.datagrams_in += 1
                    relay.deliver(data)
                    self._service()
                if scope.cancelled_caught and \
                        trio.current_time() - relay.last_used >= self.config.udp_idle_timeout:
                    break
            ending = "idle timeout"
        except OSError as exc:
            ending = f"host error: {exc.strerror or exc}"
        except EngineError:
            raise
        except Exception as exc:
            ending = self._internal_error(exc, relay.flow)
        finally:
            sock.close()
            self.udp.pop(relay.flow, None)
            self._end(relay.record, ending)


def _family(address: str) -> int:
    return pysocket.AF_INET6 if ":" in address else pysocket.AF_INET


def _reach(flow: ev.Flow) -> str:
    """Where the host socket goes: the address decided on, or a NAT64 form as written (the
    host's translator reaches the IPv4 address in it, RFC 6052)."""
    if flow.via and ipaddress.IPv6Address(flow.via).packed[:12] == NAT64_PREFIX:
        return flow.via
    return flow.dst


def _linger_zero(sock: trio.socket.SocketType) -> None:
    """Make close() send RST (SO_LINGER with a zero timeout)."""
    try:
        sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError as exc:
        if exc.errno != errno.EBADF:
            raise
