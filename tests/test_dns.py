"""Tests for tapbox.net.dns: the sandbox's policy-checking DNS forwarder.

A fake upstream resolver (UDP + TCP on one 127.0.0.1 port) answers from a small .test zone built
with dnspython; a fake policy admits *.example.test and refuses rebinding-style addresses.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
import trio

from tapbox.net.dns import (
    DnsEvent,
    DnsForwarder,
    parse_upstream,
    upstreams_from_resolv_conf,
)
from tapbox.net.dnsstream import TcpDnsFramer

# --------------------------------------------------------------------------------- fake zone

ZONE_TEXT = {
    "api.example.test": [("A", "192.0.2.10"), ("AAAA", "2001:db8::10"), ("TXT", '"hello"')],
    "alias.example.test": [("CNAME", "cdn.other.test.")],
    "cdn.other.test": [("A", "198.51.100.20")],
    "evil.example.test": [("A", "169.254.169.254"), ("A", "192.0.2.11")],
    "allevil.example.test": [("A", "127.0.0.1")],
    "loop1.example.test": [("CNAME", "loop2.example.test.")],
    "loop2.example.test": [("CNAME", "loop1.example.test.")],
    "big.example.test": [("A", f"203.0.113.{i}") for i in range(1, 61)],
    "https.example.test": [("HTTPS", '1 . alpn="h2" ipv4hint=192.0.2.30')],
}
# Over UDP these get a TC reply with no records; over TCP the full answer.
TRUNCATE_OVER_UDP = {"big.example.test"}
# These get garbage back.
GARBAGE = {"garbage.example.test"}
# These are never answered.
SILENT = {"slow.example.test"}


def build_zone() -> dict[tuple[dns.name.Name, int], dns.rrset.RRset]:
    zone: dict[tuple[dns.name.Name, int], dns.rrset.RRset] = {}
    for owner, records in ZONE_TEXT.items():
        name = dns.name.from_text(owner)
        for rtype, rdata in records:
            rdtype = dns.rdatatype.from_text(rtype)
            key = (name, rdtype)
            if key not in zone:
                zone[key] = dns.rrset.RRset(name, dns.rdataclass.IN, rdtype)
                zone[key].update_ttl(300)
            zone[key].add(dns.rdata.from_text(dns.rdataclass.IN, rdtype, rdata))
    return zone


ZONE = build_zone()


def resolve_in_zone(query: dns.message.Message) -> dns.message.Message:
    """What a recursive resolver would say: follow CNAMEs inside the fake zone."""
    resp = dns.message.make_response(query, recursion_available=True)
    q = query.question[0]
    name = q.name
    for _ in range(8):
        cname = ZONE.get((name, dns.rdatatype.CNAME))
        if cname is not None and q.rdtype != dns.rdatatype.CNAME:
            if cname in resp.answer:
                break
            resp.answer.append(cname)
            name = next(iter(cname)).target
            continue
        rrset = ZONE.get((name, q.rdtype))
        if rrset is not None:
            resp.answer.append(rrset)
        elif not any(n == name for n, _ in ZONE):
            resp.set_rcode(dns.rcode.NXDOMAIN)
        break
    return resp


@dataclass
class FakeUpstream:
    port: int
    udp_queries: list[str] = field(default_factory=list)
    tcp_queries: list[str] = field(default_factory=list)

    @property
    def queries(self) -> list[str]:
        return self.udp_queries + self.tcp_queries


def _qname(msg: dns.message.Message) -> str:
    return msg.question[0].name.to_text(omit_final_dot=True).lower()


async def _serve_udp(sock: trio.socket.SocketType, up: FakeUpstream) -> None:
    while True:
        data, addr = await sock.recvfrom(65535)
        query = dns.message.from_wire(data)
        qn = _qname(query)
        up.udp_queries.append(qn)
        if qn in SILENT:
            continue
        if qn in GARBAGE:
            await sock.sendto(data[:2] + b"\x81\x80\xff\xff garbage", addr)
            continue
        if qn in TRUNCATE_OVER_UDP:
            resp = dns.message.make_response(query, recursion_available=True)
            resp.flags |= dns.flags.TC
        else:
            resp = resolve_in_zone(query)
        await sock.sendto(resp.to_wire(), addr)


async def _serve_tcp_conn(stream: trio.SocketStream, up: FakeUpstream) -> None:
    framer = TcpDnsFramer()
    async with stream:
        async for chunk in stream:
            for wire in framer.feed(chunk):
                query = dns.message.from_wire(wire)
                up.tcp_queries.append(_qname(query))
                await stream.send_all(TcpDnsFramer.frame(resolve_in_zone(query).to_wire()))


async def start_fake_upstream(nursery: trio.Nursery) -> FakeUpstream:
    """Bind UDP and TCP on the same free 127.0.0.1 port and serve the fake zone."""
    for _ in range(20):
        udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        tcp = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            await tcp.bind(("127.0.0.1", port))
        except OSError:
            udp.close()
            tcp.close()
            continue
        tcp.listen(16)
        up = FakeUpstream(port)
        nursery.start_soon(_serve_udp, udp, up)
        listener = trio.SocketListener(tcp)
        nursery.start_soon(
            trio.serve_listeners, functools.partial(_serve_tcp_conn, up=up), [listener]
        )
        return up
    raise RuntimeError("no free port for the fake upstream")


def dead_udp_port() -> int:
    """A 127.0.0.1 port nobody listens on (queries to it get ICMP port unreachable)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ------------------------------------------------------------------------------- fake policy


