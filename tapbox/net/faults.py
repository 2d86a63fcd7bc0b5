"""Seeded fault injection at the frame seam between the TAP device and the stack (tests only).

How this works: every frame crossing the seam, in either direction, passes `FaultInjector`,
which may drop it, deliver it twice, flip a byte in it, or hold it back for a random delay so
that frames behind it overtake it (reordering). The same seed gives the same faults for the
same frame sequence. Held frames sit in a heap; `next_at()` tells the engine when to call
`due(now)` to release them.

It is switched on only by the environment variable TAPBOX_TEST_FAULTS, e.g.
`TAPBOX_TEST_FAULTS="seed=7,drop=0.02,dup=0.01,reorder=0.02,delay=0.005,corrupt=0.001"`:
a test seam, not a user feature (it is not in --help). `fail_after=N` makes the N-th frame
raise `InjectedFailure` inside the engine, to test how tapbox ends when its engine dies.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass

ENV_VAR = "TAPBOX_TEST_FAULTS"

INBOUND = 0  # sandbox -> stack
OUTBOUND = 1  # stack -> sandbox


@dataclass(frozen=True)
class FaultSpec:
    seed: int = 0
    drop: float = 0.0  # probability a frame is lost
    dup: float = 0.0  # probability a frame is delivered twice
    reorder: float = 0.0  # probability a frame is held back (later frames overtake it)
    delay: float = 0.005  # how long a held frame waits at most, seconds
    corrupt: float = 0.0  # probability one byte past the Ethernet header is flipped
    fail_after: int = 0  # the engine fails at this frame (1 = the first); 0: never

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        values: dict[str, float | int] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key not in cls.__dataclass_fields__:
                raise ValueError(f"{ENV_VAR}: unknown item {item!r}")
            values[key] = int(value) if key in ("seed", "fail_after") else float(value)
        return cls(**values)  # type: ignore[arg-type]


class InjectedFailure(RuntimeError):
    """The engine failure `fail_after` asks for."""


class FaultInjector:
    def __init__(self, spec: FaultSpec, prefix: int = 0) -> None:
        """`prefix`: bytes of virtio-net header in front of each frame (netstack.wire.vnet)."""
        self.spec = spec
        self.prefix = prefix
        self.rng = random.Random(spec.seed)
        self.held: list[tuple[float, int, int, bytes]] = []
        self._order = itertools.count()
        self.counts = {"dropped": 0, "duplicated": 0, "reordered": 0, "corrupted": 0}
        self.frames = 0

    def apply(self, direction: int, frame: bytes, now: float) -> list[bytes]:
        """The frames to pass on now for one frame arriving at the seam."""
        spec, rng = self.spec, self.rng
        self.frames += 1
        if self.frames == spec.fail_after:
            raise InjectedFailure(f"injected failure at frame {self.frames}")
        if rng.random() < spec.drop:
            self.counts["dropped"] += 1
            return []
        first = self.prefix + 14  # past the Ethernet header
        if rng.random() < spec.corrupt and len(frame) > first:
            index = rng.randrange(first, len(frame))
            damaged = bytearray(frame)
            damaged[index] ^= 1 << rng.randrange(8)
            if self.prefix:
                damaged[0] = 0  # a damaged frame's checksum can't be vouched for: clear the flags
            frame = bytes(damaged)
            self.counts["corrupted"] += 1
        copies = 2 if rng.random() < spec.dup else 1
        if copies == 2:
            self.counts["duplicated"] += 1
        if rng.random() < spec.reorder:
            self.counts["reordered"] += 1
            release = now + rng.uniform(0.0, spec.delay)
            for _ in range(copies):
                heapq.heappush(self.held, (release, next(self._order), direction, frame))
            return []
        return [frame] * copies

    def next_at(self) -> float | None:
        return self.held[0][0] if self.held else None

    def due(self, now: float) -> list[tuple[int, bytes]]:
        """Held frames whose time has come, as (direction, frame), oldest first."""
        out = []
        while self.held and self.held[0][0] <= now:
            _, _, direction, frame = heapq.heappop(self.held)
            out.append((direction, frame))
        return out
