"""netstack: an IPv4 address written in an IPv6 form is judged and reported as IPv4.

IPv4-mapped (::ffff:a.b.c.d), IPv4-compatible (::a.b.c.d) and NAT64 (64:ff9b::a.b.c.d)
destinations are normalised once, when the frame is read: what IPv4 refuses (loopback, "this
network", multicast, broadcast) and the stack's own addresses are dropped in those forms too,
and a flow's `dst` is the IPv4 address, with the form the sandbox wrote in `via` (replies come
from it, so the sandbox's socket sees its own peer).
"""

from __future__ import annotations

import ipaddress

import pytest
from netstack_helpers import GATEWAY_MAC, SANDBOX_MAC, check_frame, make_iface
from scapy.compat import raw
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import Ether

from netstack import events as ev
from netstack.wire import ipv6

ME6 = "fd00::100"


def v6_frame(dst: str, l4: object) -> bytes:
    return raw(Ether(dst=GATEWAY_MAC, src=SANDBOX_MAC) / IPv6(src=ME6, dst=dst) / l4)


@pytest.mark.parametrize(("written", "v4"), [
    ("::ffff:192.0.2.10", "192.0.2.10"),
    ("::192.0.2.10", "192.0.2.10"),
    ("64:ff9b::192.0.2.10", "192.0.2.10"),
    ("::ffff:0.0.0.0", "0.0.0.0"),
])
def test_embedded_ipv4_forms(written: str, v4: str) -> None:
    found = ipv6.embedded_ipv4(ipaddress.IPv6Address(written).packed)
    assert found == ipaddress.IPv4Address(v4).packed


@pytest.mark.parametrize("plain", ["::", "::1", "2001:db8::10", "fd00::2", "64:ff9b:1::1",
                                   "::fffe:192.0.2.10"])
def test_not_embedded(plain: str) -> None:
    assert ipv6.embedded_ipv4(ipaddress.IPv6Address(plain).packed) is None


@pytest.mark.parametrize("written", ["::ffff:192.0.2.10", "::192.0.2.10",
                                     "64:ff9b::192.0.2.10"])
def test_tcp_flow_to_an_embedded_address_is_reported_as_ipv4(written: str) -> None:
    iface = make_iface()
    iface.receive(v6_frame(written, TCP(sport=40000, dport=443, flags="S", seq=7)), 1.0)
    [event] = iface.take_events()
    assert isinstance(event, ev.TcpConnectRequest)
    assert (event.flow.dst, event.flow.dport) == ("192.0.2.10", 443)
    assert str(event.flow) == "tcp 192.0.2.10:443"
    assert ipaddress.IPv6Address(event.flow.via) == ipaddress.IPv6Address(written)
    assert iface.tcp_accept(event.flow, 1.0)
    [synack] = [check_frame(f) for f in iface.take_frames()]
    assert ipaddress.IPv6Address(synack[IPv6].src) == ipaddress.IPv6Address(written)
    assert synack[TCP].flags == "SA"


@pytest.mark.parametrize("written", [
    "::ffff:127.0.0.1", "::127.0.0.1", "64:ff9b::127.0.0.1",  # loopback
    "::ffff:0.1.2.3", "::ffff:224.0.0.251", "::ffff:255.255.255.255",
    "::ffff:10.0.2.2", "::ffff:10.0.2.3", "64:ff9b::10.0.2.2",  # the stack's own
    "::ffff:10.0.2.100",  # the sandbox's own
])
def test_what_ipv4_refuses_is_refused_in_ipv6_forms(written: str) -> None:
    iface = make_iface()
    iface.receive(v6_frame(written, TCP(sport=40000, dport=80, flags="S")), 1.0)
    iface.receive(v6_frame(written, UDP(sport=40001, dport=53) / b"q"), 1.0)
    iface.receive(v6_frame(written, ICMPv6EchoRequest(id=1, seq=1)), 1.0)
    assert iface.take_events() == []
    assert iface.take_frames() == []
    assert iface.drops == {"ipv6-bad-destination": 3}


def test_udp_replies_and_errors_come_from_the_form_the_sandbox_used() -> None:
    iface = make_iface()
    iface.receive(v6_frame("64:ff9b::192.0.2.10", UDP(sport=40000, dport=53) / b"query"), 1.0)
    [event] = iface.take_events()
    assert isinstance(event, ev.UdpDatagram)
    assert (event.flow.dst, event.flow.via) == ("192.0.2.10", "64:ff9b::c000:20a")
    assert iface.udp_send(event.flow, b"answer")
    iface.udp_unreachable(event)
    reply, error = [check_frame(f) for f in iface.take_frames()]
    assert (reply[IPv6].src, reply[IPv6].dst) == ("64:ff9b::c000:20a", ME6)
    assert bytes(reply[UDP].payload) == b"answer"
    assert error[IPv6].src == "64:ff9b::c000:20a" and ICMPv6DestUnreach in error


def test_pings_to_an_embedded_address_are_answered_in_ipv6() -> None:
    iface = make_iface()
    iface.receive(v6_frame("::ffff:192.0.2.10", ICMPv6EchoRequest(id=9, seq=3, data=b"p")), 1.0)
    [event] = iface.take_events()
    assert isinstance(event, ev.IcmpEchoRequest)
    assert (event.flow.dst, event.flow.via) == ("192.0.2.10", "::ffff:c000:20a")
    iface.icmp_echo_reply(event, b"p")
    iface.icmp_unreachable(event)
    reply, error = [check_frame(f) for f in iface.take_frames()]
    assert ipaddress.IPv6Address(reply[IPv6].src) == ipaddress.IPv6Address("::ffff:192.0.2.10")
    assert ICMPv6EchoReply in reply
    assert error[IPv6].dst == ME6 and ICMPv6DestUnreach in error