@dataclass(frozen=True)
class FakeRule:
    text: str
    ports: None = None


class FakePolicy:
    """Admits example.test and its subdomains; the guard refuses loopback and link-local."""

    def __init__(self) -> None:
        self.rule = FakeRule("*.example.test")
        self.asked: list[str] = []
        self.learned: list[tuple[str, list[tuple[str, float]], float]] = []

    def name_allowed(self, name: str) -> list[FakeRule]:
        self.asked.append(name)
        if name == "example.test" or name.endswith(".example.test"):
            return [self.rule]
        return []

    def learn(
        self,
        name: str,
        rules: Sequence[FakeRule],
        addresses: Iterable[tuple[str, float]],
        now: float,
    ) -> list[str]:
        assert list(rules) == [self.rule]
        addresses = list(addresses)
        self.learned.append((name, addresses, now))
        refused = []
        for addr, _ttl in addresses:
            ip = ipaddress.ip_address(addr)
            if ip.is_loopback or ip.is_link_local or ip.is_unspecified:
                refused.append(addr)
        return refused


# ----------------------------------------------------------------------------------- helpers


def make_forwarder(
    upstreams: list[tuple[str, int]], **kw: object
) -> tuple[DnsForwarder, FakePolicy, list[DnsEvent]]:
    policy = FakePolicy()
    events: list[DnsEvent] = []
    kw.setdefault("timeout", 2.0)
    fwd = DnsForwarder(policy, upstreams, on_event=events.append, **kw)  # type: ignore[arg-type]
    return fwd, policy, events


def query(name: str, rdtype: str = "A", qid: int = 0x1234, **kw: object) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]
    q.id = qid
    return q


async def ask(fwd: DnsForwarder, q: dns.message.Message, **kw: bool) -> dns.message.Message:
    wire = await fwd.answer(q.to_wire(), **kw)
    assert wire is not None
    resp = dns.message.from_wire(wire)
    assert resp.id == q.id
    assert resp.flags & dns.flags.QR
    assert resp.flags & dns.flags.RA
    assert resp.question == q.question
    return resp


def addresses(resp: dns.message.Message, rdtype: str = "A") -> set[str]:
    t = dns.rdatatype.from_text(rdtype)
    return {rd.address for rrset in resp.answer if rrset.rdtype == t for rd in rrset}


# ------------------------------------------------------------------------------------- tests


async def test_allowed_name_answered_and_learned(nursery: trio.Nursery) -> None:
    up = await start_fake_upstream(nursery)
    fwd, policy, events = make_forwarder([("127.0.0.1", up.port)], clock=lambda: 42.0)
    resp = await ask(fwd, query("api.example.test", qid=0xBEEF))
    assert resp.rcode() == dns.rcode.NOERROR
    assert addresses(resp) == {"192.0.2.10"}
    assert policy.learned == [("api.example.test", [("192.0.2.10", 300.0)], 42.0)]
    assert events == [
        DnsEvent("api.example.test", "A", "allowed", "*.example.test", ("192.0.2.10",), ())
    ]
    assert up.udp_queries == ["api.example.test"]


