"""netstack.tcp: the RFC 9293 state machine, one group of tests per state (as smoltcp's).

Every test drives one connection with a scapy `Peer` playing the sandbox's kernel, with explicit
`now` values; every frame the stack emits is parsed and checksum-checked by scapy on the way out.
The stack's own initial sequence number comes from its SYN-ACK; tests reason relative to it.
"""

from __future__ import annotations

from typing import Any

import pytest
from netstack_helpers import ISN_KEY, MOD, Peer, make_iface, payload_of, rel

from netstack import events as ev
from netstack.iface import InterfaceConfig
from netstack.tcp import TcpConfig

OUR_MSS = InterfaceConfig().mtu - 40


def established(tcp: TcpConfig | None = None, *, mss: int | None = 1460,
                wscale: int | None = None, window: int = 65535, isn: int = 1_000_000,
                now: float = 100.0, **iface_kwargs: Any) -> Peer:
    """A peer whose connection is ESTABLISHED, with the handshake's events consumed."""
    peer = Peer(make_iface(tcp, **iface_kwargs), isn=isn, now=now)
    peer.window = window
    peer.handshake(mss=mss, wscale=wscale, window=window)
    peer.take_events()
    return peer


def readable(peer: Peer) -> bool:
    return ev.TcpReadable(peer.flow) in peer.take_events()


def closed_events(peer: Peer) -> list[ev.TcpClosed]:
    return [e for e in peer.take_events() if isinstance(e, ev.TcpClosed)]


def send_from_stack(peer: Peer, data: bytes) -> None:
    assert peer.iface.tcp_send(peer.flow, data, peer.now) == len(data)


# ----- SYN-RECEIVED ---------------------------------------------------------------------------


class TestSynReceived:
    def test_syn_ack_with_window_scale_when_offered(self) -> None:
        peer = Peer(isn=77)
        synack = peer.handshake(mss=1460, wscale=6, accept=False)
        assert synack.ack == 78
        assert synack.options == [("MSS", OUR_MSS), ("NOP", None), ("WScale", 7)]
        assert synack.window == 65535  # a SYN's window is never scaled (RFC 7323 §2.2)
        assert peer.state() == "SYN-RECEIVED"

    def test_syn_ack_without_window_scale_when_not_offered(self) -> None:
        peer = Peer()
        synack = peer.handshake(mss=1460, wscale=None, accept=False)
        assert synack.options == [("MSS", OUR_MSS)]

    def test_mss_follows_mtu(self) -> None:
        peer = Peer(make_iface(mtu=1500))
        synack = peer.handshake(accept=False)
        assert dict(synack.options)["MSS"] == 1460

    def test_syn_ack_window_is_the_receive_buffer(self) -> None:
        peer = Peer(make_iface(TcpConfig(rcv_buffer=3000)))
        synack = peer.handshake(wscale=7, accept=False)
        assert synack.window == 3000

    def test_handshake_to_established(self) -> None:
        peer = Peer()
        peer.handshake()
        assert peer.state() == "ESTABLISHED"
        assert peer.take_events() == [ev.TcpWritable(peer.flow)]
        assert peer.iface.poll_at() is None or peer.iface.poll_at() >= peer.now
        peer.advance(1000.0)  # no timer left that does anything
        peer.expect_none()

    def test_retransmitted_syn_gets_syn_ack_again(self) -> None:
        peer = Peer()
        first = peer.handshake(accept=False)
        peer.syn()
        peer.expect(flags="SA", seq=first.seq, ack=first.ack)
        assert peer.iface.take_events() == []

    def test_syn_ack_retransmitted_with_backoff_then_reset(self) -> None:
        peer = Peer(make_iface(TcpConfig(max_retries=2)), now=10.0)
        first = peer.handshake(accept=False)
        assert peer.iface.poll_at() == pytest.approx(11.0)
        peer.poll_until(10.99)
        peer.expect_none()
        peer.poll_until(11.0)
        peer.expect(flags="SA", seq=first.seq, ack=first.ack)
        peer.poll_until(12.99)
        peer.expect_none()
        peer.poll_until(13.0)
        peer.expect(flags="SA", seq=first.seq)
        peer.poll_until(17.0)
        peer.expect(flags="RA", seq=first.seq + 1)
        assert peer.take_events() == [ev.TcpClosed(peer.flow, True, "timeout")]
        assert peer.state() is None

    def test_data_on_syn_not_delivered_but_accepted_when_resent(self) -> None:
        peer = Peer(isn=500)
        peer.syn(payload=b"early data")
        assert peer.iface.take_events() == [ev.TcpConnectRequest(peer.flow)]
        peer.iface.tcp_accept(peer.flow, peer.now)
        synack = peer.expect(flags="SA", ack=501)  # only the SYN is acknowledged
        peer.rcv_nxt = synack.seq + 1
        peer.ack()
        assert peer.recv_all() == b""
        peer.send(b"early data")
        assert readable(peer)
        assert peer.recv_all() == b"early data"
        peer.expect(flags="A", ack=511)

    def test_ack_carrying_data_completes_handshake(self) -> None:
        peer = Peer()
        peer.handshake(accept=False)
        peer.send(b"GET / HTTP/1.1\r\n\r\n")
        assert peer.state() == "ESTABLISHED"
        assert peer.recv_all() == b"GET / HTTP/1.1\r\n\r\n"

    def test_unacceptable_ack_gets_reset(self) -> None:
        peer = Peer()
        synack = peer.handshake(accept=False)
        peer.tcp("A", seq=peer.seq, ack=synack.seq + 1000)
        peer.expect(flags="R", seq=synack.seq + 1000)
        assert peer.state() == "SYN-RECEIVED"

    def test_data_queued_before_handshake_sent_after(self) -> None:
        peer = Peer()
        peer.handshake(accept=False)
        send_from_stack(peer, b"banner")
        peer.expect_none()
        peer.ack()
        peer.expect(flags="PA", seq=peer.rcv_nxt, payload=b"banner")

    def test_exact_rst_closes(self) -> None:
        peer = Peer()
        peer.handshake(accept=False)
        peer.tcp("R", seq=peer.seq, ack=0)
        assert peer.state() is None
        assert closed_events(peer) == [ev.TcpClosed(peer.flow, True, "reset by sandbox")]


