"""Packet capture (`--pcap FILE`): the frames on tap0, both directions, in classic pcap format.

How this works
--------------
The engine hands every frame it reads from the TAP device and every frame it writes to it to
`PcapWriter.write` (only when capture is on: one attribute test per frame otherwise). A record
is the 16-byte pcap record header (seconds, microseconds, captured length, original length)
followed by the frame; records are gathered in memory and written with os.write() when 256 KB
have piled up, when a second has passed, and at close. The file starts with the classic 24-byte
global header (magic 0xa1b2c3d4, version 2.4, LINKTYPE_ETHERNET = 1), little-endian, which
tshark, tcpdump, wireshark and scapy all read.

The file is bounded: once writing the next record would take it past `limit` bytes, capture
stops (the file stays valid) and `on_stop` is told once, with a line for stderr. A write error
(disk full) stops capture the same way: the firewall goes on without it.
"""

from __future__ import annotations

import os
import re
import struct
import time
from collections.abc import Callable

LINKTYPE_ETHERNET = 1
SNAPLEN = 262144
DEFAULT_LIMIT = 100 * 1000 * 1000
FLUSH_BYTES = 256 * 1024
FLUSH_SECONDS = 1.0

_GLOBAL = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")
GLOBAL_HEADER = _GLOBAL.pack(0xA1B2C3D4, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET)
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgKMG]?)([iI]?)[bB]?")


class PcapError(Exception):
    pass


def parse_size(text: str) -> int:
    """'100M', '2G', '500k', '64MiB', '123456' -> bytes (K/M/G: powers of 1000; KiB...: 1024)."""
    m = _SIZE_RE.fullmatch(text.strip())
    if m is None or (m[3] and not m[2]) or float(m[1]) <= 0:
        raise ValueError(f"invalid size {text!r} (e.g. 100M, 2G, 64MiB, 500000)")
    unit = m[2].lower()
    scale = (1024 if m[3] else 1000) ** " kmg".index(unit) if unit else 1
    return int(float(m[1]) * scale)


class PcapWriter:
    def __init__(self, path: str, limit: int = DEFAULT_LIMIT,
                 on_stop: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.limit = limit
        self.on_stop = on_stop
        try:
            self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                                           | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise PcapError(f"--pcap {path}: cannot open: {exc.strerror or exc}") from None
        self._buf = bytearray(GLOBAL_HEADER)
        self.size = len(GLOBAL_HEADER)  # bytes in the file, counting what is still buffered
        self.frames = 0
        self.stopped: str | None = None
        self._last_flush = time.monotonic()
        if limit < len(GLOBAL_HEADER):
            self._stop(f"--pcap-limit {limit} is smaller than the pcap header: nothing captured")

    def write(self, frame: bytes | bytearray | memoryview) -> None:
        """Record one frame (never raises)."""
        if self.stopped is not None:
            return
        length = len(frame)
        captured = min(length, SNAPLEN)
        if self.size + _RECORD.size + captured > self.limit:
            self._stop(f"the capture {self.path} reached --pcap-limit ({self.limit} bytes) "
                       f"after {self.frames} frames; capture stopped, the sandbox runs on")
            return
        now = time.time()
        seconds = int(now)
        buf = self._buf
        buf += _RECORD.pack(seconds, int((now - seconds) * 1_000_000), captured, length)
        buf += frame if captured == length else frame[:captured]
        self.size += _RECORD.size + captured
        self.frames += 1
        if len(buf) >= FLUSH_BYTES or time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._fd is None or not self._buf:
            return
        data = memoryview(self._buf)
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError as exc:
            data.release()
            self._buf = bytearray()
            self._stop(f"writing the capture {self.path} failed ({exc.strerror or exc}); "
                       "capture stopped")
            return
        data.release()
        self._buf = bytearray()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def _stop(self, why: str) -> None:
        self.stopped = why
        self.flush()
        if self.on_stop is not None:
            self.on_stop(why)