async def test_name_is_case_folded_for_policy(nursery: trio.Nursery) -> None:
    up = await start_fake_upstream(nursery)
    fwd, policy, _ = make_forwarder([("127.0.0.1", up.port)])
    resp = await ask(fwd, query("ApI.ExAmPlE.TeSt"))
    assert addresses(resp) == {"192.0.2.10"}
    assert policy.asked == ["api.example.test"]
    assert policy.learned[0][0] == "api.example.test"


async def test_denied_name_nxdomain_nothing_upstream(nursery: trio.Nursery) -> None:
    up = await start_fake_upstream(nursery)
    fwd, policy, events = make_forwarder([("127.0.0.1", up.port)])
    resp = await ask(fwd, query("cdn.other.test", qid=7))
    assert resp.rcode() == dns.rcode.NXDOMAIN
    assert resp.answer == []
    assert up.queries == []
    assert policy.learned == []
    assert events == [DnsEvent("cdn.other.test", "A", "denied", None)]


async def test_odd_label_bytes_denied_without_asking_policy(nursery: trio.Nursery) -> None:
    up = await start_fake_upstream(nursery)
    fwd, policy, events = make_forwarder([("127.0.0.1", up.port)])
    # One label "x.api.example" under "test": its text form ends in ".example.test".
    name = dns.name.Name([b"x.api.example", b"test", b""])
    q = dns.message.make_query(name, "A")
    resp = await ask(fwd, q)
    assert resp.rcode() == dns.rcode.NXDOMAIN
    assert policy.asked == []
    assert up.queries == []
    assert events[0].verdict == "denied"


async def test_cname_chain_learned_under_asked_name(nursery: trio.Nursery) -> None:
    up = await start_fake_upstream(nursery)
    fwd, policy, events = make_forwarder([("127.0.0.1", up.port)])
    resp = await ask(fwd, query("alias.example.test"))
    assert addresses(resp) == {"198.51.100.20"}
    assert any(r.rdtype == dns.rdatatype.CNAME for r in resp.answer)
    assert policy.learned[0][:2] == ("alias.example.test", [("198.51.100.20", 300.0)])
    assert policy.asked == ["alias.example.test"]  # the CNAME target is not judged itself
    assert events[0].answers == ("198.51.100.20",)


async def test_cname_loop_is_safe(nursery: trio.Nursery) -> None:
    up = await start_fake_upstream(nursery)
    fwd, policy, events = make_forwarder([("127.0.0.1", up.port)])
    resp = await ask(fwd, query("loop1.example.test"))
    assert resp.rcode() == dns.rcode.NOERROR
    assert addresses(resp) == set()
    assert policy.learned == []
    assert events[0].verdict == "allowed" and events[0].answers == ()


async def test_guarded_address_stripped_and_reported(nursery: trio.Nursery) -> None:
    up = await start_fake_upstream(nursery)
    fwd, policy, events = make_forwarder([("127.0.0.1", up.port)])
    resp = await ask(fwd, query("evil.example.test"))
    assert resp.rcode() == dns.rcode.NOERROR
    assert addresses(resp) == {"192.0.2.11"}
    assert events[0].answers == ("192.0.2.11",)
    assert events[0].guarded == ("169.254.169.254",)


async def test_all_addresses_guarded_gives_nodata(nursery: trio.Nursery) -> None:
    up = await start_fake_upstream(nursery)
    fwd, _, events = make_forwarder([("127.0.0.1", up.port)])
    resp = await ask(fwd, query("allevil.example.test"))
    assert resp.rcode() == dns.rcode.NOERROR
    assert resp.answer == []
    assert events[0].answers == () and events[0].guarded == ("127.0.0.1",)


async def test_aaaa_passes_when_enabled(nursery: trio.Nursery) -> None:
    up = await start_fake_upstream(nursery)
    fwd, policy, _ = make_forwarder([("127.0.0.1", up.port)])
    resp = await ask(fwd, query("api.example.test", "AAAA"))
    assert addresses(resp, "AAAA") == {"2001:db8::10"}
    assert policy.learned[0][1] == [("2001:db8::10", 300.0)]


