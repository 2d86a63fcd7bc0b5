"""Datagram flows: UDP and ICMP echo, relayed through connected host sockets.

How this works: an allowed datagram flow gets one connected, non-blocking host socket
(`DatagramRelay`); the sandbox's datagrams are sent on it as they come (a send never waits:
datagrams may drop, as at a router), and the engine's loop reads the replies and hands each to
`deliver` (into the stack). An ICMP error the host gets back for the flow (ECONNREFUSED on a
connected socket) is passed on to the sandbox by `refused(latest)`, where `latest` is the
flow's most recent datagram: the error is about that one, and quotes it. A relay ends after
`idle` seconds without a datagram either way. With --log, replies wait until the flow's
process is found (the sender is still waiting for them then).

A denied datagram flow is remembered while the sandbox keeps sending on it (`RefusedFlows`):
its further datagrams are refused and counted on the same record, so a loop sending to one
denied destination is one flow, reported once. It ends after the same idle time, when the table
is full (the least recently used first), or when a new decision would differ (the engine asks).
"""

from __future__ import annotations

import socket as pysocket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from netstack import events as ev
from tapbox.flows import FlowRecord
from tapbox.net.reactor import EPOLLIN, Reactor, Timer

RECV_BATCH = 64  # replies read per wake-up, at most
DatagramEvent = ev.UdpDatagram | ev.IcmpEchoRequest


class DatagramRelay:
    def __init__(self, flow: ev.Flow, sock: pysocket.socket, record: FlowRecord,
                 latest: DatagramEvent, deliver: Callable[[bytes], None],
                 refused: Callable[[DatagramEvent], None], reactor: Reactor, idle: float,
                 finished: Callable[[DatagramRelay, str], None],
                 internal_error: Callable[[Exception, ev.Flow], str]) -> None:
        self.flow = flow
        self.sock = sock
        self.fd = sock.fileno()
        self.record = record
        self.latest = latest
        self.deliver = deliver
        self.refused = refused
        self.reactor = reactor
        self.idle = idle
        self.finished = finished
        self.internal_error = internal_error
        self.last_used = reactor.now()
        self.done = False
        self.timer: Timer = reactor.call_at(self.last_used + idle, self._idle_check, self)
        reactor.watch(self.fd, 0, self.ready, self)

    def start(self, attributor_settled: Callable[[], object] | None) -> None:
        """Start reading replies: now, or once the flow's process is found."""
        if attributor_settled is None:
            self.reactor.interest(self.fd, EPOLLIN)
        else:
            self.reactor.later(attributor_settled, self._settled, self)  # type: ignore[arg-type]

    def _settled(self, _: object) -> None:
        if not self.done:
            self.reactor.interest(self.fd, EPOLLIN)

    def send(self, datagram: DatagramEvent, data: bytes, payload_len: int) -> None:
        self.latest = datagram
        self.last_used = self.reactor.now()
        self.record.bytes_out += payload_len
        self.record.datagrams_out += 1
        try:
            self.sock.send(data)
        except OSError:
            pass  # a full socket buffer or an ICMP error: datagrams may drop, as a router would

    def ready(self, mask: int) -> None:
        for _ in range(RECV_BATCH):
            try:
                data = self.sock.recv(65535)
            except BlockingIOError:
                return
            except ConnectionRefusedError:
                self.refused(self.latest)
                continue
            except OSError as exc:
                self.finish(f"host error: {exc.strerror or exc}")
                return
            self.last_used = self.reactor.now()
            self.record.bytes_in += len(data)
            self.record.datagrams_in += 1
            self.deliver(data)

    def _idle_check(self) -> None:
        due = self.last_used + self.idle
        if self.reactor.now() >= due:
            self.finish("idle timeout")
        else:
            self.timer = self.reactor.call_at(due, self._idle_check, self)

    def crashed(self, exc: Exception) -> None:
        self.finish(self.internal_error(exc, self.flow))

    def finish(self, ending: str) -> None:
        if self.done:
            return
        self.done = True
        self.timer.cancel()
        self.reactor.forget(self.fd)
        self.sock.close()
        self.finished(self, ending)


@dataclass
class Refused:
    """A denied datagram flow, remembered while the sandbox keeps sending on it."""

    record: FlowRecord
    last_used: float
    last_wall: float


class RefusedFlows:
    """Denied datagram flows, least recently used first, at most `limit`."""

    def __init__(self, limit: int, idle: float, ended: Callable[[FlowRecord], None]) -> None:
        self.limit = limit
        self.idle = idle
        self.ended = ended
        self.flows: OrderedDict[ev.Flow, Refused] = OrderedDict()

    def __len__(self) -> int:
        return len(self.flows)

    def get(self, flow: ev.Flow) -> Refused | None:
        return self.flows.get(flow)

    def used(self, flow: ev.Flow, now: float) -> Refused:
        """Count one more datagram of a remembered flow."""
        known = self.flows[flow]
        self.flows.move_to_end(flow)
        known.record.datagrams_out += 1
        known.last_used, known.last_wall = now, time.time()
        return known

    def remember(self, record: FlowRecord, now: float) -> None:
        self.flows[record.flow] = Refused(record, now, time.time())
        while len(self.flows) > self.limit:
            self.end(next(iter(self.flows)))

    def end(self, flow: ev.Flow) -> None:
        known = self.flows.pop(flow)
        record = known.record
        if record.ended is None:
            record.ended = known.last_wall  # the flow was last active then
            record.ending = "denied"
            self.ended(record)

    def expire(self, now: float) -> None:
        """End the flows the sandbox has stopped sending on."""
        cutoff = now - self.idle
        while self.flows:
            flow, known = next(iter(self.flows.items()))
            if known.last_used > cutoff:
                break
            self.end(flow)

    def end_all(self) -> None:
        while self.flows:
            self.end(next(iter(self.flows)))