# ----- ESTABLISHED: receiving ----------------------------------------------------------------


class TestEstablishedReceive:
    def test_in_order_data(self) -> None:
        peer = established()
        peer.send(b"hello")
        assert peer.take_events() == [ev.TcpReadable(peer.flow)]
        assert peer.iface.tcp_recv(peer.flow, 3) == b"hel"
        assert peer.iface.tcp_recv(peer.flow, 100) == b"lo"
        assert peer.iface.tcp_recv(peer.flow, 100) == b""
        peer.expect(flags="A", seq=peer.rcv_nxt, ack=peer.seq)

    def test_readable_once_until_drained(self) -> None:
        peer = established()
        peer.send(b"a")
        peer.send(b"b")
        assert peer.take_events() == [ev.TcpReadable(peer.flow)]
        assert peer.recv_all() == b"ab"
        peer.send(b"c")
        assert peer.take_events() == [ev.TcpReadable(peer.flow)]

    def test_acks_are_coalesced(self) -> None:
        peer = established()
        for chunk in (b"one", b"two", b"three"):
            peer.send(chunk)
        peer.expect(flags="A", ack=peer.seq)  # one ACK for the batch
        assert peer.take_frames() == []

    def test_out_of_order_held_until_gap_fills(self) -> None:
        peer = established()
        start = peer.seq
        peer.tcp("PA", seq=start + 5, payload=b"world")
        # An immediate duplicate ACK for what is missing (RFC 5681 §4.2).
        peer.expect(flags="A", ack=start)
        assert not readable(peer)
        assert peer.recv_all() == b""
        peer.tcp("PA", seq=start + 10, payload=b"!!")
        peer.expect(flags="A", ack=start)
        peer.tcp("PA", seq=start, payload=b"hello")
        peer.seq = start + 12
        assert readable(peer)
        assert peer.recv_all() == b"helloworld!!"
        peer.expect(flags="A", ack=start + 12)

    def test_overlapping_segments(self) -> None:
        peer = established()
        start = peer.seq
        peer.tcp("PA", seq=start, payload=b"abcdef")
        peer.tcp("PA", seq=start + 3, payload=b"defghi")  # overlaps three bytes
        peer.tcp("PA", seq=start + 2, payload=b"cdefghij")  # overlaps, adds "j"
        assert peer.recv_all() == b"abcdefghij"
        peer.expect(flags="A", ack=start + 10)

    def test_duplicate_segment_reacknowledged(self) -> None:
        peer = established()
        start = peer.seq
        peer.send(b"abcdef")
        peer.expect(flags="A", ack=start + 6)
        peer.tcp("PA", seq=start, payload=b"abcdef")  # the sandbox resends (our ACK was lost)
        peer.expect(flags="A", ack=start + 6)
        assert peer.recv_all() == b"abcdef"

    def test_overlapping_out_of_order_segments(self) -> None:
        peer = established()
        start = peer.seq
        peer.tcp("PA", seq=start + 4, payload=b"efgh")
        peer.tcp("PA", seq=start + 6, payload=b"ghij")
        peer.tcp("PA", seq=start + 4, payload=b"efgh")
        peer.take_frames()
        peer.tcp("PA", seq=start, payload=b"abcde")
        assert peer.recv_all() == b"abcdefghij"
        assert [s.ack for s in peer.segments()][-1] == (start + 10) % MOD

    def test_window_is_free_buffer_space(self) -> None:
        peer = established(TcpConfig(rcv_buffer=4000), mss=1000)
        start = peer.seq
        peer.send(b"x" * 1000)
        peer.expect(flags="A", ack=start + 1000, window=3000)
        peer.send(b"y" * 1000)
        peer.send(b"z" * 2000)
        peer.expect(flags="A", ack=start + 4000, window=0)
        # Beyond the (zero) window: not accepted, acknowledged with the same window.
        peer.tcp("PA", seq=start + 4000, payload=b"more")
        peer.expect(flags="A", ack=start + 4000, window=0)
        assert len(peer.recv_all()) == 4000
        # Reading opens the window: a window update goes out.
        peer.expect(flags="A", ack=start + 4000, window=4000)

    def test_ack_on_data_into_zero_window_is_processed(self) -> None:
        # RFC 9293 §3.10.7.4: with RCV.WND zero no segment's text is acceptable, "but special
        # allowance should be made to accept valid ACKs": the data is refused, its ACK is not.
        peer = established(TcpConfig(rcv_buffer=1000), mss=1000)
        base = peer.rcv_nxt
        send_from_stack(peer, b"o" * 500)
        peer.expect(seq=base, payload=b"o" * 500)
        peer.send(b"x" * 1000, ack=base)  # fills our window; does not acknowledge ours yet
        peer.expect(flags="A", ack=peer.seq, window=0)
        peer.tcp("PA", seq=peer.seq, ack=base + 500, payload=b"y" * 100)
        peer.expect(flags="A", ack=peer.seq, window=0)  # the text is refused...
        conn = peer.iface.connection(peer.flow)
        assert conn is not None and rel(conn.snd_una, base) == 500  # ...the ACK is taken
        peer.advance(1.0)
        peer.expect_none()  # so nothing is retransmitted
        assert peer.recv_all() == b"x" * 1000

    def test_data_beyond_window_trimmed(self) -> None:
        peer = established(TcpConfig(rcv_buffer=1000), mss=1000)
        start = peer.seq
        peer.tcp("PA", seq=start, payload=b"a" * 1500)
        peer.expect(flags="A", ack=start + 1000, window=0)
        assert peer.recv_all() == b"a" * 1000

    def test_scaled_window(self) -> None:
        peer = established(TcpConfig(rcv_buffer=1 << 20), wscale=7)
        peer.send(b"q" * 1000)
        peer.expect(flags="A", window=((1 << 20) - 1000) >> 7)

    def test_window_update_after_partial_read(self) -> None:
        peer = established(TcpConfig(rcv_buffer=2000))
        start = peer.seq
        peer.send(b"k" * 2000)
        peer.expect(window=0)
        assert peer.iface.tcp_recv(peer.flow, 1500) == b"k" * 1500
        peer.expect(flags="A", ack=start + 2000, window=1500)

    def test_keepalive_probe_answered(self) -> None:
        peer = established()
        peer.send(b"data")
        peer.take_frames()
        # Linux keepalive: seq = RCV.NXT - 1, with no data or one garbage byte.
        peer.tcp("A", seq=peer.seq - 1)
        peer.expect(flags="A", seq=peer.rcv_nxt, ack=peer.seq)
        peer.tcp("A", seq=peer.seq - 1, payload=b"\x00")
        peer.expect(flags="A", seq=peer.rcv_nxt, ack=peer.seq)
        assert peer.recv_all() == b"data"
        assert peer.state() == "ESTABLISHED"

    def test_segment_outside_window_draws_ack(self) -> None:
        peer = established()
        peer.tcp("PA", seq=peer.seq + 10_000_000, payload=b"far")
        peer.expect(flags="A", ack=peer.seq)
        assert peer.recv_all() == b""

    def test_segment_without_ack_bit_ignored(self) -> None:
        peer = established()
        peer.tcp("P", seq=peer.seq, payload=b"noack")
        peer.expect_none()
        assert peer.recv_all() == b""