async def test_aaaa_suppressed_without_ipv6(nursery: trio.Nursery) -> None:
    up = await start_fake_upstream(nursery)
    fwd, policy, events = make_forwarder([("127.0.0.1", up.port)], aaaa=False)
    resp = await ask(fwd, query("api.example.test", "AAAA"))
    assert resp.rcode() == dns.rcode.NOERROR
    assert resp.answer == []
    assert up.queries == []
    assert policy.learned == []
    assert events[0].verdict == "allowed"
    # A still works.
    resp = await ask(fwd, query("api.example.test", "A"))
    assert addresses(resp) == {"192.0.2.10"}


async def test_aaaa_suppressed_denied_name_still_nxdomain(nursery: trio.Nursery) -> None:
    up = await start_fake_upstream(nursery)
    fwd, _, _ = make_forwarder([("127.0.0.1", up.port)], aaaa=False)
    resp = await ask(fwd, query("cdn.other.test", "AAAA"))
    assert resp.rcode() == dns.rcode.NXDOMAIN


async def test_txt_and_https_are_refused_not_forwarded(nursery: trio.Nursery) -> None:
    """Only A, AAAA and CNAME are served (the query type is a 16-bit channel out): other
    types of an admitted name are REFUSED and never reach the upstream."""
    up = await start_fake_upstream(nursery)
    fwd, policy, events = make_forwarder([("127.0.0.1", up.port)])
    for name, rdtype in (("api.example.test", "TXT"), ("https.example.test", "HTTPS"),
                         ("api.example.test", "SRV"), ("api.example.test", "ANY")):
        resp = await ask(fwd, query(name, rdtype))
        assert resp.rcode() == dns.rcode.REFUSED and resp.answer == [], rdtype
    assert up.queries == [] and policy.learned == []
    assert [(e.qtype, e.verdict) for e in events] == [
        ("TXT", "denied"), ("HTTPS", "denied"), ("SRV", "denied"), ("ANY", "denied")]
    assert events[0].reason == "query type TXT is not served"
    resp = await ask(fwd, query("alias.example.test", "CNAME"))
    assert resp.rcode() == dns.rcode.NOERROR and resp.answer, resp


async def test_upstream_nxdomain_passed_through(nursery: trio.Nursery) -> None:
    up = await start_fake_upstream(nursery)
    fwd, policy, events = make_forwarder([("127.0.0.1", up.port)])
    resp = await ask(fwd, query("missing.example.test"))
    assert resp.rcode() == dns.rcode.NXDOMAIN
    assert up.udp_queries == ["missing.example.test"]
    assert events[0].verdict == "allowed"


async def test_tcp_fallback_on_truncation(nursery: trio.Nursery) -> None:
    up = await start_fake_upstream(nursery)
    fwd, policy, events = make_forwarder([("127.0.0.1", up.port)])
    q = query("big.example.test", use_edns=0, payload=4096)
    resp = await ask(fwd, q)
    assert up.udp_queries == ["big.example.test"]
    assert up.tcp_queries == ["big.example.test"]
    assert len(addresses(resp)) == 60
    assert not resp.flags & dns.flags.TC
    assert len(policy.learned[0][1]) == 60
    assert len(events[0].answers) == 60


async def test_reply_truncated_to_client_udp_limit(nursery: trio.Nursery) -> None:
    up = await start_fake_upstream(nursery)
    fwd, policy, _ = make_forwarder([("127.0.0.1", up.port)])
    q = query("big.example.test")  # no EDNS: 512 bytes over UDP
    wire = await fwd.answer(q.to_wire())
    assert wire is not None and len(wire) <= 512
    resp = dns.message.from_wire(wire)
    assert resp.flags & dns.flags.TC
    # Over TCP the whole answer fits.
    wire = await fwd.answer(q.to_wire(), tcp=True)
    assert wire is not None
    resp = dns.message.from_wire(wire)
    assert not resp.flags & dns.flags.TC and len(addresses(resp)) == 60


async def test_edns_client_gets_edns_reply(nursery: trio.Nursery) -> None:
    up = await start_fake_upstream(nursery)
    fwd, _, _ = make_forwarder([("127.0.0.1", up.port)])
    resp = await ask(fwd, query("api.example.test", use_edns=0, payload=1400))
    assert resp.edns == 0
    resp = await ask(fwd, query("api.example.test"))
    assert resp.edns == -1


async def test_upstream_down_servfail_fast(nursery: trio.Nursery) -> None:
    fwd, _, events = make_forwarder([("127.0.0.1", dead_udp_port())], timeout=0.5)
    start = trio.current_time()
    resp = await ask(fwd, query("api.example.test"))
    assert trio.current_time() - start < 1.0
    assert resp.rcode() == dns.rcode.SERVFAIL
    assert events == [DnsEvent("api.example.test", "A", "error", "*.example.test")]


