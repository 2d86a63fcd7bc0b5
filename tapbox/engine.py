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
  unreachable. Datagrams to the DNS address go to `tapbox.dns` instead.
Addresses inside the sandbox's own network are never proxied (only DNS there is served).
"""

from __future__ import annotations

import errno
import ipaddress
import math
import os
import socket as pysocket
import struct
from dataclasses import dataclass, field

import trio

from netstack import events as ev
from netstack.iface import Interface, InterfaceConfig
from tapbox.audit import Audit
from tapbox.dns import DnsForwarder, TcpDnsFramer
from tapbox.policy import SANDBOX_NET4, Policy

READ_BATCH = 256  # frames per wake-up before yielding to other tasks
PUMP_CHUNK = 256 * 1024


@dataclass
class EngineConfig:
    interface: InterfaceConfig = field(default_factory=InterfaceConfig)
    connect_timeout: float = 15.0
    udp_idle_timeout: float = 60.0
    max_udp_flows: int = 1024


class EngineError(Exception):
    """The engine cannot go on (the TAP device failed)."""


class _TcpProxy:
    """Per-connection state shared by the dispatcher and the two pump tasks."""

    def __init__(self, flow: ev.Flow) -> None:
        self.flow = flow
        self.readable = trio.Event()
        self.writable = trio.Event()
        self.closed = False
        self.reset = False
        self.cancel = trio.CancelScope()
        self.sock: trio.socket.SocketType | None = None

    def wake(self) -> None:
        self.readable.set()
        self.writable.set()


class _UdpRelay:
    """One UDP flow: a connected, non-blocking host socket (sends never wait: UDP may drop)."""

    def __init__(self, flow: ev.Flow, sock: pysocket.socket, quote: bytes) -> None:
        self.flow = flow
        self.sock = sock
        self.quote = quote
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
        self.dns_ip = self.config.interface.dns_ip
        self.tcp: dict[ev.Flow, _TcpProxy] = {}
        self.udp: dict[ev.Flow, _UdpRelay] = {}
        self.frames_dropped = 0
        self._nursery: trio.Nursery | None = None
        self._timer_scope: trio.CancelScope | None = None

    # ----- main loop ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the sandbox until cancelled; reports started once frames are being read."""
        os.set_blocking(self.tap_fd, False)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._timer_loop)
            task_status.started()
            await self._read_loop()

    async def _read_loop(self) -> None:
        fd = self.tap_fd
        bufsize = self.config.interface.mtu + 64
        receive = self.stack.receive
        while True:
            await trio.lowlevel.wait_readable(fd)
            now = trio.current_time()
            for _ in range(READ_BATCH):
                try:
                    frame = os.read(fd, bufsize)
                except BlockingIOError:
                    break
                except OSError as exc:
                    raise EngineError(f"reading the TAP device failed: {exc}") from exc
                if not frame:
                    raise EngineError("the TAP device was closed")
                receive(frame, now)
            self._service()
            await trio.lowlevel.checkpoint()

    async def _timer_loop(self) -> None:
        while True:
            with trio.CancelScope() as scope:
                self._timer_scope = scope
                self._set_timer()
                await trio.sleep_forever()
            self._timer_scope = None
            self.stack.poll(trio.current_time())
            self._service()

    def _set_timer(self) -> None:
        if self._timer_scope is not None:
            at = self.stack.poll_at()
            self._timer_scope.deadline = math.inf if at is None else at

    def _service(self) -> None:
        """Answer the stack's events and flush its frames to the TAP device."""
        stack = self.stack
        while True:
            events = stack.take_events()
            for event in events:
                self._dispatch(event)
            frames = stack.take_frames()
            if not frames and not events:
                break
            for frame in frames:
                try:
                    os.write(self.tap_fd, frame)
                except BlockingIOError:
                    self.frames_dropped += 1  # TCP recovers; a full TAP queue is congestion
                except OSError as exc:
                    raise EngineError(f"writing to the TAP device failed: {exc}") from exc
        self._set_timer()

    # ----- events ---------------------------------------------------------------------------

    def _dispatch(self, event: ev.Event) -> None:
        if isinstance(event, ev.TcpReadable):
            proxy = self.tcp.get(event.flow)
            if proxy:
                proxy.readable.set()
        elif isinstance(event, ev.TcpWritable):
            proxy = self.tcp.get(event.flow)
            if proxy:
                proxy.writable.set()
        elif isinstance(event, ev.TcpClosed):
            proxy = self.tcp.get(event.flow)
            if proxy:
                proxy.closed = True
                proxy.reset = event.reset
                if event.reset:
                    proxy.cancel.cancel()
                proxy.wake()
        elif isinstance(event, ev.UdpDatagram):
            self._on_udp(event)
        elif isinstance(event, ev.TcpConnectRequest):
            self._on_connect(event.flow)

    def _spawn(self, fn, *args) -> None:  # type: ignore[no-untyped-def]
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    def _on_connect(self, flow: ev.Flow) -> None:
        if flow.dst == self.dns_ip and flow.dport == 53:
            proxy = _TcpProxy(flow)
            self.tcp[flow] = proxy
            self.stack.tcp_accept(flow, trio.current_time())
            self._spawn(self._serve_dns_tcp, proxy)
            return
        allowed, reason = self._decide(flow)
        if not allowed:
            self.stack.tcp_reject(flow)
            self.audit.flow_denied(flow, reason)
            return
        self.audit.flow_allowed(flow, reason)
        proxy = _TcpProxy(flow)
        self.tcp[flow] = proxy
        self._spawn(self._proxy_tcp, proxy)

    def _decide(self, flow: ev.Flow) -> tuple[bool, str]:
        if ipaddress.ip_address(flow.dst) in SANDBOX_NET4:
            return False, "the sandbox's own network is not proxied"
        decision = self.policy.decide(flow.dst, flow.dport, trio.current_time())
        return decision.allowed, decision.reason

    # ----- TCP ------------------------------------------------------------------------------

    async def _proxy_tcp(self, proxy: _TcpProxy) -> None:
        flow = proxy.flow
        sock = trio.socket.socket(pysocket.AF_INET, pysocket.SOCK_STREAM)
        proxy.sock = sock
        try:
            error = await self._connect(sock, flow)
            if error is not None:
                self.stack.tcp_reject(flow)
                self.audit.upstream_failed(flow, error)
                self._service()
                return
            sock.setsockopt(pysocket.IPPROTO_TCP, pysocket.TCP_NODELAY, 1)
            if not self.stack.tcp_accept(flow, trio.current_time()):
                return  # the SYN was given up on meanwhile
            self._service()
            with proxy.cancel:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump_to_host, proxy, sock)
                    nursery.start_soon(self._pump_to_sandbox, proxy, sock)
            if proxy.reset:
                _linger_zero(sock)  # the sandbox reset: reset the host side too
        except OSError as exc:  # the host side reset or failed: reset the sandbox side
            self.audit.upstream_failed(flow, str(exc))
            self.stack.tcp_abort(flow, "host side failed")
            self._service()
        finally:
            sock.close()
            self.tcp.pop(flow, None)

    async def _connect(self, sock: trio.socket.SocketType, flow: ev.Flow) -> str | None:
        with trio.move_on_after(self.config.connect_timeout):
            try:
                await sock.connect((flow.dst, flow.dport))
                return None
            except OSError as exc:
                return os.strerror(exc.errno) if exc.errno else str(exc)
        return "timed out"

    async def _pump_to_host(self, proxy: _TcpProxy, sock: trio.socket.SocketType) -> None:
        """Sandbox -> host: take data from the stack only as fast as the host socket takes it."""
        flow, stack = proxy.flow, self.stack
        while True:
            proxy.readable = trio.Event()
            data = stack.tcp_recv(flow, PUMP_CHUNK)
            if data:
                self._service()  # a window update may be due
                view = memoryview(data)
                while view:
                    sent = await sock.send(view)
                    view = view[sent:]
                continue
            if stack.tcp_at_eof(flow):
                if not proxy.reset:
                    try:
                        sock.shutdown(pysocket.SHUT_WR)
                    except OSError:
                        pass
                return
            await proxy.readable.wait()

    async def _pump_to_sandbox(self, proxy: _TcpProxy, sock: trio.socket.SocketType) -> None:
        """Host -> sandbox: read from the host only while the stack has room to queue it."""
        flow, stack = proxy.flow, self.stack
        while True:
            proxy.writable = trio.Event()
            space = stack.tcp_send_space(flow)
            if space == 0:
                if proxy.closed or stack.connection(flow) is None:
                    return
                await proxy.writable.wait()
                continue
            data = await sock.recv(min(space, PUMP_CHUNK))
            if not data:
                stack.tcp_close(flow, trio.current_time())
                self._service()
                return
            stack.tcp_send(flow, data, trio.current_time())
            self._service()

    # ----- DNS ------------------------------------------------------------------------------

    async def _serve_dns_tcp(self, proxy: _TcpProxy) -> None:
        """DNS over TCP (RFC 7766) on the DNS address: framed queries in, framed answers out."""
        flow, stack = proxy.flow, self.stack
        framer = TcpDnsFramer()
        try:
            with proxy.cancel:
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
        finally:
            self.tcp.pop(flow, None)

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
        reply = await self.forwarder.answer(datagram.payload)
        if reply is not None:
            self.stack.udp_send(datagram.flow, reply)
            self._service()

    # ----- UDP ------------------------------------------------------------------------------

    def _on_udp(self, datagram: ev.UdpDatagram) -> None:
        flow = datagram.flow
        if flow.dst == self.dns_ip and flow.dport == 53:
            self._spawn(self._answer_dns_udp, datagram)
            return
        relay = self.udp.get(flow)
        if relay is None:
            allowed, reason = self._decide(flow)
            if not allowed or len(self.udp) >= self.config.max_udp_flows:
                if allowed:
                    reason = "too many UDP flows"
                self.stack.udp_unreachable(datagram)
                self.audit.flow_denied(flow, reason)
                return
            self.audit.flow_allowed(flow, reason)
            sock = pysocket.socket(pysocket.AF_INET, pysocket.SOCK_DGRAM)
            sock.setblocking(False)
            relay = _UdpRelay(flow, sock, datagram.quote)
            self.udp[flow] = relay
            try:
                sock.connect((flow.dst, flow.dport))
            except OSError as exc:
                sock.close()
                del self.udp[flow]
                self.stack.udp_unreachable(datagram)
                self.audit.upstream_failed(flow, str(exc))
                return
            self._spawn(self._relay_udp, relay)
        relay.quote = datagram.quote
        relay.last_used = trio.current_time()
        try:
            relay.sock.send(datagram.payload)
        except OSError:
            pass  # a full socket buffer or an ICMP error: UDP may drop, as a router would

    async def _relay_udp(self, relay: _UdpRelay) -> None:
        flow, sock = relay.flow, relay.sock
        try:
            while True:
                with trio.move_on_after(self.config.udp_idle_timeout) as scope:
                    await trio.lowlevel.wait_readable(sock)
                    try:
                        data = sock.recv(65535)
                    except BlockingIOError:
                        continue
                    except ConnectionRefusedError:
                        self.stack.udp_unreachable(ev.UdpDatagram(flow, b"", relay.quote))
                        self._service()
                        continue
                    relay.last_used = trio.current_time()
                    self.stack.udp_send(flow, data)
                    self._service()
                if scope.cancelled_caught and \
                        trio.current_time() - relay.last_used >= self.config.udp_idle_timeout:
                    return
        except OSError as exc:
            self.audit.upstream_failed(flow, str(exc))
        finally:
            sock.close()
            self.udp.pop(flow, None)


def _linger_zero(sock: trio.socket.SocketType) -> None:
    """Make close() send RST (SO_LINGER with a zero timeout)."""
    try:
        sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError as exc:
        if exc.errno != errno.EBADF:
            raise
