"""TCP header (RFC 9293 §3.1) with the options the stack uses (§3.2): MSS, window scale.

Parsing checks the data offset and the checksum before any field is trusted, and walks the
options with explicit length checks: a truncated or malformed option list ends option parsing
(the segment is still processed with the options read so far, as RFC 9293 §3.2 asks receivers
to be robust). Emission writes the header and options into one preallocated buffer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from netstack.wire import checksum

MIN_HEADER_LEN = 20
FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20

OPT_END = 0
OPT_NOP = 1
OPT_MSS = 2
OPT_WSCALE = 3
CHECKSUM_OFFSET = 16  # of the checksum field within the header

_HDR = struct.Struct("!HHIIBBHHH")


@dataclass(slots=True)
class TcpSegment:
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int  # unscaled field value
    payload: memoryview
    mss: int | None = None
    wscale: int | None = None

    @property
    def seg_len(self) -> int:
        """SEG.LEN: payload octets plus one for each of SYN and FIN (RFC 9293 §3.4)."""
        return len(self.payload) + (1 if self.flags & SYN else 0) + (1 if self.flags & FIN else 0)


def parse(data: bytes | memoryview, pseudo_sum: int, verify: bool = True) -> TcpSegment | str:
    """The segment, or a drop reason. `pseudo_sum` is the pseudo-header sum for len(data);
    `verify=False` when the checksum is already vouched for (offload, netstack.wire.vnet)."""
    if len(data) < MIN_HEADER_LEN:
        return "tcp-truncated"
    sport, dport, seq, ack, off, flags, window, _csum, _urg = _HDR.unpack_from(data, 0)
    hlen = (off >> 4) * 4
    if hlen < MIN_HEADER_LEN or hlen > len(data):
        return "tcp-bad-offset"
    if verify and (pseudo_sum + checksum.ones_sum(data)) % 0xFFFF != 0:
        return "tcp-bad-checksum"
    view = memoryview(data)
    seg = TcpSegment(sport, dport, seq, ack, flags, window, view[hlen:])
    if hlen > MIN_HEADER_LEN:
        _parse_options(view[MIN_HEADER_LEN:hlen], seg)
    return seg


def _parse_options(opts: memoryview, seg: TcpSegment) -> None:
    i, n = 0, len(opts)
    while i < n:
        kind = opts[i]
        if kind == OPT_END:
            return
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= n:
            return
        length = opts[i + 1]
        if length < 2 or i + length > n:
            return
        if kind == OPT_MSS and length == 4:
            seg.mss = (opts[i + 2] << 8) | opts[i + 3]
        elif kind == OPT_WSCALE and length == 3:
            seg.wscale = opts[i + 2]
        i += length


def syn_options(mss: int, wscale: int | None) -> bytes:
    """MSS (RFC 9293 §3.7.1) and, when the peer offered it, window scale (RFC 7323 §2.2)."""
    opts = struct.pack("!BBH", OPT_MSS, 4, mss)
    if wscale is not None:
        opts += struct.pack("!BBBB", OPT_NOP, OPT_WSCALE, 3, wscale)
    return opts


def segment_into(buf: bytearray, off: int, sport: int, dport: int, seq: int, ack: int,
                 flags: int, window: int, options: bytes, payload_len: int,
                 pseudo_sum: int, partial: bool = False) -> None:
    """Write header + options at buf[off:] and fill in the checksum.

    The payload must already sit right after the options; `pseudo_sum` is the pseudo-header
    sum for the full segment length; `options` is padded to a multiple of four bytes.
    `partial`: store only the folded pseudo-header sum, for the kernel to complete (offload).
    """
    hlen = MIN_HEADER_LEN + len(options)
    _HDR.pack_into(buf, off, sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, (hlen // 4) << 4,
                   flags, window, 0, 0)
    buf[off + MIN_HEADER_LEN:off + hlen] = options
    if partial:
        struct.pack_into("!H", buf, off + CHECKSUM_OFFSET, pseudo_sum % 0xFFFF or 0xFFFF)
        return
    with memoryview(buf) as view:
        total = pseudo_sum + checksum.ones_sum(view[off:off + hlen + payload_len])
    struct.pack_into("!H", buf, off + 16, checksum.finish(total))