# ----- ESTABLISHED: control segments ---------------------------------------------------------


class TestEstablishedControl:
    def test_rst_at_rcv_nxt_closes(self) -> None:
        peer = established()
        peer.send(b"unread")
        peer.take_frames()
        peer.take_events()
        peer.tcp("R", seq=peer.seq, ack=0)
        assert peer.take_frames() == []
        assert peer.take_events() == [ev.TcpClosed(peer.flow, True, "reset by sandbox")]
        assert peer.state() is None
        assert peer.iface.connection_count == 0

    def test_rst_ack_at_rcv_nxt_closes(self) -> None:
        peer = established()
        peer.tcp("RA", seq=peer.seq, ack=peer.rcv_nxt)
        assert peer.state() is None
        assert closed_events(peer)[0].reset

    def test_rst_in_window_not_exact_draws_challenge_ack(self) -> None:
        # RFC 5961 §3.2
        peer = established()
        peer.tcp("R", seq=peer.seq + 100, ack=0)
        peer.expect(flags="A", seq=peer.rcv_nxt, ack=peer.seq)
        assert peer.state() == "ESTABLISHED"
        assert closed_events(peer) == []

    def test_rst_outside_window_ignored(self) -> None:
        peer = established()
        peer.tcp("R", seq=peer.seq - 1000, ack=0)
        peer.tcp("R", seq=peer.seq + 10_000_000, ack=0)
        peer.expect_none()
        assert peer.state() == "ESTABLISHED"

    @pytest.mark.parametrize("offset", [0, 5, -5, 1 << 30])
    def test_syn_draws_challenge_ack(self, offset: int) -> None:
        # RFC 5961 §4: any SYN in a synchronized state, in window or not.
        peer = established()
        peer.tcp("S", seq=peer.seq + offset, ack=0)
        peer.expect(flags="A", seq=peer.rcv_nxt, ack=peer.seq)
        assert peer.state() == "ESTABLISHED"
        assert peer.iface.take_events() == []

    def test_ack_for_unsent_data_acked_and_ignored(self) -> None:
        peer = established()
        peer.tcp("PA", seq=peer.seq, ack=peer.rcv_nxt + 1000, payload=b"bogus")
        peer.expect(flags="A", seq=peer.rcv_nxt, ack=peer.seq)
        assert peer.recv_all() == b""
        assert peer.state() == "ESTABLISHED"


