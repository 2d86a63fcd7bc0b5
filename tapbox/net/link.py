"""The link to the sandbox: frames read from and written to the TAP device.

How this works: `TapLink` is the device itself (the fd tap0's creator passed over, made
non-blocking): `receive(now, limit)` reads frames until the device is drained (EAGAIN) or
`limit` frames were read, `send(frame)` writes one frame; a full device queue drops the frame
(counted in `dropped`: TCP recovers, as from congestion). Anything else the device does wrong
is an `EngineError`: the engine cannot go on without its link.

The optional behaviours are wrappers with the same four methods, as smoltcp wraps a device
(its `Tracer` and `FaultInjector`): `CapturedLink` hands every frame, both directions, to the
--pcap writer; `FaultyLink` passes every frame through the test-only fault seam
(tapbox.net.faults), which may drop, duplicate, corrupt or hold back frames. Held frames come
due later: `next_at()` says when, `release(now)` writes the outbound ones that are due and
returns the inbound ones for the stack. The capture sits next to the device, so it records
what the sandbox really sent and got.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

from tapbox.net.faults import INBOUND, OUTBOUND, FaultInjector

Frame = bytes | bytearray


class EngineError(Exception):
    """The engine cannot go on (the TAP device failed)."""


class Link(Protocol):
    dropped: int

    def receive(self, now: float, limit: int) -> tuple[list[Frame], bool]:
        """Up to `limit` frames from the sandbox, and whether the device is drained."""
        ...

    def send(self, frame: Frame) -> None: ...

    def next_at(self) -> float | None: ...

    def release(self, now: float) -> list[Frame]: ...


class _Capture(Protocol):
    def write(self, frame: bytes | bytearray | memoryview) -> None: ...


class TapLink:
    def __init__(self, fd: int, bufsize: int) -> None:
        self.fd = fd
        self.bufsize = bufsize
        self.dropped = 0

    def receive(self, now: float, limit: int) -> tuple[list[Frame], bool]:
        fd, bufsize, read = self.fd, self.bufsize, os.read
        frames: list[Frame] = []
        for _ in range(limit):
            try:
                frame = read(fd, bufsize)
            except BlockingIOError:
                return frames, True
            except OSError as exc:
                raise EngineError(f"reading the TAP device failed: {exc}") from exc
            if not frame:
                raise EngineError("the TAP device was closed")
            frames.append(frame)
        return frames, False

    def send(self, frame: Frame) -> None:
        try:
            os.write(self.fd, frame)
        except BlockingIOError:
            self.dropped += 1
        except OSError as exc:
            raise EngineError(f"writing to the TAP device failed: {exc}") from exc

    def next_at(self) -> float | None:
        return None

    def release(self, now: float) -> list[Frame]:
        return []


class CapturedLink:
    """Every frame read and written, without the virtio-net header, to a capture."""

    def __init__(self, inner: Link, capture: _Capture, prefix: int) -> None:
        self.inner = inner
        self.capture = capture
        self.prefix = prefix

    @property
    def dropped(self) -> int:
        return self.inner.dropped

    def receive(self, now: float, limit: int) -> tuple[list[Frame], bool]:
        frames, drained = self.inner.receive(now, limit)
        for frame in frames:
            self.capture.write(memoryview(frame)[self.prefix:])
        return frames, drained

    def send(self, frame: Frame) -> None:
        dropped = self.inner.dropped
        self.inner.send(frame)
        if self.inner.dropped == dropped:
            self.capture.write(memoryview(frame)[self.prefix:])

    def next_at(self) -> float | None:
        return self.inner.next_at()

    def release(self, now: float) -> list[Frame]:
        return self.inner.release(now)


class FaultyLink:
    """The test-only fault seam, in both directions (tapbox.net.faults)."""

    def __init__(self, inner: Link, injector: FaultInjector, clock: Callable[[], float]) -> None:
        self.inner = inner
        self.injector = injector
        self.clock = clock

    @property
    def dropped(self) -> int:
        return self.inner.dropped

    def receive(self, now: float, limit: int) -> tuple[list[Frame], bool]:
        frames, drained = self.inner.receive(now, limit)
        passed: list[Frame] = []
        for frame in frames:
            passed.extend(self.injector.apply(INBOUND, bytes(frame), now))
        return passed, drained

    def send(self, frame: Frame) -> None:
        for passed in self.injector.apply(OUTBOUND, bytes(frame), self.clock()):
            self.inner.send(passed)

    def next_at(self) -> float | None:
        ours, inner = self.injector.next_at(), self.inner.next_at()
        if ours is None or inner is None:
            return ours if inner is None else inner
        return min(ours, inner)

    def release(self, now: float) -> list[Frame]:
        inbound = self.inner.release(now)
        for direction, frame in self.injector.due(now):
            if direction == INBOUND:
                inbound.append(frame)
            else:
                self.inner.send(frame)
        return inbound
