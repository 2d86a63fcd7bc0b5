"""DNS over TCP (RFC 7766) on the sandbox's DNS address, served by the engine's loop.

How this works: a connection to port 53 of the DNS address is accepted at once (nothing leaves
the machine for it). Its bytes are split into messages (tapbox.net.dns.TcpDnsFramer); each is
answered by the forwarder in a deferred task (it may ask upstream), and the length-prefixed
replies are queued on the connection as the stack takes them.
Answers may go out in another order than the queries came (RFC 7766 §6.2.1.1; clients match
them by id). At most `MAX_IN_FLIGHT` queries of one connection are answered at a time: beyond
that the stream is not read, so the window the stack advertises closes. Once the sandbox has
closed its side and every answer is out, we close ours.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from netstack import events as ev
from netstack.iface import Interface
from tapbox.net.dns import DnsForwarder, TcpDnsFramer
from tapbox.net.reactor import Reactor

MAX_IN_FLIGHT = 16
READ_CHUNK = 64 * 1024


class DnsStream:
    def __init__(self, flow: ev.Flow, stack: Interface, reactor: Reactor,
                 forwarder: DnsForwarder, finished: Callable[[DnsStream], None],
                 internal_error: Callable[[Exception, ev.Flow], str]) -> None:
        self.flow = flow
        self.stack = stack
        self.reactor = reactor
        self.forwarder = forwarder
        self.finished = finished
        self.internal_error = internal_error
        self.framer = TcpDnsFramer()
        self.out = bytearray()  # framed answers the stack has not taken yet
        self.waiting: deque[bytes] = deque()  # queries read, not yet being answered
        self.in_flight = 0
        self.done = False

    def on_readable(self) -> None:
        stack, flow, waiting = self.stack, self.flow, self.waiting
        while not self.done:
            while waiting and self.in_flight < MAX_IN_FLIGHT:
                self._answer(waiting.popleft())
            if waiting or self.in_flight >= MAX_IN_FLIGHT:
                break
            data = stack.tcp_recv(flow, READ_CHUNK)
            if not data:
                break
            waiting.extend(self.framer.feed(data))
        self._maybe_close()

    def _answer(self, query: bytes) -> None:
        self.in_flight += 1
        self.reactor.later(lambda: self.forwarder.answer(query, tcp=True), self._answered, self)

    def _answered(self, reply: bytes | None) -> None:
        self.in_flight -= 1
        self._queue(reply)
        self.on_readable()  # reading may have stopped at MAX_IN_FLIGHT

    def _queue(self, reply: bytes | None) -> None:
        if reply is None or self.done:
            return
        self.out += TcpDnsFramer.frame(reply)
        self.on_writable()

    def on_writable(self) -> None:
        if self.out and not self.done:
            taken = self.stack.tcp_send(self.flow, self.out, self.reactor.now())
            del self.out[:taken]
            self._maybe_close()

    def _maybe_close(self) -> None:
        if not self.done and not self.out and not self.in_flight and not self.waiting and \
                self.stack.tcp_at_eof(self.flow):
            self.stack.tcp_close(self.flow, self.reactor.now())

    def on_closed(self, reset: bool, reason: str) -> None:
        self.finish()

    def crashed(self, exc: Exception) -> None:
        self.internal_error(exc, self.flow)
        self.finish()

    def ready(self, mask: int) -> None:  # no fd of its own
        pass

    def finish(self) -> None:
        if not self.done:
            self.done = True
            self.out.clear()
            self.finished(self)
