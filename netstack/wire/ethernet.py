"""Ethernet II framing (IEEE 802.3 with an EtherType): 14-byte header, no FCS on a TAP device."""

from __future__ import annotations

import struct

HEADER_LEN = 14
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_IPV6 = 0x86DD
BROADCAST = b"\xff" * 6

_HDR = struct.Struct("!6s6sH")


def parse(frame: bytes | memoryview) -> tuple[bytes, bytes, int] | None:
    """(dst_mac, src_mac, ethertype), or None when the frame is too short."""
    if len(frame) < HEADER_LEN:
        return None
    return _HDR.unpack_from(frame, 0)


def header(dst: bytes, src: bytes, ethertype: int) -> bytes:
    return _HDR.pack(dst, src, ethertype)


def mac_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)
