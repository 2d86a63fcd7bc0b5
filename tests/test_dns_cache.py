"""The DNS forwarder's cache (tapbox.net.dns.DnsCache): upstream answers kept for their TTL,
keyed on the lowercased name and the type, bounded; the policy still judges every query."""

from __future__ import annotations

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import trio
from test_dns import addresses, ask, make_forwarder, query, start_fake_upstream

from tapbox.net.dns import DnsCache


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ttls(resp: dns.message.Message) -> list[int]:
    return [rrset.ttl for rrset in resp.answer]


async def test_a_repeated_query_is_answered_from_the_cache_with_its_ttl_counted_down(
        nursery: trio.Nursery) -> None:
    up = await start_fake_upstream(nursery)
    clock = Clock()
    fwd, policy, events = make_forwarder([("127.0.0.1", up.port)], clock=clock)
    first = await ask(fwd, query("api.example.test", qid=1))
    clock.now += 100.4
    second = await ask(fwd, query("api.example.test", qid=2))
    assert up.udp_queries == ["api.example.test"]  # asked upstream once
    assert addresses(first) == addresses(second) == {"192.0.2.10"}
    assert ttls(first) == [300] and ttls(second) == [200]
    # The policy judged both queries and learned the addresses both times, with what is left.
    assert policy.asked == ["api.example.test", "api.example.test"]
    assert [(ttl, now) for _, [(_, ttl)], now in policy.learned] == [(300.0, 1000.0),
                                                                     (200.0, 1100.4)]
    assert [e.verdict for e in events] == ["allowed", "allowed"]


async def test_the_answer_is_asked_again_once_its_ttl_is_over(nursery: trio.Nursery) -> None:
    up = await start_fake_upstream(nursery)
    clock = Clock()
    fwd, _, _ = make_forwarder([("127.0.0.1", up.port)], clock=clock)
    await ask(fwd, query("api.example.test"))
    clock.now += 300
    resp = await ask(fwd, query("api.example.test"))
    assert up.udp_queries == ["api.example.test", "api.example.test"]
    assert ttls(resp) == [300]


async def test_keyed_on_the_lowercased_name_and_the_type(nursery: trio.Nursery) -> None:
    up = await start_fake_upstream(nursery)
    fwd, _, _ = make_forwarder([("127.0.0.1", up.port)], clock=Clock())
    await ask(fwd, query("api.example.test"))
    mixed = await ask(fwd, query("API.Example.TEST"))  # ask() checks the question's own case
    assert addresses(mixed) == {"192.0.2.10"}
    aaaa = await ask(fwd, query("api.example.test", "AAAA"))
    assert addresses(aaaa, "AAAA") == {"2001:db8::10"}
    assert up.udp_queries == ["api.example.test", "api.example.test"]  # A once, AAAA once


async def test_a_name_denied_now_is_denied_whatever_was_cached(nursery: trio.Nursery) -> None:
    up = await start_fake_upstream(nursery)
    fwd, policy, events = make_forwarder([("127.0.0.1", up.port)], clock=Clock())
    await ask(fwd, query("api.example.test"))
    policy.name_allowed = lambda name: []  # type: ignore[method-assign]
    resp = await ask(fwd, query("api.example.test"))
    assert resp.rcode() == dns.rcode.NXDOMAIN and not resp.answer
    assert events[-1].verdict == "denied"
    assert len(policy.learned) == 1 and up.udp_queries == ["api.example.test"]


async def test_failures_are_not_cached(nursery: trio.Nursery) -> None:
    up = await start_fake_upstream(nursery)
    fwd, _, _ = make_forwarder([("127.0.0.1", up.port)], clock=Clock(), timeout=0.3)
    for _ in range(2):
        resp = await ask(fwd, query("garbage.example.test"))
        assert resp.rcode() == dns.rcode.SERVFAIL
    assert up.udp_queries == ["garbage.example.test", "garbage.example.test"]
    assert len(fwd.cache) == 0


def _answer(name: str, ttl: int, rcode: int = dns.rcode.NOERROR,
            soa: tuple[int, int] | None = None) -> dns.message.Message:
    msg = dns.message.make_response(dns.message.make_query(name, "A"))
    msg.set_rcode(rcode)
    if rcode == dns.rcode.NOERROR and soa is None:
        msg.answer.append(dns.rrset.from_text(name, ttl, "IN", "A", "192.0.2.1"))
    if soa is not None:
        soa_ttl, minimum = soa
        msg.authority.append(dns.rrset.from_text(
            "example.test.", soa_ttl, "IN", "SOA",
            f"ns.example.test. host.example.test. 1 7200 900 1209600 {minimum}"))
    return msg


def test_negative_answers_are_kept_for_their_soa_s_negative_ttl() -> None:
    cache = DnsCache()
    key = ("gone.example.test", int(dns.rdatatype.A), False)
    cache.put(key, _answer("gone.example.test.", 0, dns.rcode.NXDOMAIN, soa=(3600, 60)), 0.0)
    bare = ("bare.example.test", int(dns.rdatatype.A), False)
    cache.put(bare, _answer("bare.example.test.", 0, dns.rcode.NXDOMAIN), 0.0)  # no SOA
    servfail = ("sf.example.test", int(dns.rdatatype.A), False)
    cache.put(servfail, _answer("sf.example.test.", 300, dns.rcode.SERVFAIL), 0.0)
    zero = ("zero.example.test", int(dns.rdatatype.A), False)
    cache.put(zero, _answer("zero.example.test.", 0), 0.0)
    assert len(cache) == 1  # none of the last three is kept
    assert cache.get(key, 59.0) is not None  # RFC 2308 §5: min(SOA TTL, SOA MINIMUM)
    assert cache.get(key, 60.0) is None


def test_the_cache_is_bounded_least_recently_used_first_and_ttls_are_capped() -> None:
    cache = DnsCache(size=2, max_ttl=600)
    keys = [(f"n{i}.example.test", int(dns.rdatatype.A), False) for i in range(3)]
    cache.put(keys[0], _answer("n0.example.test.", 86400), 0.0)
    cache.put(keys[1], _answer("n1.example.test.", 86400), 0.0)
    assert cache.get(keys[0], 1.0) is not None  # n0 is now the most recently used
    cache.put(keys[2], _answer("n2.example.test.", 86400), 0.0)
    assert len(cache) == 2
    assert cache.get(keys[1], 1.0) is None
    assert cache.get(keys[0], 599.0) is not None and cache.get(keys[0], 600.0) is None
