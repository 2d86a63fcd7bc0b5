"""The engine's datagram relay, one level down: an engine on a socketpair instead of a TAP
device, with the fake internet behind it (a UDP port nothing listens on answers "port
unreachable").
"""

from __future__ import annotations

import io
import socket

import trio
from fakenet import FakeNet
from netstack_helpers import ip_frame
from scapy.layers.inet import ICMP, UDP, IPerror, UDPerror
from scapy.layers.l2 import Ether

from tapbox.allowlist import Allowlist, IPAddress
from tapbox.audit import Audit
from tapbox.net.dns import DnsForwarder
from tapbox.net.engine import Engine
from tapbox.policy import Decision, Policy


class _AdmitAll(Policy):
    """Admits every flow (the guard is not what this test is about)."""

    def decide(self, ip: str | IPAddress, port: int, now: float) -> Decision:
        return Decision(True, None, None, "test")


CLOSED_UDP = ("192.0.2.10", 9)  # a fake-internet server's address; nothing listens on UDP 9


def test_icmp_error_for_a_refused_udp_flow_quotes_the_latest_datagram(fakenet: FakeNet) -> None:
    """The host answers each datagram of one flow with "port unreachable": the ICMP error the
    sandbox gets quotes the datagram it is about (the latest), not the flow's first one."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    policy = _AdmitAll(Allowlist([]))
    engine = Engine(ours.fileno(), policy, DnsForwarder(policy, []), Audit(stream=io.StringIO()))

    def datagram(ident: int, payload: bytes) -> bytes:
        return ip_frame(UDP(sport=40000, dport=CLOSED_UDP[1]) / payload, dst=CLOSED_UDP[0],
                        id=ident)

    def quoted() -> tuple[int, int]:
        """(IP id, UDP length) of the datagram the next ICMP error quotes (RFC 792: the IP
        header and the first 8 bytes of the datagram)."""
        theirs.settimeout(5)
        while True:
            frame = Ether(theirs.recv(65536))
            if ICMP in frame:
                icmp = frame[ICMP]
                assert (icmp.type, icmp.code) == (3, 3), frame.summary()
                return frame[IPerror].id, frame[UDPerror].len

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            for ident, payload in ((101, b"first"), (202, b"the second"), (303, b"third!")):
                theirs.send(datagram(ident, payload))
                assert await trio.to_thread.run_sync(quoted) == (ident, 8 + len(payload))
            nursery.cancel_scope.cancel()

    trio.run(main)
    ours.close()
    theirs.close()
