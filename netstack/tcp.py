"""TCP connection state machine (RFC 9293), passive side only.

How this works: the sandbox always opens connections, so each connection starts from a SYN
the interface has already shown to the caller (who decided to accept it). From there one
`TcpConnection` object holds every state variable RFC 9293 §3.3.1 names (SND.UNA, SND.NXT,
SND.WND, RCV.NXT, ...) and moves through the RFC's states, all transitions in this module.

- Receiving: `on_segment` follows the "SEGMENT ARRIVES" steps of §3.10.7.4 in order:
  acceptability, RST (with RFC 5961 §3 challenge ACKs), SYN (RFC 5961 §4), ACK, data, FIN.
  In-order data lands in a bounded receive buffer the caller drains with `recv`; the window we
  advertise is exactly the free space of that buffer, so a caller that drains slowly (because
  its host socket is slow) slows the sandbox down instead of growing memory. Out-of-order
  segments are held until the gap fills, bounded by the same window in bytes and by
  `ooo_segments` in number (a bare FIN takes no bytes but still a place). They are keyed by
  their position in the stream (sequence space counted from the SYN, never wrapped) in a
  dict, with a heap of those positions: holding one is O(log n), and in-order data only
  peeks at the smallest, so its cost does not grow with what is held.
- Sending: `send` appends to a bounded send buffer holding everything from SND.UNA on; segments
  are cut from it up to the peer's window and MSS. Retransmission uses an RFC 6298 timer (SRTT,
  RTTVAR, Karn's rule, exponential backoff, bounded retries), plus fast retransmit on the third
  duplicate ACK (RFC 5681 §3.2). A zero window is probed (§3.8.6.1).
- Timers are data: `deadline` is the next time `on_timer` must run; callers pass `now`.
- Output goes through the `TcpOutput` protocol (the interface), which frames and queues
  segments and records the events the caller sees.
"""

from __future__ import annotations

import enum
import heapq
from dataclasses import dataclass
from typing import Protocol

from netstack import seq
from netstack.events import Flow
from netstack.wire.tcp import ACK, FIN, PSH, RST, SYN, TcpSegment, syn_options


class State(enum.Enum):
    SYN_RECEIVED = "SYN-RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN-WAIT-1"
    FIN_WAIT_2 = "FIN-WAIT-2"
    CLOSING = "CLOSING"
    TIME_WAIT = "TIME-WAIT"
    CLOSE_WAIT = "CLOSE-WAIT"
    LAST_ACK = "LAST-ACK"
    CLOSED = "CLOSED"

    # Members are singletons: hash them by identity, in C (Enum's __hash__ is Python code,
    # and the state sets below are consulted for every segment).
    __hash__ = object.__hash__


# States in which the peer may still send us data (RFC 9293 §3.10.7.4, "seventh, process the
# segment text").
_RECEIVING = frozenset({State.ESTABLISHED, State.FIN_WAIT_1, State.FIN_WAIT_2})
# States in which we may still send data, and in which the caller may still queue it.
_SENDING = frozenset({State.ESTABLISHED, State.CLOSE_WAIT})
_QUEUEING = _SENDING | {State.SYN_RECEIVED}
_NOT_SENDING = frozenset({State.SYN_RECEIVED, State.CLOSED, State.TIME_WAIT})

DEFAULT_MSS_IPV4 = 536  # RFC 9293 §3.7.1: assumed when the SYN carries no MSS option
DEFAULT_MSS_IPV6 = 1220  # RFC 8200 §5 minimum MTU 1280, less the IPv6 and TCP headers
DUPACK_THRESHOLD = 3  # RFC 5681 §3.2


@dataclass(frozen=True)
class TcpConfig:
    rcv_buffer: int = 256 * 1024  # bytes of in-order data held for the caller (the window)
    ooo_segments: int = 512  # out-of-order segments held at most (their bytes: rcv_buffer)
    snd_buffer: int = 256 * 1024  # bytes from SND.UNA on the caller may queue
    wscale: int = 7  # our window-scale shift (RFC 7323 §2), when the peer offers scaling
    rto_initial: float = 1.0  # RFC 6298 §2.1
    rto_min: float = 0.2  # below RFC 6298's 1 s: a TAP link has sub-millisecond RTTs (as Linux)
    rto_max: float = 60.0  # RFC 6298 §2.5
    max_retries: int = 10  # retransmissions of one segment before the connection is reset
    time_wait: float = 30.0  # 2*MSL kept short: only stray FINs from our own sandbox arrive here
    persist_min: float = 0.2


