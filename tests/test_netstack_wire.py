"""netstack.wire: header codecs checked against scapy as the independent oracle."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from netstack_helpers import GATEWAY_IP, REMOTE_IP, SANDBOX_IP
from scapy.compat import raw
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, UDPerror
from scapy.layers.l2 import ARP, Ether
from scapy.utils import checksum as scapy_checksum

from netstack import seq
from netstack.wire import arp, checksum, ethernet, icmp, ipv4, tcp, udp

SRC = bytes([10, 0, 2, 100])
DST = bytes([192, 0, 2, 10])


def ip_packet(l4: object, **fields: object) -> bytes:
    return raw(IP(src=SANDBOX_IP, dst=REMOTE_IP, **fields) / l4)


def tcp_bytes(**fields: object) -> bytes:
    """The TCP part of a scapy-built packet (checksum computed over the real pseudo-header)."""
    return raw(IP(raw(IP(src=SANDBOX_IP, dst=REMOTE_IP) / TCP(**fields)))[TCP])


def pseudo(length: int, proto: int = ipv4.PROTO_TCP) -> int:
    return checksum.pseudo_header_sum(SRC, DST, proto, length)


# ----- checksum -------------------------------------------------------------------------------


class TestChecksum:
    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=300).filter(any))
    def test_matches_scapy(self, data: bytes) -> None:
        # All-zero input is the one case where two valid encodings exist; see the test below.
        assert checksum.checksum(data) == scapy_checksum(data)

    def test_all_zero_data_gives_ffff(self) -> None:
        # RFC 1071: the checksum is the complement of the ones'-complement sum; the sum of zero
        # words is +0 (0x0000), whose complement is 0xFFFF. A field of 0 over all-zero data
        # does not verify at a receiver that checks that the folded sum is -0 (Linux does).
        for n in (0, 1, 2, 3, 20, 21):
            assert scapy_checksum(b"\x00" * n) == 0xFFFF
            assert checksum.checksum(b"\x00" * n) == 0xFFFF, n

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=200), st.binary(max_size=200))
    def test_parts_equal_whole_when_first_is_even(self, a: bytes, b: bytes) -> None:
        if len(a) % 2:
            a += b"\x00"
        assert checksum.finish(checksum.ones_sum(a) + checksum.ones_sum(b)) == \
            checksum.checksum(a + b)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(min_size=1, max_size=301).filter(any))
    def test_verify_accepts_data_with_its_checksum(self, data: bytes) -> None:
        # Put the checksum in an (even-aligned) field at the front, as every header does.
        field = struct.pack("!H", checksum.checksum(b"\x00\x00" + data))
        assert checksum.verify(field + data)
        assert scapy_checksum(field + data) == 0

    @pytest.mark.parametrize("n", [1, 2, 3, 64, 65, 1499, 1500])
    def test_odd_and_even_lengths(self, n: int) -> None:
        data = bytes((i * 37 + 11) & 0xFF for i in range(n))
        assert checksum.checksum(data) == scapy_checksum(data)
        # An odd tail is padded with a zero byte (RFC 1071 §4.1).
        if n % 2:
            assert checksum.checksum(data) == checksum.checksum(data + b"\x00")

    def test_verify_rejects_a_flipped_bit(self) -> None:
        data = bytearray(b"\x00\x00" + b"abcdefgh")
        struct.pack_into("!H", data, 0, checksum.checksum(data))
        data[5] ^= 0x10
        assert not checksum.verify(data)

    def test_pseudo_header_matches_scapy_tcp(self) -> None:
        seg = tcp_bytes(sport=1, dport=2, flags="S")
        assert (pseudo(len(seg)) + checksum.ones_sum(seg)) % 0xFFFF == 0


# ----- ethernet -------------------------------------------------------------------------------


class TestEthernet:
    def test_parse(self) -> None:
        frame = raw(Ether(dst="52:55:00:00:02:02", src="02:00:00:00:00:01", type=0x0806))
        assert ethernet.parse(frame) == (bytes.fromhex("525500000202"),
                                         bytes.fromhex("020000000001"), 0x0806)

    @pytest.mark.parametrize("n", [0, 1, 13])
    def test_truncated(self, n: int) -> None:
        assert ethernet.parse(b"\x00" * n) is None

    def test_header_parses_in_scapy(self) -> None:
        hdr = ethernet.header(b"\x02\x00\x00\x00\x00\x01", b"\x52\x55\x00\x00\x02\x02", 0x0800)
        e = Ether(hdr)
        assert (e.dst, e.src, e.type) == ("02:00:00:00:00:01", "52:55:00:00:02:02", 0x0800)


# ----- IPv4 -----------------------------------------------------------------------------------


class TestIpv4:
    def test_parse_valid(self) -> None:
        pkt = ip_packet(UDP(sport=5, dport=53) / b"q", id=77, ttl=9)
        hdr = ipv4.parse(pkt)
        assert isinstance(hdr, ipv4.Ipv4Header)
        assert (hdr.header_len, hdr.total_len, hdr.ident, hdr.ttl, hdr.proto) == \
            (20, len(pkt), 77, 9, ipv4.PROTO_UDP)
        assert (hdr.src, hdr.dst) == (SRC, DST)
        assert not hdr.is_fragment

    def test_parse_with_options_and_padding(self) -> None:
        pkt = ip_packet(UDP(sport=5, dport=53), options=b"\x01\x01\x01\x00")
        hdr = ipv4.parse(pkt + b"\x00" * 10)  # Ethernet padding after the packet
        assert isinstance(hdr, ipv4.Ipv4Header)
        assert hdr.header_len == 24 and hdr.total_len == len(pkt)

    @pytest.mark.parametrize("version", [0, 6, 15])
    def test_bad_version(self, version: int) -> None:
        pkt = ip_packet(UDP(), version=version)
        assert ipv4.parse(pkt) == "ipv4-bad-version"

    @pytest.mark.parametrize("ihl", [0, 4])
    def test_header_length_too_small(self, ihl: int) -> None:
        pkt = bytearray(ip_packet(UDP()))
        pkt[0] = 0x40 | ihl
        assert ipv4.parse(pkt) == "ipv4-bad-length"

    def test_header_length_beyond_total(self) -> None:
        pkt = bytearray(ip_packet(b""))
        pkt[0] = 0x4F  # 60-byte header in a 20-byte packet
        assert ipv4.parse(pkt) == "ipv4-bad-length"

    def test_total_length_beyond_buffer(self) -> None:
        pkt = ip_packet(UDP() / b"abc")
        assert ipv4.parse(pkt[:-1]) == "ipv4-bad-length"

    def test_total_length_below_header(self) -> None:
        pkt = raw(IP(raw(IP(src=SANDBOX_IP, dst=REMOTE_IP, len=19))))
        assert ipv4.parse(pkt) == "ipv4-bad-length"

    @pytest.mark.parametrize("n", [0, 1, 19])
    def test_truncated(self, n: int) -> None:
        assert ipv4.parse(ip_packet(UDP())[:n]) == "ipv4-truncated"

    def test_bad_checksum(self) -> None:
        good = IP(ip_packet(UDP()))
        pkt = raw(IP(src=SANDBOX_IP, dst=REMOTE_IP, chksum=good.chksum ^ 0x0101) / UDP())
        assert ipv4.parse(pkt) == "ipv4-bad-checksum"

    @pytest.mark.parametrize(("flags", "frag", "fragment"),
                             [("DF", 0, False), ("MF", 0, True), (0, 1, True), (0, 0, False)])
    def test_fragment_flag(self, flags: str | int, frag: int, fragment: bool) -> None:
        hdr = ipv4.parse(ip_packet(UDP(), flags=flags, frag=frag))
        assert isinstance(hdr, ipv4.Ipv4Header)
        assert hdr.is_fragment is fragment

    def test_header_parses_in_scapy(self) -> None:
        raw_hdr = ipv4.header(DST, SRC, ipv4.PROTO_TCP, 100, 0x1234)
        p = IP(raw_hdr + b"\x00" * 100)
        assert (p.src, p.dst, p.proto, p.len, p.id, str(p.flags), p.ttl) == \
            (REMOTE_IP, SANDBOX_IP, 6, 120, 0x1234, "DF", 64)
        rebuilt = p.copy()
        del rebuilt.chksum
        assert IP(raw(rebuilt)).chksum == p.chksum


# ----- TCP ------------------------------------------------------------------------------------


def parse_tcp(data: bytes) -> tcp.TcpSegment:
    seg = tcp.parse(data, pseudo(len(data)))
    assert isinstance(seg, tcp.TcpSegment), seg
    return seg


def with_raw_options(opts: bytes, payload: bytes = b"") -> bytes:
    """A TCP segment whose option bytes are exactly `opts` (padded), checksum fixed by scapy."""
    padded = opts + b"\x00" * (-len(opts) % 4)
    return raw(IP(raw(IP(src=SANDBOX_IP, dst=REMOTE_IP)
                      / TCP(sport=1000, dport=80, flags="S", seq=5,
                            dataofs=5 + len(padded) // 4)
                      / (padded + payload)))[TCP])


class TestTcp:
    def test_fields_and_payload(self) -> None:
        data = raw(IP(raw(IP(src=SANDBOX_IP, dst=REMOTE_IP)
                          / TCP(sport=40000, dport=443, seq=0xFFFFFFF0, ack=12, flags="PA",
                                window=1234) / b"hello")))[20:]
        seg = parse_tcp(data)
        assert (seg.sport, seg.dport, seg.seq, seg.ack, seg.flags, seg.window) == \
            (40000, 443, 0xFFFFFFF0, 12, tcp.PSH | tcp.ACK, 1234)
        assert bytes(seg.payload) == b"hello"
        assert seg.seg_len == 5
        assert seg.mss is None and seg.wscale is None

    def test_seg_len_counts_syn_and_fin(self) -> None:
        seg = parse_tcp(tcp_bytes(sport=1, dport=2, flags="SF"))
        assert seg.seg_len == 2

    def test_mss_and_window_scale(self) -> None:
        seg = parse_tcp(tcp_bytes(sport=1, dport=2, flags="S",
                                  options=[("MSS", 1460), ("NOP", None), ("WScale", 7)]))
        assert (seg.mss, seg.wscale) == (1460, 7)

    def test_odd_order_nops_and_unknown_options(self) -> None:
        seg = parse_tcp(tcp_bytes(sport=1, dport=2, flags="S", options=[
            ("NOP", None), ("WScale", 3), ("SAckOK", b""), ("Timestamp", (1, 0)),
            ("NOP", None), ("NOP", None), ("MSS", 536)]))
        assert (seg.mss, seg.wscale) == (536, 3)

    def test_end_of_options_stops_parsing(self) -> None:
        seg = parse_tcp(with_raw_options(b"\x00" + b"\x02\x04\x05\xb4"))
        assert seg.mss is None

    @pytest.mark.parametrize("opts", [
        b"\x02",  # MSS kind with no length byte
        b"\x01\x02\x04\x05",  # MSS cut short by the end of the option space
        b"\x01\x01\x01\x03",  # window scale kind at the very end
        b"\x02\x00\x05\xb4",  # zero length: would loop forever if trusted
        b"\x02\x01\x05\xb4",  # length 1: less than the kind+length bytes
        b"\x08\x0a\x00\x00",  # timestamp claiming 10 bytes in 4
        b"\x03\xff\x07\x00",  # absurd length
    ])
    def test_malformed_options_do_not_crash(self, opts: bytes) -> None:
        seg = parse_tcp(with_raw_options(opts, b"data"))
        assert seg.mss is None
        assert bytes(seg.payload) == b"data"

    def test_option_with_wrong_length_is_skipped(self) -> None:
        # MSS with length 3 is not an MSS; the parser skips it and reads what follows.
        seg = parse_tcp(with_raw_options(b"\x02\x03\x05" + b"\x03\x03\x05"))
        assert seg.mss is None and seg.wscale == 5

    def test_options_read_before_a_truncated_one_are_kept(self) -> None:
        seg = parse_tcp(with_raw_options(b"\x02\x04\x02\x18" + b"\x01\x01\x03\x03"))
        assert seg.mss == 536 and seg.wscale is None

    def test_bad_checksum(self) -> None:
        data = bytearray(tcp_bytes(sport=1, dport=2, flags="S"))
        data[16] ^= 0xFF
        assert tcp.parse(data, pseudo(len(data))) == "tcp-bad-checksum"

    def test_checksum_covers_pseudo_header(self) -> None:
        data = tcp_bytes(sport=1, dport=2, flags="S")
        other = checksum.pseudo_header_sum(SRC, bytes([192, 0, 2, 11]), 6, len(data))
        assert tcp.parse(data, other) == "tcp-bad-checksum"

    @pytest.mark.parametrize("n", [0, 1, 19])
    def test_truncated(self, n: int) -> None:
        data = tcp_bytes(sport=1, dport=2)[:n]
        assert tcp.parse(data, pseudo(len(data))) == "tcp-truncated"

    @pytest.mark.parametrize("dataofs", [0, 4, 6, 15])
    def test_bad_data_offset(self, dataofs: int) -> None:
        data = raw(IP(raw(IP(src=SANDBOX_IP, dst=REMOTE_IP)
                          / TCP(sport=1, dport=2, dataofs=dataofs))))[20:]
        assert tcp.parse(data, pseudo(len(data))) == "tcp-bad-offset"

    @pytest.mark.parametrize(("mss", "wscale"), [(1460, None), (65480, 7), (536, 0), (9000, 14)])
    def test_segment_into_parses_in_scapy(self, mss: int, wscale: int | None) -> None:
        payload = b"payload!" * 3 + b"x"  # odd length
        opts = tcp.syn_options(mss, wscale)
        assert len(opts) % 4 == 0
        seg_len = tcp.MIN_HEADER_LEN + len(opts) + len(payload)
        buf = bytearray(34 + seg_len)
        buf[34 + seg_len - len(payload):] = payload
        tcp.segment_into(buf, 34, 443, 40000, 0xFFFFFFFF, 7, tcp.SYN | tcp.ACK, 512, opts,
                         len(payload), checksum.pseudo_header_sum(DST, SRC, 6, seg_len))
        ip = IP(ipv4.header(DST, SRC, 6, seg_len, 1) + bytes(buf[34:]))
        t = ip[TCP]
        assert (t.sport, t.dport, t.seq, t.ack, str(t.flags), t.window) == \
            (443, 40000, 0xFFFFFFFF, 7, "SA", 512)
        expected = [("MSS", mss)] + ([("NOP", None), ("WScale", wscale)] if wscale is not None
                                     else [])
        assert t.options == expected
        assert bytes(t.payload) == payload
        rebuilt = ip.copy()
        del rebuilt[TCP].chksum
        assert IP(raw(rebuilt))[TCP].chksum == t.chksum

    @settings(max_examples=100, deadline=None)
    @given(st.binary(max_size=400), st.integers(0, 2**32 - 1), st.integers(0, 0xFFFF))
    def test_roundtrip_random_payloads(self, payload: bytes, seqno: int, window: int) -> None:
        seg_len = tcp.MIN_HEADER_LEN + len(payload)
        buf = bytearray(seg_len)
        buf[tcp.MIN_HEADER_LEN:] = payload
        tcp.segment_into(buf, 0, 80, 81, seqno, 0, tcp.ACK, window, b"", len(payload),
                         checksum.pseudo_header_sum(SRC, DST, 6, seg_len))
        seg = tcp.parse(buf, checksum.pseudo_header_sum(SRC, DST, 6, seg_len))
        assert isinstance(seg, tcp.TcpSegment)
        assert (seg.seq, seg.window, bytes(seg.payload)) == (seqno, window, payload)
        ip = IP(ipv4.header(SRC, DST, 6, seg_len, 1) + bytes(buf))
        rebuilt = ip.copy()
        del rebuilt[TCP].chksum
        assert IP(raw(rebuilt))[TCP].chksum == ip[TCP].chksum


# ----- UDP ------------------------------------------------------------------------------------


class TestUdp:
    def test_parse(self) -> None:
        data = raw(IP(ip_packet(UDP(sport=5353, dport=53) / b"query")))[20:]
        assert udp.parse(data, pseudo(len(data), 17)) is not None
        sport, dport, payload = udp.parse(data, pseudo(len(data), 17))  # type: ignore[misc]
        assert (sport, dport, bytes(payload)) == (5353, 53, b"query")

    def test_zero_checksum_accepted(self) -> None:
        data = raw(UDP(sport=5353, dport=53, chksum=0) / b"query")
        parsed = udp.parse(data, pseudo(len(data), 17))
        assert not isinstance(parsed, str)
        assert bytes(parsed[2]) == b"query"

    def test_bad_checksum(self) -> None:
        data = bytearray(raw(IP(ip_packet(UDP(sport=1, dport=2) / b"abc")))[20:])
        data[-1] ^= 1
        assert udp.parse(data, pseudo(len(data), 17)) == "udp-bad-checksum"

    @pytest.mark.parametrize("length", [0, 7, 12])
    def test_bad_length(self, length: int) -> None:
        data = raw(UDP(sport=1, dport=2, len=length, chksum=0) / b"abc")
        assert udp.parse(data, pseudo(len(data), 17)) == "udp-bad-length"

    def test_length_shorter_than_buffer_trims(self) -> None:
        data = raw(UDP(sport=1, dport=2, len=9, chksum=0) / b"abc")
        parsed = udp.parse(data, pseudo(len(data), 17))
        assert not isinstance(parsed, str) and bytes(parsed[2]) == b"a"

    def test_truncated(self) -> None:
        assert udp.parse(b"\x00" * 7, 0) == "udp-truncated"

    @settings(max_examples=100, deadline=None)
    @given(st.binary(max_size=300))
    def test_datagram_parses_in_scapy(self, payload: bytes) -> None:
        body = udp.datagram(53, 5353, payload, pseudo(8 + len(payload), 17))
        ip = IP(ipv4.header(SRC, DST, 17, len(body), 1) + body)
        u = ip[UDP]
        assert (u.sport, u.dport, u.len, bytes(u.payload)) == (53, 5353, 8 + len(payload),
                                                               payload)
        rebuilt = ip.copy()
        del rebuilt[UDP].chksum
        assert IP(raw(rebuilt))[UDP].chksum == u.chksum
        assert u.chksum != 0

    def test_computed_zero_is_sent_as_all_ones(self) -> None:
        # Pick a two-byte payload that makes the ones'-complement sum 0xFFFF.
        c0 = udp.datagram(53, 5353, b"\x00\x00", pseudo(10, 17))
        word = struct.unpack_from("!H", c0, 6)[0]
        body = udp.datagram(53, 5353, struct.pack("!H", word), pseudo(10, 17))
        assert struct.unpack_from("!H", body, 6)[0] == 0xFFFF
        assert not isinstance(udp.parse(body, pseudo(10, 17)), str)


# ----- ARP and ICMP ---------------------------------------------------------------------------


class TestArp:
    def test_build_parses_in_scapy(self) -> None:
        pkt = arp.build(arp.OP_REPLY, bytes.fromhex("525500000202"), bytes([10, 0, 2, 2]),
                        bytes.fromhex("020000000001"), SRC)
        a = ARP(pkt)
        assert (a.op, a.hwsrc, a.psrc, a.hwdst, a.pdst) == (
            2, "52:55:00:00:02:02", GATEWAY_IP, "02:00:00:00:00:01", SANDBOX_IP)
        assert (a.hwtype, a.ptype, a.hwlen, a.plen) == (1, 0x0800, 6, 4)
        assert len(pkt) == arp.PACKET_LEN

    def test_parse_scapy_request(self) -> None:
        p = arp.parse(raw(ARP(op=1, hwsrc="02:00:00:00:00:01", psrc=SANDBOX_IP,
                              pdst=GATEWAY_IP)))
        assert p is not None
        assert (p.op, p.sender_mac, p.sender_ip, p.target_ip) == (
            1, bytes.fromhex("020000000001"), SRC, bytes([10, 0, 2, 2]))

    @pytest.mark.parametrize("fields", [{"hwtype": 6}, {"ptype": 0x86DD}, {"hwlen": 8},
                                        {"plen": 16}])
    def test_parse_rejects_other_kinds(self, fields: dict[str, int]) -> None:
        data = raw(ARP(op=1, psrc=SANDBOX_IP, pdst=GATEWAY_IP, **fields))
        assert arp.parse(data[:28]) is None

    def test_parse_truncated(self) -> None:
        assert arp.parse(raw(ARP())[:27]) is None


class TestIcmp:
    def test_echo_reply_parses_in_scapy(self) -> None:
        req = raw(ICMP(type=8, id=0x1234, seq=7) / b"ping data")
        assert icmp.parse(req) == (8, 0, (0x1234 << 16) | 7)
        rep = ICMP(icmp.echo_reply(req))
        assert (rep.type, rep.code, rep.id, rep.seq, bytes(rep.payload)) == (
            0, 0, 0x1234, 7, b"ping data")
        assert scapy_checksum(raw(rep)) == 0

    def test_parse_rejects_bad_checksum_and_short(self) -> None:
        req = bytearray(raw(ICMP(type=8) / b"x"))
        req[-1] ^= 1
        assert icmp.parse(req) is None
        assert icmp.parse(raw(ICMP(type=8))[:7]) is None

    def test_unreachable_quotes_header_and_8_bytes(self) -> None:
        orig = ip_packet(UDP(sport=5000, dport=9) / b"0123456789")
        msg = icmp.unreachable(icmp.CODE_PORT_UNREACHABLE, orig)
        m = ICMP(msg)
        assert (m.type, m.code) == (3, 3)
        assert bytes(msg[8:]) == orig[:28]
        assert isinstance(m.payload, IPerror) and m[UDPerror].dport == 9
        assert scapy_checksum(msg) == 0


# ----- sequence arithmetic --------------------------------------------------------------------


class TestSeq:
    def test_wraps(self) -> None:
        assert seq.add(0xFFFFFFFF, 1) == 0
        assert seq.add(0, -1) == 0xFFFFFFFF
        assert seq.diff(5, 0xFFFFFFFB) == 10
        assert seq.diff(0xFFFFFFFB, 5) == -10
        assert seq.lt(0xFFFFFFF0, 3) and not seq.lt(3, 0xFFFFFFF0)
        assert seq.le(7, 7)
        assert seq.in_window(2, 0xFFFFFFFE, 8) and not seq.in_window(6, 0xFFFFFFFE, 8)
        assert not seq.in_window(0xFFFFFFFD, 0xFFFFFFFE, 8)

    @settings(max_examples=200, deadline=None)
    @given(st.integers(0, 2**32 - 1), st.integers(-(2**31) + 1, 2**31))
    def test_add_diff_inverse(self, a: int, n: int) -> None:
        assert seq.diff(seq.add(a, n), a) == n
