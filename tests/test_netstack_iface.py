"""netstack.iface: link-level duties (ARP, ICMP echo, drops), UDP, and TCP flow admission."""

from __future__ import annotations

import pytest
from netstack_helpers import (
    DNS_IP,
    GATEWAY_IP,
    GATEWAY_MAC,
    REMOTE_IP,
    REMOTE_IP_2,
    REMOTE_IP_3,
    SANDBOX_IP,
    SANDBOX_MAC,
    Peer,
    check_frame,
    ip_frame,
    make_iface,
    take,
)
from scapy.compat import raw
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, UDPerror
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from netstack import events as ev
from netstack.iface import Interface


def arp_request(target: str, psrc: str = SANDBOX_IP, hwsrc: str = SANDBOX_MAC,
                eth_src: str = SANDBOX_MAC, op: int = 1) -> bytes:
    return raw(Ether(dst="ff:ff:ff:ff:ff:ff", src=eth_src)
               / ARP(op=op, hwsrc=hwsrc, psrc=psrc, hwdst="00:00:00:00:00:00", pdst=target))


def only_drop(iface: Interface, reason: str) -> None:
    assert iface.drops == {reason: 1}, dict(iface.drops)


# ----- ARP ------------------------------------------------------------------------------------


class TestArp:
    @pytest.mark.parametrize("target", [GATEWAY_IP, DNS_IP])
    def test_request_for_gateway_and_dns_answered(self, target: str) -> None:
        iface = make_iface()
        iface.receive(arp_request(target), 1.0)
        [reply] = take(iface)
        assert (reply.dst, reply.src, reply.type) == (SANDBOX_MAC, GATEWAY_MAC, 0x0806)
        a = reply[ARP]
        assert (a.op, a.hwsrc, a.psrc, a.hwdst, a.pdst) == (
            2, GATEWAY_MAC, target, SANDBOX_MAC, SANDBOX_IP)
        assert not iface.drops and not iface.take_events()

    def test_unicast_request_answered(self) -> None:
        iface = make_iface()
        frame = raw(Ether(dst=GATEWAY_MAC, src=SANDBOX_MAC)
                    / ARP(op=1, hwsrc=SANDBOX_MAC, psrc=SANDBOX_IP, pdst=GATEWAY_IP))
        iface.receive(frame, 1.0)
        assert len(take(iface)) == 1

    @pytest.mark.parametrize("target", ["10.0.2.1", "10.0.2.4", SANDBOX_IP, REMOTE_IP])
    def test_request_for_other_addresses_ignored(self, target: str) -> None:
        iface = make_iface()
        iface.receive(arp_request(target), 1.0)
        assert take(iface) == []
        only_drop(iface, "arp-not-ours")

    @pytest.mark.parametrize(("psrc", "hwsrc"), [
        ("10.0.2.50", SANDBOX_MAC),  # another IP claiming our sandbox's MAC
        (SANDBOX_IP, "02:00:00:00:00:99"),  # ARP sender MAC differs from the Ethernet source
    ])
    def test_foreign_sender_ignored(self, psrc: str, hwsrc: str) -> None:
        iface = make_iface()
        iface.receive(arp_request(GATEWAY_IP, psrc=psrc, hwsrc=hwsrc), 1.0)
        assert take(iface) == []
        only_drop(iface, "arp-foreign-sender")

    def test_reply_is_not_answered(self) -> None:
        iface = make_iface()
        iface.receive(arp_request(GATEWAY_IP, op=2), 1.0)
        assert take(iface) == []
        only_drop(iface, "arp-not-request")

    def test_malformed(self) -> None:
        iface = make_iface()
        iface.receive(arp_request(GATEWAY_IP)[:14 + 27], 1.0)
        only_drop(iface, "arp-malformed")


# ----- Ethernet and IPv4 drops ----------------------------------------------------------------


