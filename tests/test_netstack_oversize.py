"""netstack never raises into the engine: not for an oversize packet, not for a failing timer.

A DNS answer or a UDP/ICMP reply from the host can be far larger than one datagram to the
sandbox may be (the IPv4 total length is 16 bits, and the link has its MTU); the stack refuses
to frame it (`udp_send` returns False, the drop is counted) rather than raise out of the engine.
A connection whose timer fails (a bug) is reset and counted, as a frame that fails is dropped.
"""

from __future__ import annotations

import pytest
from netstack_helpers import REMOTE_IP, SANDBOX_IP, check_frame, make_iface
from scapy.layers.inet import UDP

from netstack import events as ev

V4 = ev.Flow("udp", SANDBOX_IP, 40000, REMOTE_IP, 53)
V6 = ev.Flow("udp", "fd00::100", 40000, "2001:db8::10", 53)


@pytest.mark.parametrize(("mtu", "flow", "limit"), [
    (65520, V4, 65520 - 28),
    (1500, V4, 1500 - 28),
    (65520, V6, 65520 - 48),
    (1280, V6, 1280 - 48),
])
def test_udp_payload_limit_follows_the_mtu(mtu: int, flow: ev.Flow, limit: int) -> None:
    iface = make_iface(mtu=mtu)
    assert iface.udp_payload_limit(flow) == limit
    assert iface.udp_send(flow, b"a" * limit)
    [frame] = iface.take_frames()
    assert len(frame) == 14 + mtu
    assert len(bytes(check_frame(frame)[UDP].payload)) == limit
    assert not iface.drops


@pytest.mark.parametrize("flow", [V4, V6])
@pytest.mark.parametrize("size", [1473, 65_000, 70_000])
def test_oversize_udp_reply_is_dropped_and_counted(flow: ev.Flow, size: int) -> None:
    iface = make_iface(mtu=1500)
    assert iface.udp_send(flow, b"x" * size) is False
    assert iface.take_frames() == []
    assert iface.drops == {"out-too-big": 1}


def test_a_reply_beyond_the_ipv4_length_field_is_dropped_at_the_largest_mtu() -> None:
    iface = make_iface()  # MTU 65520: 65,000 bytes of payload fit, 65,500 do not
    assert iface.udp_send(V4, b"x" * 65_000)
    assert iface.udp_send(V4, b"x" * 65_500) is False
    assert len(iface.take_frames()) == 1
    assert iface.drops == {"out-too-big": 1}


def test_oversize_echo_reply_is_dropped_and_counted() -> None:
    iface = make_iface(mtu=1500)
    request = ev.IcmpEchoRequest(ev.Flow("icmp", SANDBOX_IP, 7, REMOTE_IP, 0), 7, 1, b"")
    iface.icmp_echo_reply(request, b"p" * 1500)
    assert iface.take_frames() == []
    assert iface.drops == {"out-too-big": 1}
    iface.icmp_echo_reply(request, b"p" * (1500 - 28))
    assert len(iface.take_frames()) == 1


def test_a_failing_timer_ends_its_connection_not_the_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    from netstack_helpers import Peer

    from netstack.tcp import TcpConnection

    peer = Peer(make_iface())
    peer.handshake()
    peer.iface.tcp_send(peer.flow, b"data", peer.now)  # arms the retransmission timer
    peer.take_frames()

    def broken(self: TcpConnection, now: float) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(TcpConnection, "on_timer", broken)
    peer.advance(5.0)
    assert peer.iface.drops["internal-error-RuntimeError"] == 1
    assert peer.state() is None  # reset and forgotten
    assert [str(s.flags) for s in peer.segments()] == ["RA"]