# ----- ESTABLISHED: sending -------------------------------------------------------------------


class TestEstablishedSend:
    def test_segments_by_mss(self) -> None:
        peer = established(mss=1000)
        base = peer.rcv_nxt
        send_from_stack(peer, bytes(range(256)) * 14)  # 3584 bytes
        segs = peer.segments()
        assert [(rel(s.seq, base), len(s.payload)) for s in segs] == [
            (0, 1000), (1000, 1000), (2000, 1000), (3000, 584)]
        assert [str(s.flags) for s in segs] == ["A", "A", "A", "PA"]
        assert all(s.ack == peer.seq for s in segs)
        assert b"".join(payload_of(s) for s in segs) == bytes(range(256)) * 14

    def test_default_mss_without_option(self) -> None:
        peer = established(mss=None)
        send_from_stack(peer, b"z" * 1000)
        assert [len(s.payload) for s in peer.segments()] == [536, 464]

    def test_respects_peer_window(self) -> None:
        peer = established(mss=1000, window=2500)
        base = peer.rcv_nxt
        send_from_stack(peer, b"w" * 6000)
        segs = peer.segments()
        assert [(rel(s.seq, base), len(s.payload)) for s in segs] == [
            (0, 1000), (1000, 1000), (2000, 500)]
        peer.ack(ack=base + 1000)  # window slides: right edge at 3500
        segs = peer.segments()
        assert [(rel(s.seq, base), len(s.payload)) for s in segs] == [(2500, 1000)]
        peer.ack(ack=base + 3500, window=1000)
        segs = peer.segments()
        assert [(rel(s.seq, base), len(s.payload)) for s in segs] == [(3500, 1000)]

    def test_respects_scaled_window(self) -> None:
        # The SYN's window is unscaled; later windows are shifted by the SYN's wscale.
        peer = Peer(isn=1)
        peer.window = 1000
        peer.handshake(mss=1000, wscale=2, window=1000)
        base = peer.rcv_nxt
        send_from_stack(peer, b"s" * 10_000)
        segs = peer.segments()
        assert sum(len(s.payload) for s in segs) == 4000
        peer.ack(ack=base + 4000, window=500)
        assert sum(len(s.payload) for s in peer.segments()) == 2000

    def test_window_scale_above_14_is_treated_as_14(self) -> None:
        # RFC 7323 §2.3: a shift count above 14 is used as 14.
        peer = Peer(isn=1)
        peer.window = 1
        peer.handshake(mss=1460, wscale=20, window=65535)
        send_from_stack(peer, b"s" * 20_000)
        assert sum(len(s.payload) for s in peer.segments()) == 1 << 14

    def test_send_buffer_bounded(self) -> None:
        peer = established(TcpConfig(snd_buffer=5000), window=1000)
        assert peer.iface.tcp_send(peer.flow, b"b" * 8000, peer.now) == 5000
        assert peer.iface.tcp_send_space(peer.flow) == 0
        assert peer.iface.tcp_send(peer.flow, b"more", peer.now) == 0
        segs = peer.segments()
        peer.ack(ack=segs[-1].seq + len(segs[-1].payload))
        assert peer.iface.tcp_send_space(peer.flow) == 1000
        assert ev.TcpWritable(peer.flow) in peer.take_events()

    def test_zero_window_persist_probe(self) -> None:
        peer = established(TcpConfig(persist_min=0.25), mss=1000, window=1000)
        base = peer.rcv_nxt
        send_from_stack(peer, b"p" * 3000)
        peer.expect(seq=base, payload=b"p" * 1000)
        peer.ack(ack=base + 1000, window=0)
        peer.expect_none()
        assert peer.iface.poll_at() == pytest.approx(peer.now + 0.25)
        peer.advance(0.24)
        peer.expect_none()
        peer.advance(0.01)
        probe = peer.expect(flags="A", ack=peer.seq)
        # Either probe style draws an ACK carrying the window (RFC 9293 §3.8.6.1): an old
        # sequence number with no data (as Linux), or one byte of new data at SND.UNA.
        assert (rel(probe.seq, base), payload_of(probe)) in [(999, b""), (1000, b"p")]
        peer.ack(ack=base + 1000, window=0)
        peer.expect_none()
        peer.advance(0.49)
        peer.expect_none()
        peer.advance(0.01)  # backed off to twice the interval
        peer.expect(flags="A")
        peer.ack(ack=base + 1000, window=1000)  # the window opens
        peer.expect(seq=base + 1000, payload=b"p" * 1000)
        assert peer.state() == "ESTABLISHED"

    def test_window_update_resumes_sending(self) -> None:
        peer = established(mss=1000, window=1000)
        base = peer.rcv_nxt
        send_from_stack(peer, b"u" * 2000)
        peer.expect(seq=base)
        peer.ack(ack=base + 1000, window=0)
        peer.expect_none()
        peer.ack(ack=base + 1000, window=5000)
        peer.expect(seq=base + 1000, payload=b"u" * 1000)


