"""UDP header (RFC 768): checked parsing and emission with the IPv4 pseudo-header checksum."""

from __future__ import annotations

import struct

from netstack.wire import checksum

HEADER_LEN = 8
_HDR = struct.Struct("!HHHH")


def parse(data: bytes | memoryview, pseudo_sum: int, zero_checksum_ok: bool = True,
          verify: bool = True) -> tuple[int, int, memoryview] | str:
    """(src_port, dst_port, payload) or a drop reason. `pseudo_sum` covers the pseudo-header.

    `zero_checksum_ok` is False for IPv6, where the checksum is mandatory (RFC 8200 §8.1).
    """
    if len(data) < HEADER_LEN:
        return "udp-truncated"
    sport, dport, length, csum = _HDR.unpack_from(data, 0)
    if length < HEADER_LEN or length > len(data):
        return "udp-bad-length"
    view = memoryview(data)[:length]
    # RFC 768: an all-zero checksum field means the sender computed none (IPv4 only).
    if not csum and not zero_checksum_ok:
        return "udp-zero-checksum"
    if csum and verify and (pseudo_sum + checksum.ones_sum(view)) % 0xFFFF != 0:
        return "udp-bad-checksum"
    return sport, dport, view[HEADER_LEN:]


def datagram(sport: int, dport: int, payload: bytes | memoryview, pseudo_sum: int) -> bytes:
    """A UDP datagram; `pseudo_sum` is `checksum.pseudo_header_sum(..., 8 + len(payload))`."""
    raw = bytearray(_HDR.pack(sport, dport, HEADER_LEN + len(payload), 0))
    raw += payload
    csum = checksum.finish(pseudo_sum + checksum.ones_sum(raw))
    struct.pack_into("!H", raw, 6, csum or 0xFFFF)  # RFC 768: a computed 0 is sent as all ones
    return bytes(raw)