async def test_upstream_silent_servfail_within_timeout(nursery: trio.Nursery) -> None:
    up = await start_fake_upstream(nursery)
    fwd, _, events = make_forwarder([("127.0.0.1", up.port)], timeout=0.3)
    start = trio.current_time()
    resp = await ask(fwd, query("slow.example.test"))
    elapsed = trio.current_time() - start
    assert resp.rcode() == dns.rcode.SERVFAIL
    assert 0.2 < elapsed < 0.8
    assert events[0].verdict == "error"


async def test_garbage_from_upstream_servfail(nursery: trio.Nursery) -> None:
    up = await start_fake_upstream(nursery)
    fwd, _, events = make_forwarder([("127.0.0.1", up.port)], timeout=1.0)
    resp = await ask(fwd, query("garbage.example.test"))
    assert resp.rcode() == dns.rcode.SERVFAIL
    assert events[0].verdict == "error"


async def test_failover_to_second_upstream(nursery: trio.Nursery) -> None:
    up = await start_fake_upstream(nursery)
    fwd, _, _ = make_forwarder([("127.0.0.1", dead_udp_port()), ("127.0.0.1", up.port)])
    resp = await ask(fwd, query("api.example.test"))
    assert addresses(resp) == {"192.0.2.10"}


async def test_no_upstreams_servfail() -> None:
    fwd, _, _ = make_forwarder([])
    resp = await ask(fwd, query("api.example.test"))
    assert resp.rcode() == dns.rcode.SERVFAIL


@pytest.mark.parametrize(
    "wire",
    [
        b"",
        b"\x12",
        b"\x12\x34\x01\x00\x00\x01",  # 6 bytes: short header
        b"\x12\x34\x81\x80" + b"\x00" * 8,  # a response (QR set): dropped
    ],
)
async def test_unparseable_header_dropped(wire: bytes) -> None:
    fwd, _, events = make_forwarder([("127.0.0.1", 9)])
    assert await fwd.answer(wire) is None
    assert events == []


async def test_bad_body_formerr() -> None:
    fwd, _, events = make_forwarder([("127.0.0.1", 9)])
    # Header claims one question, body is junk (label length runs past the end).
    wire = b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x3fabc"
    out = await fwd.answer(wire)
    assert out is not None
    qid, flags = struct.unpack_from("!HH", out)
    assert qid == 0xABCD and flags & 0x8000 and flags & 0xF == dns.rcode.FORMERR
    assert events[0].verdict == "error"


async def test_compression_loop_formerr() -> None:
    fwd, _, _ = make_forwarder([("127.0.0.1", 9)])
    # Question name is a compression pointer to itself.
    wire = b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01"
    out = await fwd.answer(wire)
    assert out is not None and out[3] & 0xF == dns.rcode.FORMERR