class TestDrops:
    def test_frame_for_another_mac(self) -> None:
        iface = make_iface()
        iface.receive(raw(Ether(dst="02:00:00:00:00:77", src=SANDBOX_MAC)
                          / ARP(op=1, hwsrc=SANDBOX_MAC, psrc=SANDBOX_IP, pdst=GATEWAY_IP)), 1.0)
        assert take(iface) == []
        only_drop(iface, "eth-not-for-us")

    @pytest.mark.parametrize(("frame", "reason"), [
        (b"", "eth-truncated"),
        (bytes.fromhex("525500000202020000000001"), "eth-truncated"),
        (raw(Ether(dst=GATEWAY_MAC, src=SANDBOX_MAC, type=0x88CC) / (b"x" * 40)),
         "eth-unknown-type"),
    ], ids=["empty", "12-bytes", "lldp"])
    def test_link_layer(self, frame: bytes, reason: str) -> None:
        iface = make_iface()
        iface.receive(frame, 1.0)
        assert take(iface) == []
        only_drop(iface, reason)

    def test_fragment_dropped_and_counted(self) -> None:
        iface = make_iface()
        iface.receive(ip_frame(UDP(sport=5000, dport=53) / (b"x" * 8), flags="MF"), 1.0)
        iface.receive(ip_frame(Raw(b"y" * 8), frag=3, proto=17), 1.0)
        assert iface.drops == {"ipv4-fragment": 2}
        assert take(iface) == [] and iface.take_events() == []

    def test_bad_ip_checksum(self) -> None:
        iface = make_iface()
        frame = bytearray(ip_frame(UDP(sport=5000, dport=53) / b"q"))
        frame[14 + 10] ^= 0x55
        iface.receive(bytes(frame), 1.0)
        only_drop(iface, "ipv4-bad-checksum")

    def test_spoofed_source(self) -> None:
        iface = make_iface()
        iface.receive(ip_frame(UDP(sport=5000, dport=53) / b"q", src="10.0.2.99"), 1.0)
        iface.receive(ip_frame(TCP(sport=5000, dport=80, flags="S"), src=REMOTE_IP_2), 1.0)
        assert iface.drops == {"ipv4-foreign-source": 2}
        assert iface.take_events() == [] and take(iface) == []

    @pytest.mark.parametrize("dst", ["224.0.0.1", "239.255.255.250", "255.255.255.255",
                                     "127.0.0.1", "0.0.0.0"])
    def test_bad_destination(self, dst: str) -> None:
        iface = make_iface()
        iface.receive(ip_frame(UDP(sport=5000, dport=53) / b"q", dst=dst), 1.0)
        only_drop(iface, "ipv4-bad-destination")
        assert iface.take_events() == []

    def test_unknown_protocol(self) -> None:
        iface = make_iface()
        iface.receive(ip_frame(Raw(b"gre!"), proto=47), 1.0)
        only_drop(iface, "ipv4-unknown-protocol")

    def test_truncated_ip(self) -> None:
        iface = make_iface()
        iface.receive(ip_frame(UDP(sport=5000, dport=53) / b"q")[:30], 1.0)
        only_drop(iface, "ipv4-truncated")


# ----- ICMP -----------------------------------------------------------------------------------