# ----- ESTABLISHED: retransmission ------------------------------------------------------------


class TestRetransmission:
    def test_rto_with_exponential_backoff_then_reset(self) -> None:
        peer = established(TcpConfig(max_retries=3), now=100.0)
        base = peer.rcv_nxt
        send_from_stack(peer, b"lost")
        peer.expect(seq=base, payload=b"lost")
        for due in (101.0, 103.0, 107.0):  # RTO 1 s, then doubled each time (RFC 6298 §5.5)
            assert peer.iface.poll_at() == pytest.approx(due)
            peer.poll_until(due - 0.001)
            peer.expect_none()
            peer.poll_until(due)
            peer.expect(flags="PA", seq=base, ack=peer.seq, payload=b"lost")
        assert closed_events(peer) == []
        peer.poll_until(115.0)
        peer.expect(flags="RA", seq=base + 4, ack=peer.seq)
        assert peer.take_events() == [ev.TcpClosed(peer.flow, True, "timeout")]
        assert peer.state() is None

    def test_ack_stops_the_timer(self) -> None:
        peer = established()
        base = peer.rcv_nxt
        send_from_stack(peer, b"data")
        peer.take_frames()
        peer.ack(ack=base + 4)
        peer.advance(100.0)
        peer.expect_none()

    def test_rto_retransmits_earliest_unacked(self) -> None:
        peer = established(mss=1000)
        base = peer.rcv_nxt
        send_from_stack(peer, b"r" * 3000)
        assert len(peer.segments()) == 3
        peer.ack(ack=base + 1000)
        peer.advance(1.0)
        segs = peer.segments()
        assert segs and rel(segs[0].seq, base) == 1000 and len(segs[0].payload) == 1000

    def test_rtt_sample_lowers_rto(self) -> None:
        peer = established(now=100.0)
        base = peer.rcv_nxt
        send_from_stack(peer, b"one")
        peer.take_frames()
        peer.now = 100.01
        peer.ack(ack=base + 3)  # 10 ms RTT: RTO = max(SRTT + 4 RTTVAR, rto_min) = 0.2 s
        peer.now = 101.0
        send_from_stack(peer, b"two")
        peer.take_frames()
        peer.poll_until(101.19)
        peer.expect_none()
        peer.poll_until(101.2)
        peer.expect(seq=base + 3, payload=b"two")

    def test_karn_no_sample_from_retransmitted_data(self) -> None:
        peer = established(now=100.0)
        base = peer.rcv_nxt
        send_from_stack(peer, b"one")
        peer.take_frames()
        peer.poll_until(101.0)
        peer.expect(seq=base, payload=b"one")  # RTO now 2 s
        peer.now = 101.01
        peer.ack(ack=base + 3)  # ambiguous: which transmission does this ACK answer?
        peer.now = 102.0
        send_from_stack(peer, b"two")
        peer.take_frames()
        # Neither 1.01 s nor 0.01 s was sampled: the backed-off RTO stands (RFC 6298 §5.7).
        peer.poll_until(103.99)
        peer.expect_none()
        peer.poll_until(104.0)
        peer.expect(seq=base + 3, payload=b"two")

    def test_fast_retransmit_on_third_duplicate_ack(self) -> None:
        peer = established(mss=1000)
        base = peer.rcv_nxt
        send_from_stack(peer, b"f" * 4000)
        assert len(peer.segments()) == 4
        peer.ack(ack=base + 1000)
        peer.ack(ack=base + 1000)
        peer.ack(ack=base + 1000)
        peer.expect_none()
        peer.ack(ack=base + 1000)  # third duplicate
        peer.expect(seq=base + 1000, payload=b"f" * 1000)
        peer.ack(ack=base + 4000)
        peer.expect_none()
        peer.advance(100.0)
        peer.expect_none()

    def test_duplicate_acks_with_window_change_are_not_counted(self) -> None:
        peer = established(mss=1000)
        base = peer.rcv_nxt
        send_from_stack(peer, b"f" * 4000)
        peer.take_frames()
        for window in (60000, 50000, 40000, 30000):
            peer.ack(ack=base + 1000, window=window)
        peer.expect_none()

    def test_robust_to_window_shrink_after_rto(self) -> None:
        # RFC 9293 §3.8.6.2.1: a sender must be robust against a shrinking window. The peer got
        # all 3000 bytes but then offers 1000; after the timeout resends what the window
        # allows, the peer's ACK for everything it has must be accepted, not refused as an ACK
        # of "data never sent" (it was sent: SND.NXT must not move backwards for that test).
        peer = established(mss=1000)
        base = peer.rcv_nxt
        send_from_stack(peer, b"s" * 3000)
        assert len(peer.segments()) == 3
        peer.ack(ack=base, window=1000)
        peer.advance(1.0)
        segs = peer.segments()
        assert rel(segs[0].seq, base) == 0
        peer.ack(ack=base + 3000, window=65535)
        conn = peer.iface.connection(peer.flow)
        assert conn is not None and rel(conn.snd_una, base) == 3000, "ACK of sent data refused"
        peer.expect_none()  # nothing to answer: everything is acknowledged
        peer.advance(100.0)
        peer.expect_none()
        assert peer.state() == "ESTABLISHED"

    def test_zero_window_with_data_in_flight_is_not_a_timeout(self) -> None:
        # The peer acknowledges part of the flight and closes its window, then answers every
        # probe. RFC 9293 §3.8.6.1: the sender MUST NOT close the connection while the receiver
        # keeps acknowledging its probes; a retransmission that cannot send anything must not
        # count as one towards the retry limit.
        peer = established(TcpConfig(max_retries=4), mss=1000)
        base = peer.rcv_nxt
        send_from_stack(peer, b"z" * 5000)
        peer.take_frames()
        peer.ack(ack=base + 1000, window=0)
        for _ in range(200):
            when = peer.iface.poll_at()
            if when is None or peer.now > 100.0 + 3600:
                break
            peer.poll_until(max(when, peer.now))
            for seg in peer.segments():
                assert not seg.flags.R, "connection reset while the peer answers every probe"
                peer.ack(ack=base + 1000, window=0)
        assert peer.state() == "ESTABLISHED"
        assert closed_events(peer) == []


