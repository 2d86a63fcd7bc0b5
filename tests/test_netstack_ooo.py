"""The TCP out-of-order queue: bounded by segments as well as bytes, cheap to insert into.

A sender may put zero-length segments (FINs) at ever-new sequence numbers ahead of RCV.NXT: they
take no bytes of the window, so only a bound on the number of held segments stops them. And
in-order data must not make the stack walk the whole queue: the cost per segment is counted
here in calls to the sequence-number helpers (netstack.seq), never timed.
"""

from __future__ import annotations

import pytest
from netstack_helpers import Peer, make_iface

from netstack import seq
from netstack.tcp import TcpConfig


def _established(cfg: TcpConfig | None = None) -> Peer:
    peer = Peer(make_iface(cfg))
    peer.handshake()
    return peer


def _fins_ahead(peer: Peer, count: int, gap: int = 1000) -> None:
    """`count` bare FINs at distinct sequence numbers beyond a gap (all out of order)."""
    for i in range(count):
        peer.tcp("FA", seq=peer.seq + gap + i)
        peer.iface.take_frames()  # the duplicate ACKs each draws: not needed here


def test_fins_at_distinct_sequence_numbers_are_bounded_by_count() -> None:
    cfg = TcpConfig(ooo_segments=64)
    peer = _established(cfg)
    _fins_ahead(peer, 1000)
    conn = peer.iface.connection(peer.flow)
    assert conn is not None
    assert len(conn.ooo) == 64
    assert peer.iface.drops["tcp-out-of-order-full"] == 1000 - 64


def test_default_out_of_order_bound_counts_zero_length_segments() -> None:
    peer = _established()
    bound = TcpConfig().ooo_segments
    _fins_ahead(peer, bound + 500)
    conn = peer.iface.connection(peer.flow)
    assert conn is not None
    assert len(conn.ooo) == bound
    assert peer.iface.drops["tcp-out-of-order-full"] == 500


def test_out_of_order_byte_bound_still_holds() -> None:
    cfg = TcpConfig(rcv_buffer=4000, ooo_segments=1000)
    peer = _established(cfg)
    for i in range(20):  # overlapping 500-byte segments beyond a gap: 10,000 bytes in all
        peer.tcp("PA", seq=peer.seq + 1 + 100 * i, payload=b"x" * 500)
    conn = peer.iface.connection(peer.flow)
    assert conn is not None
    assert conn.ooo_bytes <= 4000 and len(conn.ooo) < 20
    assert peer.iface.drops["tcp-out-of-order-full"] >= 2


def test_many_segments_in_reverse_order_are_reassembled() -> None:
    peer = _established()
    data = bytes(range(256)) * 2
    base = peer.seq
    for i in reversed(range(1, len(data))):  # all but the first byte, last first
        peer.tcp("PA", seq=base + i, payload=data[i:i + 1])
    assert peer.recv_all() == b""
    peer.tcp("PA", seq=base, payload=data[:1])
    assert peer.recv_all() == data
    conn = peer.iface.connection(peer.flow)
    assert conn is not None and not conn.ooo and conn.ooo_bytes == 0


def test_out_of_order_fin_is_taken_once_the_gap_fills() -> None:
    peer = _established()
    base = peer.seq
    peer.tcp("FA", seq=base + 3)  # FIN after three bytes not yet received
    peer.tcp("PA", seq=base + 1, payload=b"bc")
    assert peer.state() == "ESTABLISHED"
    peer.tcp("PA", seq=base, payload=b"a")
    assert peer.recv_all() == b"abc"
    assert peer.state() == "CLOSE-WAIT"


class _Counted:
    """Wraps the netstack.seq helpers and counts every call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        for name in ("add", "diff", "lt", "le", "in_window"):
            original = getattr(seq, name)

            def counted(*args: int, _original=original) -> int:  # type: ignore[no-untyped-def]
                self.calls += 1
                return _original(*args)

            monkeypatch.setattr(seq, name, counted)


def test_in_order_tiny_segments_do_not_walk_the_out_of_order_queue(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """400 in-order 1-byte segments behind a full out-of-order queue: the work per segment
    must not depend on how much the queue holds (it used to be re-sorted for every one)."""
    peer = _established()
    conn = peer.iface.connection(peer.flow)
    assert conn is not None
    _fins_ahead(peer, 2000, gap=10_000)
    held = len(conn.ooo)
    assert held > 0
    frames = [peer.segment("PA", seq=peer.seq + i, payload=b"z") for i in range(400)]
    counter = _Counted(monkeypatch)
    for frame in frames:
        peer.feed(frame)
    calls = counter.calls
    monkeypatch.undo()
    assert peer.recv_all() == b"z" * 400
    per_segment = calls / 400
    # A constant number of sequence-number operations per segment, far below the queue size.
    assert per_segment < 40, f"{per_segment:.0f} seq operations per segment ({held} held)"
