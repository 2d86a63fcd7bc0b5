"""IPv4 header (RFC 791 §3.1): checked parsing and emission of 20-byte headers.

Parsing validates version, header length, total length against the buffer and the header
checksum before the caller may trust any field. We never emit options.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from netstack.wire import checksum

MIN_HEADER_LEN = 20
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
FLAG_DF = 0x4000
FLAG_MF = 0x2000
OFFSET_MASK = 0x1FFF
DEFAULT_TTL = 64

_HDR = struct.Struct("!BBHHHBBH4s4s")
_CSUM = struct.Struct("!H")


@dataclass(frozen=True, slots=True)
class Ipv4Header:
    header_len: int
    total_len: int
    ident: int
    flags_offset: int
    ttl: int
    proto: int
    src: bytes
    dst: bytes

    @property
    def is_fragment(self) -> bool:
        return bool(self.flags_offset & (FLAG_MF | OFFSET_MASK))


def parse(pkt: bytes | memoryview) -> Ipv4Header | str:
    """The header, or a short reason string naming why the packet must be dropped."""
    if len(pkt) < MIN_HEADER_LEN:
        return "ipv4-truncated"
    vihl, _tos, total, ident, frag, ttl, proto, _csum, src, dst = _HDR.unpack_from(pkt, 0)
    if vihl >> 4 != 4:
        return "ipv4-bad-version"
    hlen = (vihl & 0x0F) * 4
    if hlen < MIN_HEADER_LEN or total < hlen or total > len(pkt):
        return "ipv4-bad-length"
    # RFC 1071 (checksum.verify, inlined): the header, its checksum included, sums to 0xFFFF.
    value = int.from_bytes(pkt[:hlen], "big")
    if not value or value % 0xFFFF:
        return "ipv4-bad-checksum"
    return Ipv4Header(hlen, total, ident, frag, ttl, proto, src, dst)


def header_into(buf: bytearray, off: int, src: bytes, dst: bytes, proto: int,
                payload_len: int, ident: int, ttl: int = DEFAULT_TTL) -> None:
    """`header`, written at buf[off:off + 20] (no intermediate bytes object)."""
    _HDR.pack_into(buf, off, 0x45, 0, MIN_HEADER_LEN + payload_len, ident & 0xFFFF, FLAG_DF,
                   ttl, proto, 0, src, dst)
    # RFC 1071 over the 20 bytes (checksum.finish(checksum.ones_sum(...)), inlined: a header
    # is never all zeros, so the folded sum 0 stands for 0xFFFF and both give 0).
    folded = int.from_bytes(buf[off:off + MIN_HEADER_LEN], "big") % 0xFFFF
    _CSUM.pack_into(buf, off + 10, ~folded & 0xFFFF if folded else 0)


def header(src: bytes, dst: bytes, proto: int, payload_len: int, ident: int,
           ttl: int = DEFAULT_TTL) -> bytes:
    """A 20-byte header with DF set and the header checksum filled in."""
    raw = bytearray(_HDR.pack(0x45, 0, MIN_HEADER_LEN + payload_len, ident & 0xFFFF, FLAG_DF,
                              ttl, proto, 0, src, dst))
    struct.pack_into("!H", raw, 10, checksum.checksum(raw))
    return bytes(raw)
