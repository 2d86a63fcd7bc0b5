"""DNS over TCP (RFC 7766) on the sandbox's DNS address, served by the engine's loop.

How this works: a connection to port 53 of the DNS address is accepted at once (nothing leaves
the machine for it). Its bytes are split into messages (`TcpDnsFramer`); each is
answered by the forwarder, at once when it can (a cached answer, a denial), else by a
deferred task that asks upstream, and the length-prefixed replies are queued on the connection
as the stack takes them.
Answers may go out in another order than the queries came (RFC 7766 §6.2.1.1; clients match
them by id). At most `MAX_IN_FLIGHT` queries of one connection are answered at a time: beyond
that the stream is not read, so the window the stack advertises closes. Once the sandbox has
closed its side and every answer is out, we close ours.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from netstack import events as ev
from netstack.iface import Interface
from tapbox.net.reactor import Reactor

if TYPE_CHECKING:
    from tapbox.net.engine import Forwarder

MAX_IN_FLIGHT = 16
READ_CHUNK = 64 * 1024
TCP_MAX = 65535  # RFC 1035 §4.2.2: a 16-bit length, so at most 65535 bytes


class DnsStream:
    def __init__(self, flow: ev.Flow, stack: Interface, reactor: Reactor,
                 forwarder: Forwarder, finished: Callable[[DnsStream], None],
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
        reply = self.forwarder.answer_now(query, tcp=True)
        if reply is None or isinstance(reply, bytes):
            self._queue(reply)
            return
        pending = reply
        self.in_flight += 1
        self.reactor.later(lambda: self.forwarder.complete(pending), self._answered, self)

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

class TcpDnsFramer:
    """Splits a DNS-over-TCP byte stream into messages (RFC 1035 §4.2.2, RFC 7766 §8).

    Each message is preceded by a two-byte big-endian length, so no message exceeds 65535 bytes
    and the buffer never holds more than one partial message (65535 + 2 bytes) between calls.
    Zero-length frames carry no message and are skipped.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the messages they complete, in order."""
        self._buf += data
        out: list[bytes] = []
        pos = 0
        buf = self._buf
        while len(buf) - pos >= 2:
            (length,) = struct.unpack_from("!H", buf, pos)
            if len(buf) - pos - 2 < length:
                break
            if length:
                out.append(bytes(buf[pos + 2 : pos + 2 + length]))
            pos += 2 + length
        if pos:
            del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        """Bytes held for a message not yet complete."""
        return len(self._buf)

    @staticmethod
    def frame(message: bytes) -> bytes:
        """Prefix a message with its length; ValueError if it is longer than 65535 bytes."""
        if len(message) > TCP_MAX:
            raise ValueError(f"DNS message of {len(message)} bytes exceeds 65535")
        return struct.pack("!H", len(message)) + message
