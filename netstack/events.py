"""Events the stack hands its caller: small frozen dataclasses (as h11's).

A `Flow` names one conversation as the sandbox sees it: `src`/`sport` are the sandbox's end,
`dst`/`dport` the destination it asked for. An IPv4 address the sandbox wrote in an IPv6 form
(IPv4-mapped, IPv4-compatible, NAT64: netstack.wire.ipv6.embedded_ipv4) is given as the IPv4
address in `dst`, so every check and decision sees one form; `via` keeps the form written,
which the stack's replies come from. The caller answers `TcpConnectRequest` with
`Interface.tcp_accept` or `Interface.tcp_reject`; the other events only inform.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Flow:
    proto: str  # "tcp" or "udp"
    src: str
    sport: int
    dst: str
    dport: int
    via: str = ""  # the IPv6 form the sandbox wrote `dst` in, if it did (else "")

    def __str__(self) -> str:
        if self.proto == "icmp":
            return f"icmp {self.dst}"
        host = f"[{self.dst}]" if ":" in self.dst else self.dst
        return f"{self.proto} {host}:{self.dport}"


@dataclass(frozen=True, slots=True)
class TcpConnectRequest:
    """A SYN for a new flow: the caller accepts (once the far end answered) or rejects it."""

    flow: Flow


@dataclass(frozen=True, slots=True)
class TcpReadable:
    """In-order data (or the end of the stream) waits in the connection's receive buffer."""

    flow: Flow


@dataclass(frozen=True, slots=True)
class TcpWritable:
    """The connection's send buffer has room again."""

    flow: Flow


@dataclass(frozen=True, slots=True)
class TcpClosed:
    """The connection is over for the caller: both sides closed, or reset (`reason` says which).

    Also sent for a pending SYN the stack gave up on before the caller answered it.
    """

    flow: Flow
    reset: bool
    reason: str


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    """One datagram from the sandbox. `quote` is the start of its IP packet, for an ICMP error."""

    flow: Flow
    payload: bytes
    quote: bytes


@dataclass(frozen=True, slots=True)
class IcmpEchoRequest:
    """A ping from the sandbox to a remote address (ICMP or ICMPv6; `flow.proto` is "icmp",
    `flow.sport` the echo identifier). Answer with `icmp_echo_reply` or `icmp_unreachable`."""

    flow: Flow
    ident: int
    seq: int
    payload: bytes


Event = TcpConnectRequest | TcpReadable | TcpWritable | TcpClosed | UdpDatagram | IcmpEchoRequest
