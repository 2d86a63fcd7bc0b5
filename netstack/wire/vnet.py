"""The virtio-net header (virtio 1.x §5.1.6) that a TAP opened with IFF_VNET_HDR puts in
front of every frame, both ways.

We use it for checksum offload only (TUNSETOFFLOAD with TUN_F_CSUM, no segmentation): a frame
from the kernel flagged NEEDS_CSUM or DATA_VALID carries a TCP/UDP checksum nobody needs to
verify (it never left the machine), and a frame we write flagged NEEDS_CSUM has only the
pseudo-header sum in its checksum field: the kernel treats it as already checked. That saves
the one per-byte computation left on the path. Fields are in host byte order (legacy virtio).
"""

from __future__ import annotations

import struct

HEADER_LEN = 10
F_NEEDS_CSUM = 1
F_DATA_VALID = 2
GSO_NONE = 0

_HDR = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset


def parse(frame: bytes | memoryview) -> tuple[bool, int] | None:
    """(checksum trusted, gso_type) or None if too short."""
    if len(frame) < HEADER_LEN:
        return None
    flags, gso_type, _hdr_len, _gso_size, _start, _offset = _HDR.unpack_from(frame, 0)
    return bool(flags & (F_NEEDS_CSUM | F_DATA_VALID)), gso_type


def write_partial(buf: bytearray, csum_start: int, csum_offset: int) -> None:
    """Mark `buf` (whose first HEADER_LEN bytes are this header) as needing its checksum at
    csum_start + csum_offset completed over [csum_start, end)."""
    _HDR.pack_into(buf, 0, F_NEEDS_CSUM, GSO_NONE, 0, 0, csum_start, csum_offset)