class TestIcmpEcho:
    @pytest.mark.parametrize("dst", [GATEWAY_IP, DNS_IP])
    def test_echo_to_gateway_answered(self, dst: str) -> None:
        iface = make_iface()
        iface.receive(ip_frame(ICMP(type=8, id=0xBEEF, seq=42) / b"0123456789abcdefX", dst=dst),
                      1.0)
        [reply] = take(iface)
        assert reply.dst == SANDBOX_MAC
        assert (reply[IP].src, reply[IP].dst) == (dst, SANDBOX_IP)
        icmp = reply[ICMP]
        assert (icmp.type, icmp.code, icmp.id, icmp.seq) == (0, 0, 0xBEEF, 42)
        assert bytes(icmp.payload) == b"0123456789abcdefX"
        assert not iface.drops

    def test_echo_reply_with_all_zero_fields_has_valid_checksum(self) -> None:
        # id 0, seq 0, no data: the reply's words sum to zero, so its checksum must be 0xFFFF
        # (RFC 1071); check_frame asks scapy to recompute it.
        iface = make_iface()
        iface.receive(ip_frame(ICMP(type=8, id=0, seq=0), dst=GATEWAY_IP), 1.0)
        [reply] = take(iface)
        assert reply[ICMP].chksum == 0xFFFF

    def test_echo_to_remote_not_answered_by_the_stack(self) -> None:
        # The stack never answers for a remote host by itself: the echo is dropped and
        # counted, or handed to the caller as an event (policy decides), never replied to here.
        iface = make_iface()
        iface.receive(ip_frame(ICMP(type=8, id=1, seq=1) / b"hi", dst=REMOTE_IP_3), 1.0)
        assert take(iface) == []
        events = iface.take_events()
        if iface.drops:
            only_drop(iface, "icmp-echo-not-local")
            assert events == []
        else:
            [event] = events
            assert event.flow.dst == REMOTE_IP_3 and event.flow.src == SANDBOX_IP

    def test_other_icmp_dropped(self) -> None:
        iface = make_iface()
        iface.receive(ip_frame(ICMP(type=0, id=1, seq=1), dst=GATEWAY_IP), 1.0)
        only_drop(iface, "icmp-not-echo-request")

    def test_bad_icmp_checksum(self) -> None:
        iface = make_iface()
        iface.receive(ip_frame(ICMP(type=8, chksum=0x1234) / b"x", dst=GATEWAY_IP), 1.0)
        only_drop(iface, "icmp-malformed")


# ----- UDP ------------------------------------------------------------------------------------


class TestUdp:
    def test_datagram_event(self) -> None:
        iface = make_iface()
        frame = ip_frame(UDP(sport=5353, dport=53) / b"dns query", dst=DNS_IP)
        iface.receive(frame, 1.0)
        [event] = iface.take_events()
        assert isinstance(event, ev.UdpDatagram)
        assert event.flow == ev.Flow("udp", SANDBOX_IP, 5353, DNS_IP, 53)
        assert event.payload == b"dns query"
        assert event.quote == frame[14:14 + 28]
        assert take(iface) == [] and not iface.drops

    def test_ethernet_padding_is_not_payload(self) -> None:
        iface = make_iface()
        frame = ip_frame(UDP(sport=5353, dport=9) / b"ab", dst=REMOTE_IP)
        iface.receive(frame + b"\x00" * (60 - len(frame)), 1.0)
        [event] = iface.take_events()
        assert isinstance(event, ev.UdpDatagram) and event.payload == b"ab"

    def test_zero_checksum_accepted(self) -> None:
        iface = make_iface()
        iface.receive(ip_frame(UDP(sport=5000, dport=7, chksum=0) / b"nocsum"), 1.0)
        [event] = iface.take_events()
        assert isinstance(event, ev.UdpDatagram) and event.payload == b"nocsum"

    @pytest.mark.parametrize(("layer", "reason"), [
        (UDP(sport=5000, dport=7, chksum=0x1234) / b"x", "udp-bad-checksum"),
        (UDP(sport=0, dport=7) / b"x", "udp-port-zero"),
        (UDP(sport=5000, dport=0) / b"x", "udp-port-zero"),
        (UDP(sport=5000, dport=7, len=50, chksum=0) / b"x", "udp-bad-length"),
    ])
    def test_bad_datagrams(self, layer: UDP, reason: str) -> None:
        iface = make_iface()
        iface.receive(ip_frame(layer), 1.0)
        only_drop(iface, reason)
        assert iface.take_events() == []

    def test_udp_send(self) -> None:
        iface = make_iface()
        iface.receive(ip_frame(UDP(sport=5353, dport=53) / b"q", dst=REMOTE_IP_2), 1.0)
        [event] = iface.take_events()
        assert isinstance(event, ev.UdpDatagram)
        iface.udp_send(event.flow, b"an answer of odd length")
        [frame] = take(iface)
        assert frame.dst == SANDBOX_MAC
        assert (frame[IP].src, frame[IP].dst, frame[IP].proto) == (REMOTE_IP_2, SANDBOX_IP, 17)
        u = frame[UDP]
        assert (u.sport, u.dport) == (53, 5353)
        assert bytes(u.payload) == b"an answer of odd length"
        assert u.chksum != 0

    def test_udp_unreachable(self) -> None:
        iface = make_iface()
        original = ip_frame(UDP(sport=40001, dport=9999) / b"knock knock", dst=REMOTE_IP)
        iface.receive(original, 1.0)
        [event] = iface.take_events()
        assert isinstance(event, ev.UdpDatagram)
        iface.udp_unreachable(event)
        [frame] = take(iface)
        ip = frame[IP]
        assert (ip.src, ip.dst, ip.proto) == (REMOTE_IP, SANDBOX_IP, 1)
        icmp = frame[ICMP]
        assert (icmp.type, icmp.code) == (3, 3)
        quoted = raw(icmp)[8:]
        assert quoted == original[14:14 + 28]  # IP header + first 8 bytes (RFC 792)
        assert frame[IPerror].dst == REMOTE_IP and frame[UDPerror].dport == 9999


