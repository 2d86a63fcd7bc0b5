"""ARP for IPv4 over Ethernet (RFC 826): parse requests, build replies."""

from __future__ import annotations

import struct
from dataclasses import dataclass

PACKET_LEN = 28
OP_REQUEST = 1
OP_REPLY = 2
_HW_ETHERNET = 1
_PROTO_IPV4 = 0x0800

_PKT = struct.Struct("!HHBBH6s4s6s4s")


@dataclass(frozen=True, slots=True)
class ArpPacket:
    op: int
    sender_mac: bytes
    sender_ip: bytes
    target_mac: bytes
    target_ip: bytes


def parse(data: bytes | memoryview) -> ArpPacket | None:
    """The packet if it is Ethernet/IPv4 ARP of the right size, else None."""
    if len(data) < PACKET_LEN:
        return None
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _PKT.unpack_from(data, 0)
    if htype != _HW_ETHERNET or ptype != _PROTO_IPV4 or hlen != 6 or plen != 4:
        return None
    return ArpPacket(op, sha, spa, tha, tpa)


def build(op: int, sender_mac: bytes, sender_ip: bytes, target_mac: bytes,
          target_ip: bytes) -> bytes:
    return _PKT.pack(_HW_ETHERNET, _PROTO_IPV4, 6, 4, op, sender_mac, sender_ip, target_mac,
                     target_ip)
