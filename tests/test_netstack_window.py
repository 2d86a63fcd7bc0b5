"""Window scaling to several megabytes, both ways (RFC 7323 §2)."""

from __future__ import annotations

from netstack_helpers import Peer, make_iface, payload_of

from netstack.tcp import TcpConfig

MB = 1 << 20


def test_we_offer_a_scaled_window_of_at_least_4_mb() -> None:
    peer = Peer(make_iface(tcp=TcpConfig(rcv_buffer=8 * MB, wscale=7)))
    synack = peer.handshake(wscale=7)
    assert ("WScale", 7) in synack.options
    peer.send(b"x")
    ack = peer.expect(flags="A", ack=peer.seq)
    assert ack.window << 7 >= 4 * MB


def test_we_fill_a_4_mb_window_the_peer_offers() -> None:
    peer = Peer(make_iface(tcp=TcpConfig(snd_buffer=8 * MB)))
    peer.handshake(wscale=7, window=65535)
    peer.ack(window=(4 * MB) >> 7)  # a scaled window update: 4 MiB
    assert peer.iface.tcp_send(peer.flow, bytes(6 * MB), peer.now) == 6 * MB
    sent = sum(len(payload_of(seg)) for seg in peer.segments())
    assert sent == 4 * MB  # exactly the window, no more


def test_without_scaling_the_window_stays_below_64_kb() -> None:
    peer = Peer(make_iface(tcp=TcpConfig(snd_buffer=8 * MB)))
    synack = peer.handshake(wscale=None, window=65535)
    assert not any(name == "WScale" for name, _ in synack.options)
    assert peer.iface.tcp_send(peer.flow, bytes(MB), peer.now) == MB
    assert sum(len(payload_of(seg)) for seg in peer.segments()) == 65535
