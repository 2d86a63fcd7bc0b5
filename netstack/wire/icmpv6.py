"""ICMPv6 (RFC 4443) and the Neighbor Discovery messages the gateway answers (RFC 4861).

The checksum covers the IPv6 pseudo-header (RFC 8200 §8.1). Options are walked with a length
check (RFC 4861 §4.6: a zero length is invalid and ends the walk).
"""

from __future__ import annotations

import struct

from netstack.wire import checksum

HEADER_LEN = 4
TYPE_DEST_UNREACHABLE = 1
TYPE_PACKET_TOO_BIG = 2
TYPE_TIME_EXCEEDED = 3
TYPE_ECHO_REQUEST = 128
TYPE_ECHO_REPLY = 129
TYPE_ROUTER_SOLICIT = 133
TYPE_ROUTER_ADVERT = 134
TYPE_NEIGHBOR_SOLICIT = 135
TYPE_NEIGHBOR_ADVERT = 136
CODE_ADMIN_PROHIBITED = 1
CODE_PORT_UNREACHABLE = 4

OPT_SOURCE_LL = 1
OPT_TARGET_LL = 2
OPT_PREFIX_INFO = 3
OPT_MTU = 5

NA_ROUTER = 0x80000000
NA_SOLICITED = 0x40000000
NA_OVERRIDE = 0x20000000


def parse(data: bytes | memoryview, pseudo_sum: int) -> tuple[int, int] | None:
    """(type, code) when long enough and the checksum is right, else None."""
    if len(data) < HEADER_LEN or (pseudo_sum + checksum.ones_sum(data)) % 0xFFFF != 0:
        return None
    return data[0], data[1]


def message(icmp_type: int, code: int, body: bytes, pseudo_sum: int) -> bytes:
    """Type, code, checksum and body; `pseudo_sum` covers the pseudo-header for its length."""
    raw = bytearray(struct.pack("!BBH", icmp_type, code, 0))
    raw += body
    struct.pack_into("!H", raw, 2, checksum.finish(pseudo_sum + checksum.ones_sum(raw)))
    return bytes(raw)


def solicited_target(data: bytes | memoryview) -> bytes | None:
    """The target address of a neighbor solicitation (RFC 4861 §4.3), if well-formed."""
    if len(data) < 24 or data[1] != 0:
        return None
    return bytes(data[8:24])


def neighbor_advert_body(target: bytes, mac: bytes, router: bool) -> bytes:
    """RFC 4861 §4.4: flags, target, and our link-layer address as an option."""
    flags = NA_SOLICITED | NA_OVERRIDE | (NA_ROUTER if router else 0)
    return struct.pack("!I16sBB6s", flags, target, OPT_TARGET_LL, 1, mac)


def router_advert_body(mac: bytes, prefix: bytes, prefix_len: int, mtu: int,
                       lifetime: int = 1800) -> bytes:
    """RFC 4861 §4.2: we are a default router; the prefix is on-link, not for SLAAC."""
    head = struct.pack("!BBHII", 64, 0, lifetime, 0, 0)  # hop limit, flags, lifetime, timers
    source_ll = struct.pack("!BB6s", OPT_SOURCE_LL, 1, mac)
    mtu_opt = struct.pack("!BBHI", OPT_MTU, 1, 0, mtu)
    # Prefix information (§4.6.2): L=1 (on-link), A=0 (addresses are configured statically).
    prefix_opt = struct.pack("!BBBBIII16s", OPT_PREFIX_INFO, 4, prefix_len, 0x80,
                             0xFFFFFFFF, 0xFFFFFFFF, 0, prefix)
    return head + source_ll + mtu_opt + prefix_opt


def echo_reply_body(request: bytes | memoryview) -> bytes:
    """Identifier, sequence number and data of an echo request, for the reply (RFC 4443 §4.2)."""
    return bytes(request[HEADER_LEN:])


def error_body(original: bytes | memoryview, limit: int) -> bytes:
    """Unused word plus as much of the offending packet as fits in `limit` bytes (§2.4 (c))."""
    return b"\x00\x00\x00\x00" + bytes(original[:limit])
