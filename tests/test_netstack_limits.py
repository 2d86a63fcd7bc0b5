"""The connection table's bound: TIME-WAIT entries make room for new connections."""

from __future__ import annotations

from netstack_helpers import Peer, make_iface

from netstack import events as ev


def _to_time_wait(peer: Peer) -> None:
    peer.handshake()
    peer.iface.tcp_close(peer.flow, peer.now)
    fin = peer.expect(flags="FA", seq=peer.rcv_nxt, ack=peer.seq)
    peer.ack(ack=fin.seq + 1)
    peer.rcv_nxt = fin.seq + 1
    peer.fin()
    peer.take_frames()
    peer.iface.take_events()  # the interface is shared: leave no events for the next peer
    assert peer.state() == "TIME-WAIT"


def test_a_full_table_evicts_the_oldest_time_wait_entry() -> None:
    iface = make_iface(max_connections=2)
    old, older = Peer(iface, sport=40001), Peer(iface, sport=40002)
    _to_time_wait(older)
    _to_time_wait(old)
    new = Peer(iface, sport=40003)
    new.syn()
    assert iface.take_events() == [ev.TcpConnectRequest(new.flow)]
    assert iface.drops["tcp-time-wait-evicted"] == 1
    assert older.state() is None and old.state() == "TIME-WAIT"


def test_a_table_full_of_live_connections_refuses_with_a_reset() -> None:
    iface = make_iface(max_connections=1)
    Peer(iface, sport=40001).handshake()
    new = Peer(iface, sport=40002)
    new.syn()
    assert iface.take_events() == []
    new.expect(flags="RA", ack=new.seq)
    assert iface.drops["tcp-too-many-connections"] == 1