# ----- TCP admission --------------------------------------------------------------------------


class TestTcpAdmission:
    def test_syn_gives_one_connect_request(self) -> None:
        peer = Peer()
        peer.syn()
        assert peer.iface.take_events() == [ev.TcpConnectRequest(peer.flow)]
        assert peer.take_frames() == []  # nothing until the caller decides
        peer.syn()  # the sandbox's kernel retransmits while the caller is still deciding
        assert peer.iface.take_events() == []
        assert peer.take_frames() == []
        assert peer.iface.drops == {"tcp-syn-duplicate": 1}
        assert peer.iface.pending_count == 1

    def test_accept_sends_syn_ack(self) -> None:
        peer = Peer(isn=5000)
        peer.syn()
        peer.iface.take_events()
        assert peer.iface.tcp_accept(peer.flow, peer.now)
        synack = peer.expect(flags="SA", ack=5001)
        assert peer.take_frames() == []
        assert peer.iface.pending_count == 0 and peer.iface.connection_count == 1
        assert not peer.iface.tcp_accept(peer.flow, peer.now)  # not pending any more
        assert synack.sport == 443 and synack.dport == 40000

    def test_reject_sends_rst_ack(self) -> None:
        peer = Peer(isn=0xFFFFFFFF)
        peer.syn()
        peer.iface.take_events()
        assert peer.iface.tcp_reject(peer.flow)
        peer.expect(flags="RA", seq=0, ack=0)  # ack = SYN's seq + 1, modulo 2**32
        assert not peer.iface.tcp_reject(peer.flow)
        assert not peer.iface.tcp_accept(peer.flow, peer.now)
        assert peer.iface.pending_count == 0 and peer.iface.connection_count == 0
        # The sandbox may try again: a fresh request.
        peer.syn()
        assert peer.iface.take_events() == [ev.TcpConnectRequest(peer.flow)]

    def test_segment_before_accept_dropped_quietly(self) -> None:
        peer = Peer()
        peer.syn()
        peer.iface.take_events()
        peer.tcp("A", seq=peer.seq, ack=1)
        assert peer.take_frames() == []
        assert peer.iface.drops == {"tcp-before-accept": 1}

    def test_unknown_connection_with_ack_gets_rst(self) -> None:
        # RFC 9293 §3.10.7.1: <SEQ=SEG.ACK><CTL=RST>
        peer = Peer()
        peer.tcp("PA", seq=777, ack=123456, payload=b"stale")
        peer.expect(flags="R", seq=123456)
        assert peer.iface.drops == {"tcp-no-connection": 1}
        assert peer.iface.take_events() == []

    @pytest.mark.parametrize(("flags", "payload", "seg_len"),
                             [("", b"data", 4), ("F", b"", 1), ("FP", b"abc", 4), ("P", b"", 0)])
    def test_unknown_connection_without_ack_gets_rst_ack(self, flags: str, payload: bytes,
                                                         seg_len: int) -> None:
        # RFC 9293 §3.10.7.1: <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>
        peer = Peer()
        peer.tcp(flags, seq=0xFFFFFFFE, ack=0, payload=payload)
        peer.expect(flags="RA", seq=0, ack=0xFFFFFFFE + seg_len)

    def test_unknown_connection_syn_ack_gets_rst(self) -> None:
        peer = Peer()
        peer.tcp("SA", seq=1, ack=99)
        peer.expect(flags="R", seq=99)

    def test_rst_for_unknown_connection_is_not_answered(self) -> None:
        peer = Peer()
        peer.tcp("R", seq=5, ack=0)
        peer.tcp("RA", seq=5, ack=6)
        assert peer.take_frames() == []
        assert peer.iface.drops == {"tcp-rst-no-connection": 2}

    @pytest.mark.parametrize(("chksum", "sport", "reason"),
                             [(0x0BAD, None, "tcp-bad-checksum"), (None, 0, "tcp-port-zero")])
    def test_bad_segments(self, chksum: int | None, sport: int | None, reason: str) -> None:
        peer = Peer()
        peer.feed(peer.segment("S", seq=1, ack=0, chksum=chksum, sport=sport))
        assert peer.take_frames() == [] and peer.iface.take_events() == []
        assert peer.iface.drops == {reason: 1}

    def test_max_pending_evicts_oldest(self) -> None:
        iface = make_iface(max_pending=2)
        peers = [Peer(iface, sport=41000 + i, isn=100 * i) for i in range(3)]
        peers[0].syn()
        peers[1].syn()
        assert len(iface.take_events()) == 2
        peers[2].syn()
        events = iface.take_events()
        assert ev.TcpConnectRequest(peers[2].flow) in events
        assert not [e for e in events
                    if isinstance(e, ev.TcpConnectRequest) and e.flow != peers[2].flow]
        # The oldest half-open flow is refused so the sandbox does not wait forever.
        peers[0].expect(flags="RA", seq=0, ack=1)
        assert iface.drops["tcp-syn-evicted"] == 1
        assert iface.pending_count == 2
        assert not iface.tcp_accept(peers[0].flow, 1.0)
        assert iface.tcp_accept(peers[1].flow, 1.0)
        assert iface.tcp_accept(peers[2].flow, 1.0)

    def test_max_connections(self) -> None:
        iface = make_iface(max_connections=1)
        first = Peer(iface, sport=41000)
        first.handshake()
        second = Peer(iface, sport=41001, isn=9)
        second.syn()
        assert iface.take_events() == []
        second.expect(flags="RA", seq=0, ack=10)
        assert iface.drops["tcp-too-many-connections"] == 1

    def test_abort_sends_rst(self) -> None:
        peer = Peer()
        peer.handshake()
        peer.take_events()
        peer.iface.tcp_abort(peer.flow, "policy")
        peer.expect(flags="RA", seq=peer.rcv_nxt, ack=peer.seq)
        assert peer.take_events() == [ev.TcpClosed(peer.flow, True, "policy")]
        assert peer.iface.connection_count == 0
        assert peer.iface.tcp_send(peer.flow, b"x", peer.now) == 0


def test_every_emitted_frame_goes_to_the_learned_mac() -> None:
    iface = make_iface()
    iface.receive(arp_request(GATEWAY_IP, hwsrc="02:00:00:00:00:42",
                              eth_src="02:00:00:00:00:42"), 1.0)
    [reply] = take(iface)
    assert reply.dst == "02:00:00:00:00:42"
    check_frame(raw(reply))


def test_the_oracle_catches_bad_checksums() -> None:
    """check_frame itself: a corrupted IP header, TCP payload or UDP payload must be caught."""
    peer = Peer()
    peer.handshake()
    peer.iface.tcp_send(peer.flow, b"payload", peer.now)
    [frame] = peer.iface.take_frames()
    for offset in (14 + 8, len(frame) - 1):  # the TTL byte; the last payload byte
        bad = bytearray(frame)
        bad[offset] ^= 0x01
        with pytest.raises(AssertionError):
            check_frame(bad)
    check_frame(frame)