class TcpOutput(Protocol):
    def tcp_emit(self, conn: TcpConnection, flags: int, seqno: int, ackno: int, window: int,
                 payload: bytes | bytearray | memoryview = b"", options: bytes = b"") -> None: ...
    def tcp_readable(self, conn: TcpConnection) -> None: ...
    def tcp_writable(self, conn: TcpConnection) -> None: ...
    def tcp_closed(self, conn: TcpConnection, reset: bool, reason: str) -> None: ...
    def tcp_timer_changed(self, conn: TcpConnection) -> None: ...
    def tcp_ack_due(self, conn: TcpConnection) -> None: ...
    def tcp_dropped(self, conn: TcpConnection, reason: str) -> None: ...


class TcpConnection:
    """One connection, created in SYN-RECEIVED from the peer's SYN when the caller accepts it."""

    def __init__(self, syn: TcpSegment, iss: int, now: float, mss_limit: int, cfg: TcpConfig,
                 out: TcpOutput, flow: Flow, key: tuple[bytes, int, bytes, int],
                 default_mss: int = DEFAULT_MSS_IPV4) -> None:
        self.flow = flow
        self.key = key  # the interface's table key
        self.heap_at: float | None = None  # the interface's timer-heap entry, if any
        self.cfg = cfg
        self.out = out
        self.state = State.SYN_RECEIVED
        # Receive side (RFC 9293 §3.3.1).
        self.irs = syn.seq
        self.rcv_nxt = seq.add(syn.seq, 1)
        self.rcv_buf = bytearray()
        self.rcv_pos = 0  # stream position of RCV.NXT: sequence space taken since the SYN
        # Out-of-order segments by stream position, and a min-heap of those positions.
        self.ooo: dict[int, tuple[bytes, bool]] = {}
        self.ooo_heap: list[int] = []
        self.ooo_bytes = 0
        self.peer_fin = False
        # Window scaling is on only when both SYNs carry the option (RFC 7323 §2.2).
        scaling = syn.wscale is not None
        self.snd_shift = min(syn.wscale or 0, 14) if scaling else 0
        self.rcv_shift = cfg.wscale if scaling else 0
        self.rcv_adv_edge = seq.add(self.rcv_nxt, self._rcv_window())
        # Send side.
        self.iss = iss
        self.snd_una = iss
        self.snd_nxt = seq.add(iss, 1)
        self.snd_max = self.snd_nxt  # highest sequence number sent (SND.NXT before a go-back)
        self.snd_wnd = syn.window  # the window in a SYN is never scaled (RFC 7323 §2.2)
        self.snd_wl1 = syn.seq
        self.snd_wl2 = iss
        self.snd_mss = max(64, min(syn.mss or default_mss, mss_limit))
        self.our_mss = mss_limit
        self.snd_buf = bytearray()
        self.buf_seq = seq.add(iss, 1)  # sequence number of snd_buf[0]
        self.fin_queued = False  # the caller closed: FIN follows the last queued byte
        self.dupacks = 0
        # RFC 6298 state.
        self.rto = cfg.rto_initial
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rtt_seq: int | None = None
        self.rtt_start = 0.0
        self.retries = 0
        self.rtx_at: float | None = None
        self.persist_at: float | None = None
        self.persist_backoff = cfg.persist_min
        self.persist_unanswered = 0  # zero-window probes sent since the peer last acknowledged
        self.time_wait_at: float | None = None
        self.ack_pending = False
        self.closed_reported = False
        self.readable_flagged = False
        self.writable_flagged = False
        self.now = now
        self._send_syn_ack()
        self._arm_rtx(now)

    # ----- queries --------------------------------------------------------------------------

    @property
    def deadline(self) -> float | None:
        soonest = None
        for when in (self.rtx_at, self.persist_at, self.time_wait_at):
            if when is not None and (soonest is None or when < soonest):
                soonest = when
        return soonest

    @property
    def send_space(self) -> int:
        if self.fin_queued or self.state not in _QUEUEING:
            return 0
        return max(0, self.cfg.snd_buffer - len(self.snd_buf))

    @property
    def at_eof(self) -> bool:
        """The peer has finished sending and the caller has read everything."""
        return self.peer_fin and not self.rcv_buf

    @property
    def finished(self) -> bool:
        return self.state in (State.CLOSED, State.TIME_WAIT)

    @property
    def fin_seq(self) -> int:
        """Sequence number our FIN takes: right after the last byte queued."""
        return seq.add(self.buf_seq, len(self.snd_buf))

    @property
    def fin_sent(self) -> bool:
        return self.fin_queued and seq.lt(self.fin_seq, self.snd_max)

    def _rcv_window(self) -> int:
        return max(0, self.cfg.rcv_buffer - len(self.rcv_buf))

    def _window_field(self) -> int:
        return min(self._rcv_window() >> self.rcv_shift, 0xFFFF)

    # ----- output helpers --------------------------------------------------------------------

    def _emit(self, flags: int, seqno: int, payload: bytes | bytearray | memoryview = b"",
              options: bytes = b"") -> None:
        window = self._window_field()
        edge = seq.add(self.rcv_nxt, window << self.rcv_shift)
        if seq.lt(self.rcv_adv_edge, edge):
            self.rcv_adv_edge = edge
        self.ack_pending = False
        self.out.tcp_emit(self, flags, seqno, self.rcv_nxt, window, payload, options)

    def _send_syn_ack(self) -> None:
        window = min(self._rcv_window(), 0xFFFF)  # RFC 7323 §2.2: a SYN's window is unscaled
        opts = syn_options(self.our_mss, self.rcv_shift if self.snd_shift or self.rcv_shift
                           else None)
        self.ack_pending = False
        self.out.tcp_emit(self, SYN | ACK, self.iss, self.rcv_nxt, window, b"", opts)

    def send_ack(self) -> None:
        if self.state not in (State.CLOSED, State.SYN_RECEIVED):
            self._emit(ACK, self.snd_nxt)

    def _ack_later(self) -> None:
        if not self.ack_pending:
            self.ack_pending = True
            self.out.tcp_ack_due(self)

    def _arm_rtx(self, now: float) -> None:
        self.rtx_at = now + self.rto
        self.out.tcp_timer_changed(self)

    # ----- caller API -----------------------------------------------------------------------

    def send(self, data: bytes | bytearray | memoryview, now: float,
             close: bool = False) -> int:
        """Queue up to `send_space` bytes for the peer; returns how many were taken. With
        `close`, and when all of `data` was taken, the FIN follows it at once (as `close()`
        after it, but the last segment carries it: one frame less)."""
        self.now = now
        n = min(len(data), self.send_space)
        if n:
            self.snd_buf += data[:n]
            self.writable_flagged = False
            if close and n == len(data):
                self.fin_queued = True
            self._output(now)
        return n

    def recv(self, max_bytes: int) -> bytes | bytearray:
        """Take up to `max_bytes` of in-order data; opens the window by as much. When all of
        the buffer is taken, the buffer itself is handed over (no copy)."""
        if not self.rcv_buf:
            self.readable_flagged = False
            return b""
        was_window = self._rcv_window()
        data: bytes | bytearray
        if max_bytes >= len(self.rcv_buf):
            data, self.rcv_buf = self.rcv_buf, bytearray()
        else:
            data = bytes(memoryview(self.rcv_buf)[:max_bytes])
            del self.rcv_buf[:max_bytes]
        if not self.rcv_buf:
            self.readable_flagged = False
        # Window update (RFC 9293 §3.8.6.2.2, receiver-side SWS avoidance): announce the
        # opening once it is worth a full segment or half the buffer.
        grown = self._rcv_window() - was_window
        if self.state in _RECEIVING and (
            was_window < self.our_mss or grown >= min(self.cfg.rcv_buffer // 2, self.our_mss)
        ):
            self._ack_later()
        return data

    def close(self, now: float) -> None:
        """The caller has no more to send: FIN after the queued data (half-close)."""
        if self.fin_queued or self.state not in _QUEUEING:
            return
        self.now = now
        self.fin_queued = True
        self._output(now)

    def abort(self, reason: str = "aborted") -> None:
        """Reset the connection (RFC 9293 §3.10.5 ABORT)."""
        if self.state not in (State.CLOSED, State.TIME_WAIT):
            self.out.tcp_emit(self, RST | ACK, self.snd_nxt, self.rcv_nxt, 0)
        self._to_closed(reset=True, reason=reason)

    # ----- sending --------------------------------------------------------------------------

    def _output(self, now: float) -> None:
        """Send what the peer's window allows from SND.NXT on, then the FIN if one is due."""
        if self.state in _NOT_SENDING:
            return
        offset = seq.diff(self.snd_nxt, self.buf_seq)
        total = len(self.snd_buf)
        if offset >= total and not self.fin_queued:  # nothing to send (the usual ACK)
            if self.persist_at is not None:
                self._update_persist(now)
            return
        wnd_end = seq.add(self.snd_una, self.snd_wnd)
        sent_any = False
        while offset < total:
            usable = seq.diff(wnd_end, self.snd_nxt)
            if usable <= 0:
                break
            n = min(self.snd_mss, total - offset, usable)
            last = offset + n == total
            fin = last and self.fin_queued
            flags = ACK | (PSH if last else 0) | (FIN if fin else 0)
            self._emit(flags, self.snd_nxt, self.snd_buf[offset:offset + n])
            self._start_rtt(self.snd_nxt, now)
            self.snd_nxt = seq.add(self.snd_nxt, n + (1 if fin else 0))
            offset += n
            sent_any = True
            if fin:
                self._on_fin_sent()
        if offset == total and self.fin_queued and self.snd_nxt == self.fin_seq:
            self._emit(FIN | ACK, self.snd_nxt)
            self.snd_nxt = seq.add(self.snd_nxt, 1)
            self._on_fin_sent()
            sent_any = True
        if seq.lt(self.snd_max, self.snd_nxt):
            self.snd_max = self.snd_nxt
        if sent_any and self.rtx_at is None:
            self._arm_rtx(now)
        self._update_persist(now)

    def _on_fin_sent(self) -> None:
        if self.state == State.ESTABLISHED:
            self.state = State.FIN_WAIT_1
        elif self.state == State.CLOSE_WAIT:
            self.state = State.LAST_ACK

    def _start_rtt(self, seqno: int, now: float) -> None:
        if self.rtt_seq is None and self.retries == 0:
            self.rtt_seq = seqno
            self.rtt_start = now

    def _update_persist(self, now: float) -> None:
        """Zero-window probing (RFC 9293 §3.8.6.1): data waits and nothing is in flight."""
        waiting = seq.diff(self.snd_nxt, self.buf_seq) < len(self.snd_buf)
        need = self.snd_wnd == 0 and waiting and self.snd_una == self.snd_nxt
        if need and self.persist_at is None:
            self.persist_at = now + self.persist_backoff
            self.out.tcp_timer_changed(self)
        elif not need and self.persist_at is not None:
            self.persist_at = None
            self.persist_backoff = self.cfg.persist_min
            self.out.tcp_timer_changed(self)

    # ----- timers ---------------------------------------------------------------------------

    def on_timer(self, now: float) -> None:
        self.now = now
        if self.time_wait_at is not None and now >= self.time_wait_at:
            self.time_wait_at = None
            self.state = State.CLOSED
            self.out.tcp_timer_changed(self)
            return
        if self.persist_at is not None and now >= self.persist_at:
            # A probe with an already-acknowledged sequence number draws an ACK that carries
            # the peer's current window, without putting any new data in flight. The connection
            # stays open while probes are answered (§3.8.6.1 MUST); unanswered ones are bounded.
            self.persist_at = None
            self.persist_unanswered += 1
            if self.persist_unanswered > self.cfg.max_retries:
                self.abort("timeout")
                return
            self._emit(ACK, seq.add(self.snd_una, -1))
            self.persist_backoff = min(self.persist_backoff * 2, self.cfg.rto_max)
            self._update_persist(now)
        if self.rtx_at is not None and now >= self.rtx_at:
            self._retransmit_timeout(now)

    def _retransmit_timeout(self, now: float) -> None:
        """RFC 6298 §5.4-5.6: retransmit the earliest unacknowledged segment and back off."""
        if self.snd_wnd == 0 and self.state != State.SYN_RECEIVED:
            # The peer shrank its window to zero under data in flight: nothing may be resent
            # into it, so this is not a lost segment. Go back and probe the window instead.
            self.snd_nxt = self.snd_una
            self.rtx_at = None
            self.out.tcp_timer_changed(self)
            self._update_persist(now)
            return
        self.retries += 1
        if self.retries > self.cfg.max_retries:
            self.abort("timeout")
            return
        self.rto = min(self.rto * 2, self.cfg.rto_max)
        self.rtt_seq = None  # Karn's rule: no RTT samples from retransmitted data
        self.dupacks = 0
        if self.state == State.SYN_RECEIVED:
            self._send_syn_ack()
        else:
            # Go back to SND.UNA; _output resends data (and the FIN) as the window allows.
            self.snd_nxt = self.snd_una
            self.rtx_at = None
            self._output(now)
        self.rtx_at = now + self.rto
        self.out.tcp_timer_changed(self)

    # ----- receiving ------------------------------------------------------------------------

    def on_segment(self, seg: TcpSegment, now: float) -> None:
        """Process one segment for this connection (RFC 9293 §3.10.7.4)."""
        flags = seg.flags
        if self.state == State.CLOSED:
            return
        self.now = now
        # A retransmitted SYN while our SYN-ACK is outstanding: answer it again.
        if self.state == State.SYN_RECEIVED and flags & SYN and not flags & ACK:
            if seg.seq == self.irs:
                self._send_syn_ack()
            return
        # First: sequence number acceptability.
        if not self._acceptable(seg):
            if flags & RST:
                return
            # With our window at zero nothing is acceptable, but a valid ACK still counts
            # (§3.10.7.4: "special allowance should be made to accept valid ACKs").
            if flags & ACK and seg.seq == self.rcv_nxt and not (flags & SYN) and \
                    seq.diff(self.rcv_adv_edge, self.rcv_nxt) <= 0 and \
                    self.state != State.SYN_RECEIVED:
                if self._process_ack(seg, now):
                    self._output(now)
            if self.state != State.CLOSED:
                self._emit(ACK, self.snd_nxt)
            return
        # Second: RST (RFC 5961 §3.2: only an exact match resets; in-window draws a challenge).
        if flags & RST:
            if seg.seq == self.rcv_nxt:
                self._to_closed(reset=True, reason="reset by sandbox")
            else:
                self._emit(ACK, self.snd_nxt)
            return
        # Fourth: SYN in a synchronized state (RFC 5961 §4): challenge ACK.
        if flags & SYN:
            self._emit(ACK, self.snd_nxt)
            return
        # Fifth: ACK.
        if not flags & ACK:
            return
        if not self._process_ack(seg, now):
            return
        # Seventh: segment text.
        if (seg.payload or flags & FIN) and self.state in _RECEIVING:
            self._process_data(seg)
        elif flags & FIN and self.state in (State.CLOSE_WAIT, State.CLOSING, State.LAST_ACK,
                                            State.TIME_WAIT):
            # A retransmitted FIN: acknowledge it again (and restart TIME-WAIT, §3.10.7.4).
            self._emit(ACK, self.snd_nxt)
            if self.state == State.TIME_WAIT:
                self._enter_time_wait(now)
        self._output(now)

    def _acceptable(self, seg: TcpSegment) -> bool:
        """RFC 9293 §3.10.7.4 table: the segment overlaps the receive window."""
        length = seg.seg_len - (1 if seg.flags & SYN else 0)
        wnd = seq.diff(self.rcv_adv_edge, self.rcv_nxt)
        if wnd <= 0:
            return length == 0 and seg.seq == self.rcv_nxt
        if length == 0:
            return seq.in_window(seg.seq, self.rcv_nxt, wnd)
        return seq.in_window(seg.seq, self.rcv_nxt, wnd) or seq.in_window(
            seq.add(seg.seq, length - 1), self.rcv_nxt, wnd)

    def _process_ack(self, seg: TcpSegment, now: float) -> bool:
        ack = seg.ack
        if self.state == State.SYN_RECEIVED:
            if not (seq.lt(self.snd_una, ack) and seq.le(ack, self.snd_nxt)):
                # RFC 9293: an unacceptable ACK in SYN-RECEIVED gets a reset.
                self.out.tcp_emit(self, RST, ack, 0, 0)
                return False
            self.state = State.ESTABLISHED
            self.snd_una = ack
            self.snd_wnd = seg.window << self.snd_shift
            self.snd_wl1, self.snd_wl2 = seg.seq, ack
            # RFC 6298 §5.7: after a retransmitted SYN(-ACK), RTO is 3 s until data is timed.
            self.rto = 3.0 if self.retries else self.rto if self.srtt else self.cfg.rto_initial
            self.retries = 0
            self.rtx_at = None
            self.out.tcp_timer_changed(self)
            if self.fin_queued or self.snd_buf:
                self._output(now)
            self._signal_writable()
            return True
        if seq.lt(self.snd_max, ack):
            # ACK for data never sent: acknowledge and drop (§3.10.7.4, fifth, ESTABLISHED).
            self._emit(ACK, self.snd_nxt)
            return False
        if seq.lt(self.snd_una, ack):
            self._ack_advanced(ack, now)
        elif (ack == self.snd_una and not seg.payload and not seg.flags & FIN
              and self.snd_una != self.snd_max and (seg.window << self.snd_shift) == self.snd_wnd):
            self.dupacks += 1
            if self.dupacks == DUPACK_THRESHOLD:
                self._fast_retransmit()
        self.persist_unanswered = 0  # the peer is alive: it answered
        # Window update (§3.10.7.4: SND.WL1/SND.WL2 rule).
        if seq.lt(self.snd_wl1, seg.seq) or (
            self.snd_wl1 == seg.seq and seq.le(self.snd_wl2, ack)
        ):
            self.snd_wnd = seg.window << self.snd_shift
            self.snd_wl1, self.snd_wl2 = seg.seq, ack
        self._update_persist(now)
        # Our FIN acknowledged?
        if self.fin_sent and seq.lt(self.fin_seq, ack):
            if self.state == State.FIN_WAIT_1:
                self.state = State.FIN_WAIT_2
            elif self.state == State.CLOSING:
                self._enter_time_wait(now)
            elif self.state == State.LAST_ACK:
                self._to_closed(reset=False, reason="closed")
                return False
        return True

    def _ack_advanced(self, ack: int, now: float) -> None:
        acked = seq.diff(ack, self.snd_una)
        self.snd_una = ack
        self.dupacks = 0
        self.persist_unanswered = 0
        data_acked = min(seq.diff(ack, self.buf_seq), len(self.snd_buf))
        if data_acked > 0:
            del self.snd_buf[:data_acked]
            self.buf_seq = seq.add(self.buf_seq, data_acked)
        if seq.lt(self.snd_nxt, self.snd_una):
            self.snd_nxt = self.snd_una  # after a go-back, the peer had more than we resent
        if self.rtt_seq is not None and seq.lt(self.rtt_seq, ack):
            self._rtt_sample(now - self.rtt_start)
            self.rtt_seq = None
        self.retries = 0
        # RFC 6298 §5.2/5.3: stop the timer when all is acknowledged, else restart it.
        self.rtx_at = None if self.snd_una == self.snd_max else now + self.rto
        self.out.tcp_timer_changed(self)
        if acked > 0 and data_acked > 0:
            self._signal_writable()

    def _rtt_sample(self, r: float) -> None:
        """RFC 6298 §2.2-2.3 with alpha = 1/8, beta = 1/4, G ignored (sub-ms clock)."""
        if self.srtt is None:
            self.srtt, self.rttvar = r, r / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - r)
            self.srtt = 0.875 * self.srtt + 0.125 * r
        self.rto = min(max(self.srtt + 4 * self.rttvar, self.cfg.rto_min), self.cfg.rto_max)

    def _fast_retransmit(self) -> None:
        """RFC 5681 §3.2: resend the segment at SND.UNA without waiting for the timer."""
        offset = seq.diff(self.snd_una, self.buf_seq)
        if 0 <= offset < len(self.snd_buf):
            n = min(self.snd_mss, len(self.snd_buf) - offset)
            self._emit(ACK | PSH, self.snd_una, self.snd_buf[offset:offset + n])
        elif self.fin_queued and self.snd_una == self.fin_seq:
            self._emit(FIN | ACK, self.fin_seq)
        self.rtt_seq = None

    def _process_data(self, seg: TcpSegment) -> None:
        data: bytes | memoryview = seg.payload
        fin = bool(seg.flags & FIN)
        start = seg.seq
        # Trim what we already have from the front...
        skip = seq.diff(self.rcv_nxt, start)
        if skip > 0:
            if skip > len(data):
                self._ack_later()  # a pure duplicate: re-acknowledge
                return
            data = data[skip:]
            start = self.rcv_nxt
        # ...and what lies beyond the window we offered from the back.
        room = seq.diff(self.rcv_adv_edge, start)
        if len(data) > room:
            data = data[:max(room, 0)]
            fin = False
        if start == self.rcv_nxt:
            if data:
                self.rcv_buf += data
                self._rcv_advance(len(data))
            if fin:
                self._peer_fin()
            if self.ooo_heap:
                self._drain_ooo()
            self._signal_readable()
            if fin or self.peer_fin:
                self._emit(ACK, self.snd_nxt)
            else:
                self._ack_later()
        else:
            self._hold_out_of_order(self.rcv_pos + seq.diff(start, self.rcv_nxt), data, fin)
            # An immediate duplicate ACK lets the peer fast-retransmit (RFC 5681 §4.2).
            self._emit(ACK, self.snd_nxt)

    def _rcv_advance(self, n: int) -> None:
        self.rcv_nxt = seq.add(self.rcv_nxt, n)
        self.rcv_pos += n

    def _hold_out_of_order(self, pos: int, data: bytes | memoryview, fin: bool) -> None:
        """Keep a segment that starts beyond RCV.NXT, at stream position `pos`, for later."""
        if pos in self.ooo:
            return  # the first copy held stands
        if len(self.ooo) >= self.cfg.ooo_segments or \
                self.ooo_bytes + len(data) > self.cfg.rcv_buffer:
            self.out.tcp_dropped(self, "tcp-out-of-order-full")
            return
        self.ooo[pos] = (bytes(data), fin)
        heapq.heappush(self.ooo_heap, pos)
        self.ooo_bytes += len(data)

    def _drain_ooo(self) -> None:
        """Move the held segments that in-order data has reached into the receive buffer."""
        heap = self.ooo_heap
        while heap and heap[0] <= self.rcv_pos:
            pos = heapq.heappop(heap)
            data, fin = self.ooo.pop(pos)
            self.ooo_bytes -= len(data)
            skip = self.rcv_pos - pos
            if skip < len(data):
                self.rcv_buf += data[skip:]
                self._rcv_advance(len(data) - skip)
            if fin and pos + len(data) == self.rcv_pos and not self.peer_fin:
                self._peer_fin()
        if self.peer_fin:
            self._clear_ooo()

    def _clear_ooo(self) -> None:
        self.ooo.clear()
        self.ooo_heap.clear()
        self.ooo_bytes = 0

    def _peer_fin(self) -> None:
        self.peer_fin = True
        self._rcv_advance(1)
        if self.state == State.ESTABLISHED:
            self.state = State.CLOSE_WAIT
        elif self.state == State.FIN_WAIT_1:
            self.state = State.CLOSING
        elif self.state == State.FIN_WAIT_2:
            self._enter_time_wait(self.now)

    # ----- endings --------------------------------------------------------------------------

    def _enter_time_wait(self, now: float) -> None:
        self.state = State.TIME_WAIT
        self.rtx_at = None
        self.persist_at = None
        self.time_wait_at = now + self.cfg.time_wait
        self.out.tcp_timer_changed(self)
        self._report_closed(reset=False, reason="closed")

    def _to_closed(self, reset: bool, reason: str) -> None:
        self.state = State.CLOSED
        self.rtx_at = self.persist_at = self.time_wait_at = None
        self.snd_buf.clear()
        self._clear_ooo()
        if reset:
            self.rcv_buf.clear()
        self.out.tcp_timer_changed(self)
        self._report_closed(reset, reason)

    def _report_closed(self, reset: bool, reason: str) -> None:
        if not self.closed_reported:
            self.closed_reported = True
            self.out.tcp_closed(self, reset, reason)

    def _signal_readable(self) -> None:
        if not self.readable_flagged:
            self.readable_flagged = True
            self.out.tcp_readable(self)

    def _signal_writable(self) -> None:
        if not self.writable_flagged and self.send_space > 0:
            self.writable_flagged = True
            self.out.tcp_writable(self)
