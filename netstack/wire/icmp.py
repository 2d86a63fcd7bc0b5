"""ICMP for IPv4 (RFC 792): echo reply and destination-unreachable messages."""

from __future__ import annotations

import struct

from netstack.wire import checksum

HEADER_LEN = 8
TYPE_ECHO_REPLY = 0
TYPE_DEST_UNREACHABLE = 3
TYPE_ECHO_REQUEST = 8
TYPE_TIME_EXCEEDED = 11
CODE_NET_UNREACHABLE = 0
CODE_HOST_UNREACHABLE = 1
CODE_PORT_UNREACHABLE = 3
CODE_ADMIN_PROHIBITED = 13  # RFC 1812 §5.2.7.1

_HDR = struct.Struct("!BBHI")


def parse(data: bytes | memoryview) -> tuple[int, int, int] | None:
    """(type, code, rest-of-header word) if long enough and the checksum is right, else None."""
    if len(data) < HEADER_LEN or not checksum.verify(data):
        return None
    icmp_type, code, _csum, rest = _HDR.unpack_from(data, 0)
    return icmp_type, code, rest


def message(icmp_type: int, code: int, rest: int, body: bytes | memoryview) -> bytes:
    raw = bytearray(_HDR.pack(icmp_type, code, 0, rest))
    raw += body
    struct.pack_into("!H", raw, 2, checksum.checksum(raw))
    return bytes(raw)


def echo(icmp_type: int, ident: int, seq: int, payload: bytes | memoryview) -> bytes:
    return message(icmp_type, 0, (ident << 16) | seq, payload)


def echo_reply(request: bytes | memoryview) -> bytes:
    """The reply to a validated echo request: same identifier, sequence and data."""
    rest = struct.unpack_from("!I", request, 4)[0]
    return message(TYPE_ECHO_REPLY, 0, rest, request[HEADER_LEN:])


def unreachable(code: int, original_ip_packet: bytes | memoryview) -> bytes:
    """Destination unreachable quoting the IP header plus 8 bytes of the offending packet."""
    hlen = (original_ip_packet[0] & 0x0F) * 4
    return message(TYPE_DEST_UNREACHABLE, code, 0, bytes(original_ip_packet[: hlen + 8]))