async def test_random_bytes_never_raise() -> None:
    import random

    rng = random.Random(1)
    fwd, _, _ = make_forwarder([("127.0.0.1", dead_udp_port())], timeout=0.2)
    base = query("api.example.test").to_wire()
    for _ in range(300):
        if rng.random() < 0.5:
            wire = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        else:
            b = bytearray(base)
            for _ in range(rng.randrange(1, 6)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            wire = bytes(b)
        out = await fwd.answer(wire)
        if out is not None:
            assert out[:2] == wire[:2]
            assert out[2] & 0x80  # QR


async def test_two_questions_formerr() -> None:
    fwd, _, _ = make_forwarder([("127.0.0.1", 9)])
    q = query("api.example.test")
    q.question.append(query("cdn.other.test").question[0])
    resp = await ask_loose(fwd, q)
    assert resp.rcode() == dns.rcode.FORMERR


async def test_zero_questions_formerr() -> None:
    fwd, _, _ = make_forwarder([("127.0.0.1", 9)])
    q = dns.message.Message(id=99)
    resp = await ask_loose(fwd, q)
    assert resp.rcode() == dns.rcode.FORMERR


async def test_non_query_opcode_notimp(nursery: trio.Nursery) -> None:
    up = await start_fake_upstream(nursery)
    fwd, _, _ = make_forwarder([("127.0.0.1", up.port)])
    q = query("api.example.test")
    q.set_opcode(dns.opcode.STATUS)
    resp = await ask_loose(fwd, q)
    assert resp.rcode() == dns.rcode.NOTIMP
    assert up.queries == []


async def test_edns_version_1_badvers() -> None:
    fwd, _, _ = make_forwarder([("127.0.0.1", 9)])
    q = query("api.example.test", use_edns=1)
    resp = await ask_loose(fwd, q)
    assert resp.rcode() == dns.rcode.BADVERS


async def test_chaos_class_refused(nursery: trio.Nursery) -> None:
    up = await start_fake_upstream(nursery)
    fwd, _, _ = make_forwarder([("127.0.0.1", up.port)])
    q = dns.message.make_query("version.example.test", "TXT", "CH")
    resp = await ask_loose(fwd, q)
    assert resp.rcode() == dns.rcode.REFUSED
    assert up.queries == []


async def ask_loose(fwd: DnsForwarder, q: dns.message.Message) -> dns.message.Message:
    wire = await fwd.answer(q.to_wire())
    assert wire is not None
    resp = dns.message.from_wire(wire)
    assert resp.id == q.id and resp.flags & dns.flags.QR
    return resp


async def test_concurrent_queries_bounded(nursery: trio.Nursery) -> None:
    up = await start_fake_upstream(nursery)
    fwd, _, _ = make_forwarder([("127.0.0.1", up.port)], timeout=0.5, max_concurrent=2)
    results: list[int] = []

    async def one(i: int) -> None:
        resp = await ask(fwd, query("slow.example.test", qid=i))
        results.append(resp.rcode())

    async with trio.open_nursery() as n:
        for i in range(10):
            n.start_soon(one, i)
    # 2 in flight + 2 waiting reach the upstream path; the other 6 are refused at once.
    assert results.count(dns.rcode.SERVFAIL) == 10
    assert len(up.udp_queries) <= 4


async def test_concurrent_queries_all_answered(nursery: trio.Nursery) -> None:
    up = await start_fake_upstream(nursery)
    fwd, policy, _ = make_forwarder([("127.0.0.1", up.port)], max_concurrent=4)
    got: list[set[str]] = []

    async def one(i: int) -> None:
        got.append(addresses(await ask(fwd, query("api.example.test", qid=i))))

    async with trio.open_nursery() as n:
        for i in range(8):
            n.start_soon(one, i)
    assert got == [{"192.0.2.10"}] * 8


async def test_policy_exception_gives_servfail(nursery: trio.Nursery) -> None:
    up = await start_fake_upstream(nursery)
    fwd, policy, _ = make_forwarder([("127.0.0.1", up.port)])

    def boom(*a: object, **k: object) -> list[str]:
        raise RuntimeError("policy bug")

    policy.learn = boom  # type: ignore[method-assign]
    resp = await ask(fwd, query("api.example.test"))
    assert resp.rcode() == dns.rcode.SERVFAIL


# ---------------------------------------------------------------------------------- framing


def test_framer_splits_and_joins() -> None:
    m1, m2, m3 = b"\x00\x01first", b"\x00\x02second message", b"x" * 300
    stream = TcpDnsFramer.frame(m1) + TcpDnsFramer.frame(m2) + TcpDnsFramer.frame(m3)
    # Whole stream at once.
    f = TcpDnsFramer()
    assert f.feed(stream) == [m1, m2, m3]
    assert f.pending == 0
    # One byte at a time.
    f = TcpDnsFramer()
    out: list[bytes] = []
    for i in range(len(stream)):
        out += f.feed(stream[i : i + 1])
    assert out == [m1, m2, m3]
    # Split in the middle of a length prefix and of a body.
    f = TcpDnsFramer()
    assert f.feed(stream[:1]) == []
    assert f.feed(stream[1:5]) == []
    assert f.feed(stream[5 : len(m1) + 3]) == [m1]
    assert f.feed(stream[len(m1) + 3 :]) == [m2, m3]


def test_framer_bounded_and_limits() -> None:
    f = TcpDnsFramer()
    big = b"y" * 65535
    framed = TcpDnsFramer.frame(big)
    assert f.feed(framed[:-1]) == []
    assert f.pending == 65536  # one partial message + prefix, never more
    assert f.feed(framed[-1:]) == [big]
    assert f.pending == 0
    with pytest.raises(ValueError):
        TcpDnsFramer.frame(b"z" * 65536)
    # Zero-length frames carry nothing.
    assert f.feed(b"\x00\x00" + TcpDnsFramer.frame(b"ok")) == [b"ok"]


async def test_tcp_query_through_framer(nursery: trio.Nursery) -> None:
    up = await start_fake_upstream(nursery)
    fwd, _, _ = make_forwarder([("127.0.0.1", up.port)])
    f = TcpDnsFramer()
    stream = TcpDnsFramer.frame(query("api.example.test", qid=1).to_wire()) + TcpDnsFramer.frame(
        query("cdn.other.test", qid=2).to_wire()
    )
    replies = []
    for msg in f.feed(stream):
        out = await fwd.answer(msg, tcp=True)
        assert out is not None
        replies.append(dns.message.from_wire(out))
    assert [r.id for r in replies] == [1, 2]
    assert [r.rcode() for r in replies] == [dns.rcode.NOERROR, dns.rcode.NXDOMAIN]


# ------------------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.53", ("192.0.2.53", 53)),
        ("192.0.2.53:5353", ("192.0.2.53", 5353)),
        ("2001:db8::53", ("2001:db8::53", 53)),
        ("[2001:db8::53]:5353", ("2001:db8::53", 5353)),
        ("[2001:db8::53]", ("2001:db8::53", 53)),
        (" 2001:DB8:0::53 ", ("2001:db8::53", 53)),
        ("127.0.0.53", ("127.0.0.53", 53)),
    ],
)
def test_parse_upstream(text: str, expected: tuple[str, int]) -> None:
    assert parse_upstream(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ns.example.com",
        "192.0.2.53:",
        "192.0.2.53:0",
        "192.0.2.53:65536",
        "192.0.2.53:x",
        "[192.0.2.53]:53",
        "[2001:db8::53",
        "[2001:db8::53]53",
        "2001:db8::53:5353:1:2:3:4:5",
        "999.0.2.1",
    ],
)
def test_parse_upstream_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="upstream"):
        parse_upstream(text)


