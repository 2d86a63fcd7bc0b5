"""Events the stack hands its caller: small frozen dataclasses (as h11's).

A `Flow` names one conversation as the sandbox sees it: `src`/`sport` are the sandbox's end,
`dst`/`dport` the destination it asked for. The caller answers `TcpConnectRequest` with
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

    def __str__(self) -> str:
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
    """The connection is over for the caller: both sides closed, or reset (`reason` says which)."""

    flow: Flow
    reset: bool
    reason: str


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    """One datagram from the sandbox. `quote` is the start of its IP packet, for an ICMP error."""

    flow: Flow
    payload: bytes
    quote: bytes


Event = TcpConnectRequest | TcpReadable | TcpWritable | TcpClosed | UdpDatagram
