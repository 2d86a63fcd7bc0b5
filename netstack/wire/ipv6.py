"""IPv6 header (RFC 8200 §3) and the extension-header walk (§4).

Parsing checks the fixed header and payload length against the buffer, then follows the
chain of extension headers (hop-by-hop, routing, destination options) with a length check
before every read, to the upper-layer protocol. A fragment header, an unknown extension or a
chain longer than MAX_EXTENSIONS ends in a drop reason: the stack never reassembles.

`embedded_ipv4` is the one definition of the IPv6 forms that stand for an IPv4 address; the
stack and tapbox's policy both judge such a destination as the IPv4 address.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER_LEN = 40
PROTO_HOP_BY_HOP = 0
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ROUTING = 43
PROTO_FRAGMENT = 44
PROTO_ICMPV6 = 58
PROTO_NONE = 59
PROTO_DEST_OPTS = 60
DEFAULT_HOP_LIMIT = 64
MIN_MTU = 1280  # RFC 8200 §5
MAX_EXTENSIONS = 8

_HDR = struct.Struct("!IHBB16s16s")
_MAPPED_PREFIX = bytes(10) + b"\xff\xff"  # ::ffff:0:0/96, RFC 4291 §2.5.5.2
_COMPATIBLE_PREFIX = bytes(12)  # ::/96, RFC 4291 §2.5.5.1 (deprecated; not :: or ::1)
NAT64_PREFIX = b"\x00\x64\xff\x9b" + bytes(8)  # 64:ff9b::/96, RFC 6052 §2.1
_SKIPPABLE = frozenset({PROTO_HOP_BY_HOP, PROTO_ROUTING, PROTO_DEST_OPTS})


@dataclass(frozen=True, slots=True)
class Ipv6Header:
    payload_len: int
    proto: int  # the upper-layer protocol after the extension headers
    upper_offset: int  # where the upper-layer header starts, from the start of the packet
    hop_limit: int
    src: bytes
    dst: bytes


def parse(pkt: bytes | memoryview) -> Ipv6Header | str:
    """The header with its upper-layer protocol located, or a drop reason."""
    if len(pkt) < HEADER_LEN:
        return "ipv6-truncated"
    vtf, plen, nxt, hops, src, dst = _HDR.unpack_from(pkt, 0)
    if vtf >> 28 != 6:
        return "ipv6-bad-version"
    if HEADER_LEN + plen > len(pkt):
        return "ipv6-bad-length"
    end = HEADER_LEN + plen
    offset = HEADER_LEN
    for _ in range(MAX_EXTENSIONS + 1):  # up to MAX_EXTENSIONS headers, then the upper layer
        if nxt not in _SKIPPABLE:
            break
        if offset + 2 > end:
            return "ipv6-bad-extension"
        length = (pkt[offset + 1] + 1) * 8  # RFC 8200 §4.3-4.6: in 8-octet units, less one
        nxt = pkt[offset]
        offset += length
        if offset > end:
            return "ipv6-bad-extension"
    else:
        return "ipv6-too-many-extensions"
    if nxt == PROTO_FRAGMENT:
        return "ipv6-fragment"
    return Ipv6Header(plen, nxt, offset, hops, src, dst)


def embedded_ipv4(address: bytes) -> bytes | None:
    """The IPv4 address a 16-byte IPv6 address stands for, or None: IPv4-mapped
    (::ffff:a.b.c.d), IPv4-compatible (::a.b.c.d, but not :: or ::1) and the NAT64
    well-known prefix (64:ff9b::a.b.c.d)."""
    head = address[:12]
    if head == _MAPPED_PREFIX or head == NAT64_PREFIX:
        return address[12:16]
    if head == _COMPATIBLE_PREFIX and address[12:16] > b"\x00\x00\x00\x01":
        return address[12:16]
    return None


def header(src: bytes, dst: bytes, proto: int, payload_len: int,
           hop_limit: int = DEFAULT_HOP_LIMIT) -> bytes:
    return _HDR.pack(6 << 28, payload_len, proto, hop_limit, src, dst)