def test_upstreams_from_resolv_conf(tmp_path: object) -> None:
    import pathlib

    assert isinstance(tmp_path, pathlib.Path)
    p = tmp_path / "resolv.conf"
    p.write_text(
        "# generated\n"
        "search example.com\n"
        "nameserver 192.0.2.53\n"
        "; comment\n"
        "nameserver   2001:db8::53  \n"
        "nameserver not-an-address\n"
        "nameserver 127.0.0.53\n"
        "nameserver 192.0.2.53\n"
        "options edns0\n"
    )
    assert upstreams_from_resolv_conf(str(p)) == [
        ("192.0.2.53", 53),
        ("2001:db8::53", 53),
        ("127.0.0.53", 53),
    ]
    empty = tmp_path / "empty.conf"
    empty.write_text("search example.com\n")
    assert upstreams_from_resolv_conf(str(empty)) == []
    assert upstreams_from_resolv_conf(str(tmp_path / "missing.conf")) == []


# ------------------------------------------------------------------- with the real Policy


async def test_with_real_policy(nursery: trio.Nursery) -> None:
    policy_mod = pytest.importorskip("tapbox.policy")
    allowlist_mod = pytest.importorskip("tapbox.allowlist")
    rules = allowlist_mod.parse_lines(["*.example.test", "api.example.test:443"], "test")
    policy = policy_mod.Policy(allowlist_mod.Allowlist(rules))
    up = await start_fake_upstream(nursery)
    events: list[DnsEvent] = []
    fwd = DnsForwarder(policy, [("127.0.0.1", up.port)], on_event=events.append, clock=lambda: 0.0)

    resp = await ask(fwd, query("alias.example.test"))
    assert addresses(resp) == {"198.51.100.20"}
    assert policy.decide("198.51.100.20", 443, now=1.0).allowed
    assert not policy.decide("198.51.100.20", 443, now=10_000.0).allowed  # ttl ran out

    resp = await ask(fwd, query("evil.example.test"))
    assert addresses(resp) == {"192.0.2.11"}
    assert events[-1].guarded == ("169.254.169.254",)
    assert not policy.decide("169.254.169.254", 80, now=1.0).allowed

    resp = await ask(fwd, query("cdn.other.test"))
    assert resp.rcode() == dns.rcode.NXDOMAIN
