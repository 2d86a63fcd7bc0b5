"""Sequence-number arithmetic modulo 2**32 (RFC 9293 §3.4), in one place."""

from __future__ import annotations

MOD = 1 << 32
MASK = MOD - 1
_HALF = 1 << 31


def add(a: int, n: int) -> int:
    return (a + n) & MASK


def diff(a: int, b: int) -> int:
    """a - b as a signed distance in (-2**31, 2**31]."""
    d = (a - b) & MASK
    return d - MOD if d > _HALF else d


def lt(a: int, b: int) -> bool:
    return diff(a, b) < 0


def le(a: int, b: int) -> bool:
    return diff(a, b) <= 0


def in_window(x: int, start: int, size: int) -> bool:
    """start <= x < start + size, modulo 2**32."""
    return 0 <= ((x - start) & MASK) < size