# ----- CLOSE-WAIT and LAST-ACK (the sandbox closes first) ------------------------------------


class TestCloseWait:
    def test_fin_from_peer(self) -> None:
        peer = established()
        peer.send(b"bye")
        peer.fin()
        assert peer.state() == "CLOSE-WAIT"
        peer.expect(flags="A", ack=peer.seq)  # a FIN is acknowledged at once
        assert ev.TcpReadable(peer.flow) in peer.take_events()
        assert not peer.iface.tcp_at_eof(peer.flow)
        assert peer.recv_all() == b"bye"
        assert peer.iface.tcp_at_eof(peer.flow)

    def test_fin_carrying_data(self) -> None:
        peer = established()
        peer.fin(b"last words")
        assert peer.state() == "CLOSE-WAIT"
        peer.expect(flags="A", ack=peer.seq)
        assert peer.recv_all() == b"last words"
        assert peer.iface.tcp_at_eof(peer.flow)

    def test_out_of_order_fin(self) -> None:
        peer = established()
        start = peer.seq
        peer.tcp("FA", seq=start + 3, payload=b"def")
        peer.expect(flags="A", ack=start)
        assert peer.state() == "ESTABLISHED"
        peer.tcp("PA", seq=start, payload=b"abc")
        peer.seq = start + 7
        assert peer.state() == "CLOSE-WAIT"
        assert peer.recv_all() == b"abcdef"
        assert peer.iface.tcp_at_eof(peer.flow)
        peer.expect(flags="A", ack=start + 7)

    def test_we_can_still_send(self) -> None:
        peer = established()
        peer.fin()
        peer.take_frames()
        send_from_stack(peer, b"response")
        peer.expect(flags="PA", seq=peer.rcv_nxt, payload=b"response")

    def test_data_after_fin_ignored(self) -> None:
        peer = established()
        peer.fin()
        peer.take_frames()
        peer.tcp("PA", seq=peer.seq, payload=b"zombie")
        assert peer.recv_all() == b""

    def test_close_to_last_ack_to_closed(self) -> None:
        peer = established()
        peer.fin()
        peer.take_frames()
        peer.take_events()
        peer.iface.tcp_close(peer.flow, peer.now)
        peer.expect(flags="FA", seq=peer.rcv_nxt, ack=peer.seq)
        assert peer.state() == "LAST-ACK"
        assert peer.take_events() == []
        peer.ack(ack=peer.rcv_nxt + 1)
        assert peer.take_events() == [ev.TcpClosed(peer.flow, False, "closed")]
        assert peer.state() is None
        assert peer.iface.connection_count == 0
        peer.expect_none()

    def test_fin_after_queued_data(self) -> None:
        peer = established()
        peer.fin()
        peer.take_frames()
        send_from_stack(peer, b"tail")
        peer.iface.tcp_close(peer.flow, peer.now)
        segs = peer.segments()
        sent = b"".join(payload_of(s) for s in segs)
        assert sent == b"tail"
        assert segs[-1].flags.F and rel(segs[-1].seq + len(segs[-1].payload), peer.rcv_nxt) == 4
        assert peer.iface.tcp_send(peer.flow, b"late", peer.now) == 0

    def test_last_ack_fin_retransmitted(self) -> None:
        peer = established()
        peer.fin()
        peer.take_frames()
        peer.iface.tcp_close(peer.flow, peer.now)
        fin = peer.expect(flags="FA")
        peer.advance(1.0)
        peer.expect(flags="FA", seq=fin.seq)

    def test_retransmitted_fin_reacknowledged(self) -> None:
        peer = established()
        peer.fin()
        peer.take_frames()
        peer.tcp("FA", seq=peer.seq - 1)
        peer.expect(flags="A", ack=peer.seq)
        assert peer.state() == "CLOSE-WAIT"


