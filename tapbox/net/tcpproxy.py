"""One proxied TCP flow: the sandbox's connection in the stack joined to a host socket.

How this works: the proxy is driven by the engine's loop (tapbox.net.reactor), never by a task
of its own. It opens a non-blocking host socket and connects; the sandbox's SYN waits in the
stack meanwhile. When the connect completes (the socket turns writable) the SYN is accepted,
and SYN-ACK goes out; if it fails or takes longer than the timeout, the SYN is answered with
RST. (With --log, the flow's process is found first: the refusal or the SYN-ACK lets the
sandbox's socket go, and the trace with it.)

Then two pumps, both run from the loop:
- sandbox -> host (`to_host`, on the stack's "readable" event): data is taken from the stack
  only as fast as the host socket takes it, so the window the stack advertises closes when
  the host is slow; when the socket is full the rest waits in `pending` and the socket is
  watched for writability. The sandbox's end of stream becomes shutdown(SHUT_WR).
- host -> sandbox (`from_host`, when the socket is readable): read only while the stack's send
  buffer has room (the socket is not watched while it has none: the stack's "writable" event
  brings it back), and the host's end of stream becomes our FIN.
The flow is over when both ends have finished, when either side resets, or when the host
socket fails; `finished(proxy, ending)` then tells the engine how it ended. What the stack
knows (the connection's state, its buffers) is asked of the stack, not mirrored here.
"""

from __future__ import annotations

import errno
import os
import socket as pysocket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from netstack import events as ev
from netstack.iface import Interface
from netstack.tcp import TcpConnection
from tapbox.flows import FlowRecord
from tapbox.net.reactor import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP, Reactor, Timer

if TYPE_CHECKING:
    from tapbox.attribution import Attributor

PUMP_CHUNK = 256 * 1024

CONNECTING, SETTLING, OPEN, DONE = range(4)