# ----- FIN-WAIT-1, FIN-WAIT-2, CLOSING, TIME-WAIT (we close first) -----------------------------


class TestWeCloseFirst:
    def test_full_sequence(self) -> None:
        peer = established(TcpConfig(time_wait=30.0), now=100.0)
        peer.iface.tcp_close(peer.flow, peer.now)
        fin = peer.expect(flags="FA", seq=peer.rcv_nxt, ack=peer.seq)
        assert peer.state() == "FIN-WAIT-1"
        peer.ack(ack=fin.seq + 1)
        assert peer.state() == "FIN-WAIT-2"
        peer.expect_none()
        peer.rcv_nxt = fin.seq + 1
        peer.send(b"still talking")  # half-close: the sandbox may keep sending
        assert peer.recv_all() == b"still talking"
        peer.take_frames()
        assert closed_events(peer) == []
        peer.fin()
        assert peer.state() == "TIME-WAIT"
        peer.expect(flags="A", seq=fin.seq + 1, ack=peer.seq)
        assert closed_events(peer) == [ev.TcpClosed(peer.flow, False, "closed")]
        assert peer.iface.tcp_at_eof(peer.flow)
        peer.advance(29.0)
        assert peer.state() == "TIME-WAIT"
        peer.advance(1.0)
        assert peer.state() is None
        assert peer.iface.connection_count == 0
        assert closed_events(peer) == []  # TcpClosed only once
        peer.expect_none()

    def test_the_last_data_carries_the_fin_when_sent_with_close(self) -> None:
        peer = established()
        start = peer.rcv_nxt
        assert peer.iface.tcp_send(peer.flow, b"answer", peer.now, close=True) == 6
        peer.expect(flags="FPA", seq=start, payload=b"answer")  # one segment, not two
        assert peer.state() == "FIN-WAIT-1"
        assert peer.iface.tcp_send(peer.flow, b"more", peer.now) == 0
        peer.ack(ack=start + 7)
        assert peer.state() == "FIN-WAIT-2"

    def test_close_with_data_that_does_not_all_fit_sends_no_fin(self) -> None:
        peer = established(TcpConfig(snd_buffer=4), window=100)
        assert peer.iface.tcp_send(peer.flow, b"too long", peer.now, close=True) == 4
        peer.expect(flags="PA", payload=b"too ")
        assert peer.state() == "ESTABLISHED"

    def test_fin_and_ack_together(self) -> None:
        peer = established()
        peer.iface.tcp_close(peer.flow, peer.now)
        fin = peer.expect(flags="FA")
        peer.rcv_nxt = fin.seq + 1
        peer.fin()
        assert peer.state() == "TIME-WAIT"
        peer.expect(flags="A", ack=peer.seq)

    def test_no_send_after_close(self) -> None:
        peer = established()
        peer.iface.tcp_close(peer.flow, peer.now)
        assert peer.iface.tcp_send(peer.flow, b"x", peer.now) == 0
        assert peer.iface.tcp_send_space(peer.flow) == 0

    def test_fin_on_last_data_segment(self) -> None:
        peer = established(mss=1000)
        base = peer.rcv_nxt
        send_from_stack(peer, b"d" * 1500)
        peer.iface.tcp_close(peer.flow, peer.now)
        segs = peer.segments()
        assert sum(len(s.payload) for s in segs) == 1500
        last = segs[-1]
        fin_segs = [s for s in segs if s.flags.F]
        assert len(fin_segs) == 1 and fin_segs[0] is last
        peer.ack(ack=base + 1501)
        assert peer.state() == "FIN-WAIT-2"

    def test_data_acked_but_not_fin_stays_in_fin_wait_1(self) -> None:
        peer = established()
        base = peer.rcv_nxt
        send_from_stack(peer, b"abc")
        peer.iface.tcp_close(peer.flow, peer.now)
        peer.take_frames()
        peer.ack(ack=base + 3)
        assert peer.state() == "FIN-WAIT-1"
        peer.ack(ack=base + 4)
        assert peer.state() == "FIN-WAIT-2"

    def test_fin_retransmitted_in_fin_wait_1(self) -> None:
        peer = established()
        peer.iface.tcp_close(peer.flow, peer.now)
        fin = peer.expect(flags="FA")
        peer.advance(1.0)
        peer.expect(flags="FA", seq=fin.seq)
        peer.advance(2.0)
        peer.expect(flags="FA", seq=fin.seq)

    def test_simultaneous_close(self) -> None:
        peer = established()
        peer.iface.tcp_close(peer.flow, peer.now)
        fin = peer.expect(flags="FA")
        # The sandbox's FIN crosses ours: it does not acknowledge our FIN yet.
        peer.fin()
        assert peer.state() == "CLOSING"
        peer.expect(flags="A", seq=fin.seq + 1, ack=peer.seq)
        assert closed_events(peer) == []
        peer.ack(ack=fin.seq + 1)
        assert peer.state() == "TIME-WAIT"
        assert closed_events(peer) == [ev.TcpClosed(peer.flow, False, "closed")]

    def test_time_wait_reacknowledges_retransmitted_fin(self) -> None:
        peer = established()
        peer.iface.tcp_close(peer.flow, peer.now)
        fin = peer.expect(flags="FA")
        peer.rcv_nxt = fin.seq + 1
        peer.fin()
        peer.take_frames()
        peer.tcp("FA", seq=peer.seq - 1)  # our ACK of its FIN was lost
        peer.expect(flags="A", seq=fin.seq + 1, ack=peer.seq)
        assert peer.state() == "TIME-WAIT"

    def test_new_syn_in_time_wait_starts_new_connection(self) -> None:
        peer = established(isn=5000)
        peer.iface.tcp_close(peer.flow, peer.now)
        fin = peer.expect(flags="FA")
        peer.rcv_nxt = fin.seq + 1
        peer.fin()
        peer.take_frames()
        peer.take_events()
        assert peer.state() == "TIME-WAIT"
        peer.isn = peer.seq + 100_000  # a new incarnation, higher sequence numbers
        peer.now += 1.0
        peer.syn()
        assert peer.iface.take_events() == [ev.TcpConnectRequest(peer.flow)]
        assert peer.iface.tcp_accept(peer.flow, peer.now)
        peer.expect(flags="SA", ack=peer.isn + 1)
        assert peer.state() == "SYN-RECEIVED"

    def test_old_syn_in_time_wait_does_not(self) -> None:
        peer = established(isn=5000)
        peer.iface.tcp_close(peer.flow, peer.now)
        fin = peer.expect(flags="FA")
        peer.rcv_nxt = fin.seq + 1
        peer.fin()
        peer.take_frames()
        peer.take_events()
        peer.tcp("S", seq=4000, ack=0)
        assert peer.iface.take_events() == []
        peer.expect(flags="A", ack=peer.seq)
        assert peer.state() == "TIME-WAIT"