class TcpProxy:
    def __init__(self, flow: ev.Flow, record: FlowRecord, address: tuple[str, int],
                 stack: Interface, reactor: Reactor, attributor: Attributor | None,
                 connect_timeout: float, finished: Callable[[TcpProxy, str], None],
                 internal_error: Callable[[Exception, ev.Flow], str]) -> None:
        self.flow = flow
        self.record = record
        self.address = address
        self.stack = stack
        self.reactor = reactor
        self.attributor = attributor
        self.connect_timeout = connect_timeout
        self.finished = finished
        self.internal_error = internal_error
        self.state = CONNECTING
        self.sock: pysocket.socket | None = None
        self.fd = -1
        self.timer: Timer | None = None
        # The stack's connection, once accepted: the pumps use it directly (the flow's handle,
        # as a socket is a program's), instead of looking it up by flow for every call.
        self.conn: TcpConnection | None = None
        self.pending = memoryview(b"")  # taken from the stack, not yet taken by the host socket
        self.shut_wr = False  # the sandbox's end of stream was passed on to the host
        self.host_eof = False  # the host's end of stream was passed on to the sandbox

    # ----- connecting -------------------------------------------------------------------------

    def start(self) -> None:
        """Open the host socket and start connecting (OSError: it cannot even be opened)."""
        family = pysocket.AF_INET6 if ":" in self.address[0] else pysocket.AF_INET
        sock = pysocket.socket(family, pysocket.SOCK_STREAM)  # EMFILE...
        sock.setblocking(False)
        self.sock, self.fd = sock, sock.fileno()
        code = sock.connect_ex(self.address)
        if code == errno.EINPROGRESS:
            self.reactor.watch(self.fd, EPOLLOUT, self.ready, self)
            self.timer = self.reactor.call_at(self.reactor.now() + self.connect_timeout,
                                              self._timed_out, self)
        else:
            self.reactor.watch(self.fd, 0, self.ready, self)
            self._connected(code)

    def _timed_out(self) -> None:
        if self.state == CONNECTING:
            self._connected(None)

    def _connected(self, code: int | None) -> None:
        """The connect is over: `code` 0 (connected), an errno, or None (timed out)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.state = SETTLING
        self.reactor.interest(self.fd, 0)
        error = None if code == 0 else _connect_error(code)
        if self.attributor is not None:
            # The process waits in connect() until its SYN is answered: find it first.
            record = self.record
            self.reactor.later(lambda: self.attributor.settled(record),  # type: ignore[union-attr]
                               lambda _: self._answer_syn(error), self)
        else:
            self._answer_syn(error)

    def _answer_syn(self, error: str | None) -> None:
        if self.state != SETTLING:
            return  # ended meanwhile (the sandbox gave up, tapbox stops)
        if error is not None:
            self.stack.tcp_reject(self.flow)
            self.finish(error)
            return
        assert self.sock is not None
        self.sock.setsockopt(pysocket.IPPROTO_TCP, pysocket.TCP_NODELAY, 1)
        if not self.stack.tcp_accept(self.flow, self.reactor.now()):
            self.finish("given up by the sandbox")
            return
        self.conn = self.stack.connection(self.flow)
        self.state = OPEN
        self._watch()

    # ----- readiness and stack events -----------------------------------------------------------

    def ready(self, mask: int) -> None:
        if self.state == CONNECTING:
            assert self.sock is not None
            self._connected(self.sock.getsockopt(pysocket.SOL_SOCKET, pysocket.SO_ERROR))
            return
        if self.state != OPEN:
            return
        if self.pending and mask & (EPOLLOUT | EPOLLERR | EPOLLHUP):
            self.to_host()
        if self.state == OPEN and mask & (EPOLLIN | EPOLLERR | EPOLLHUP):
            self.from_host(mask)

    def on_readable(self) -> None:
        if self.state == OPEN:
            self.to_host()

    def on_writable(self) -> None:
        if self.state == OPEN:
            self._watch()

    def on_closed(self, reset: bool, reason: str) -> None:
        """The stack is done with the sandbox's side (both ends closed, or reset)."""
        if reset:
            if self.state == OPEN and self.sock is not None:
                _linger_zero(self.sock)  # the sandbox reset: reset the host side too
            self.finish(reason or "reset")
        elif self.state == OPEN and self.host_eof:
            self.finish("closed")

    def crashed(self, exc: Exception) -> None:
        self.finish(self.internal_error(exc, self.flow))

    # ----- the pumps --------------------------------------------------------------------------

    def to_host(self) -> None:
        """Sandbox -> host: as much as the host socket takes now."""
        sock, conn = self.sock, self.conn
        assert sock is not None and conn is not None
        while True:
            if not self.pending:
                data = conn.recv(PUMP_CHUNK)
                if not data:
                    if not self.shut_wr and conn.at_eof:
                        self.shut_wr = True
                        try:
                            sock.shutdown(pysocket.SHUT_WR)
                        except OSError:
                            pass
                    break
                self.pending = memoryview(data)
                self.record.bytes_out += len(data)
            try:
                sent = sock.send(self.pending)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._host_failed(exc)
                return
            self.pending = self.pending[sent:]
            if self.pending:
                break
        if self.shut_wr and self.host_eof and not self.pending:
            self.finish("closed")
            return
        self._watch()

    def from_host(self, mask: int = 0) -> None:
        """Host -> sandbox: one read, as much as the stack has room for. When the host has
        shut its side down (EPOLLRDHUP) and the read emptied the socket, the FIN goes with
        the data (a request/response server's answer and its close: one frame)."""
        sock, conn = self.sock, self.conn
        assert sock is not None and conn is not None
        space = conn.send_space
        if space == 0 or self.host_eof:
            if self.stack.connection(self.flow) is not conn:  # the stack is done with it
                self.finish("closed")
            else:
                self._watch()
            return
        wanted = min(space, PUMP_CHUNK)
        try:
            data = sock.recv(wanted)
        except BlockingIOError:
            return
        except OSError as exc:
            self._host_failed(exc)
            return
        now = self.reactor.now()
        if not data:
            self.host_eof = True
            conn.close(now)
            if self.shut_wr and not self.pending:
                self.finish("closed")
                return
            self._watch()
            return
        last = bool(mask & EPOLLRDHUP) and len(data) < wanted
        conn.send(data, now, last)
        self.record.bytes_in += len(data)
        if last:
            self.host_eof = True
            if self.shut_wr and not self.pending:
                self.finish("closed")
                return
            self._watch()
        elif len(data) == space:
            self._watch()

    def _watch(self) -> None:
        """Wait on the host socket for what the pumps need now."""
        mask = EPOLLOUT if self.pending else 0
        if not self.host_eof and self.conn is not None and self.conn.send_space > 0:
            mask |= EPOLLIN | EPOLLRDHUP
        self.reactor.interest(self.fd, mask)

    def _host_failed(self, exc: OSError) -> None:
        """The host side failed: reset the sandbox side."""
        if not self.stack.tcp_reject(self.flow):
            self.stack.tcp_abort(self.flow, "host side failed")
        self.finish("reset by host" if isinstance(exc, (ConnectionResetError, BrokenPipeError))
                    else f"host error: {os.strerror(exc.errno) if exc.errno else exc}")

    # ----- the end ----------------------------------------------------------------------------

    def finish(self, ending: str) -> None:
        if self.state == DONE:
            return
        self.state = DONE
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.sock is not None:
            self.reactor.forget(self.fd)
            self.sock.close()
        self.finished(self, ending)



def _connect_error(code: int | None) -> str:
    if code is None or code == errno.EINPROGRESS:
        return "connect timeout"
    if code == errno.ECONNREFUSED:
        return "refused upstream"
    return f"unreachable upstream: {os.strerror(code)}"


def _linger_zero(sock: pysocket.socket) -> None:
    """Make close() send RST (SO_LINGER with a zero timeout)."""
    try:
        sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError as exc:
        if exc.errno != errno.EBADF:
            raise