# ----- sequence-number wrap-around ------------------------------------------------------------


class TestWrapAround:
    def test_peer_isn_near_wrap(self) -> None:
        peer = established(isn=MOD - 3)
        start = peer.seq  # 2**32 - 2
        assert start == MOD - 2
        peer.send(b"0123456789")  # crosses zero
        assert peer.seq == 8
        assert peer.recv_all() == b"0123456789"
        peer.expect(flags="A", ack=8)
        # Out of order across the wrap as well.
        peer.tcp("PA", seq=13, payload=b"later")
        peer.expect(flags="A", ack=8)
        peer.tcp("PA", seq=8, payload=b"first")
        assert peer.recv_all() == b"firstlater"
        peer.expect(flags="A", ack=18)

    def test_our_isn_near_wrap(self) -> None:
        # ISN = 4 us clock + keyed hash (RFC 6528): find the `now` that puts ours just below
        # 2**32, then send across the wrap.
        probe = Peer(make_iface(), now=0.0)
        hashed = probe.handshake(accept=False).seq
        ticks = (MOD - 3 - hashed) % MOD
        now = (ticks + 0.5) / 250_000
        peer = established(mss=1000, now=now)
        assert peer.irs == MOD - 3
        base = peer.rcv_nxt
        send_from_stack(peer, b"w" * 2500)
        segs = peer.segments()
        assert [s.seq for s in segs] == [MOD - 2, 998, 1998]
        peer.ack(ack=998)
        peer.ack(ack=base + 2500)
        conn = peer.iface.connection(peer.flow)
        assert conn is not None and conn.snd_una == 2498 and conn.snd_una == conn.snd_nxt
        peer.iface.tcp_close(peer.flow, peer.now)
        peer.expect(flags="FA", seq=2498)
        peer.ack(ack=2499)
        assert peer.state() == "FIN-WAIT-2"
        assert ISN_KEY  # the ISN depends on the key: the probe used the same one
