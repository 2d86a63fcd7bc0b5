"""Tests for tapbox.policy: the rebinding guard, DNS learning, flow decisions."""

from __future__ import annotations

import ipaddress

import pytest

from tapbox.allowlist import Allowlist, parse_rule
from tapbox.policy import SANDBOX_NET4, SANDBOX_NET6, Decision, Policy, is_guarded


def make_policy(*texts: str, **kwargs) -> Policy:
    rules = [parse_rule(t, f"allowed.txt:{i + 1}") for i, t in enumerate(texts)]
    return Policy(Allowlist(rules), **kwargs)


def resolve(policy: Policy, name: str, addresses, now: float = 0.0) -> list[str]:
    """What the DNS server does on an allowed answer."""
    rules = policy.name_allowed(name)
    assert rules, f"{name} should be allowed"
    return policy.learn(name, rules, addresses, now)


# ---------------------------------------------------------------------------------------------
# is_guarded


def test_sandbox_network_constants():
    assert SANDBOX_NET4 == ipaddress.IPv4Network("10.0.2.0/24")
    assert SANDBOX_NET6 == ipaddress.IPv6Network("fd00::/64")


@pytest.mark.parametrize(
    ("ip", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "metadata"),
        ("169.254.0.1", "link-local"),
        ("fe80::1", "link-local"),
        ("febf:ffff::1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("0.1.2.3", "this network"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("10.0.2.2", "sandbox network"),
        ("10.0.2.3", "sandbox network"),
        ("10.0.2.100", "sandbox network"),
        ("fd00::2", "sandbox network"),
        ("fd00::ffff:ffff:ffff:ffff", "sandbox network"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "metadata"),
        ("::ffff:0.0.0.0", "unspecified"),
        ("::ffff:224.0.0.1", "multicast"),
        ("::ffff:10.0.2.2", "sandbox network"),
    ],
)
def test_guarded_addresses(ip, reason):
    assert is_guarded(ip) == reason
    assert is_guarded(ipaddress.ip_address(ip)) == reason


@pytest.mark.parametrize(
    "ip",
    [
        "192.0.2.1",
        "198.51.100.1",
        "203.0.113.255",
        "2001:db8::1",
        "10.0.3.1",  # next to, but outside, the sandbox network
        "10.0.1.255",
        "fd00:0:0:1::1",  # outside fd00::/64
        "::ffff:192.0.2.1",
        "1.0.0.0",
        "223.255.255.255",
    ],
)
def test_not_guarded(ip):
    assert is_guarded(ip) is None


def test_is_guarded_rejects_garbage():
    with pytest.raises(ValueError):
        is_guarded("example.com")


# ---------------------------------------------------------------------------------------------
# Explicit rules


def test_explicit_network_rule():
    policy = make_policy("192.0.2.0/24")
    decision = policy.decide("192.0.2.10", 443, now=0.0)
    assert decision == Decision(True, decision.rule, None, "rule 192.0.2.0/24")
    assert decision.rule is not None and decision.rule.source == "allowed.txt:1"


def test_explicit_rule_port_restriction():
    policy = make_policy("[2001:db8::/32]:443")
    assert policy.decide("2001:db8::5", 443, 0.0).allowed
    denied = policy.decide("2001:db8::5", 80, 0.0)
    assert not denied.allowed
    assert denied.reason == "no rule"
    assert denied.rule is None


def test_explicit_rule_admits_guarded_address():
    policy = make_policy("127.0.0.1:8080", "169.254.169.254", "10.0.2.2:53", "fe80::/10")
    assert policy.decide("127.0.0.1", 8080, 0.0).allowed
    assert not policy.decide("127.0.0.1", 8081, 0.0).allowed
    assert policy.decide("169.254.169.254", 80, 0.0).allowed
    assert policy.decide("::ffff:169.254.169.254", 80, 0.0).allowed
    assert policy.decide("10.0.2.2", 53, 0.0).allowed
    assert policy.decide("fe80::1234", 22, 0.0).allowed


def test_empty_allowlist_denies_everything():
    policy = make_policy()
    for ip in ["192.0.2.1", "2001:db8::1", "127.0.0.1"]:
        decision = policy.decide(ip, 443, 0.0)
        assert decision == Decision(False, None, None, "no rule")
    assert policy.name_allowed("example.com") == []


def test_name_rule_alone_admits_no_address():
    policy = make_policy("example.com")
    assert not policy.decide("192.0.2.1", 443, 0.0).allowed


# ---------------------------------------------------------------------------------------------
# DNS learning


def test_learned_address_is_admitted_with_name_and_rule():
    policy = make_policy("*.example.com")
    assert resolve(policy, "api.example.com", [("192.0.2.10", 600)]) == []
    decision = policy.decide("192.0.2.10", 443, now=1.0)
    assert decision.allowed
    assert decision.name == "api.example.com"
    assert decision.rule is not None and decision.rule.text == "*.example.com"
    assert decision.reason == "dns api.example.com via *.example.com"
    assert not policy.decide("192.0.2.11", 443, now=1.0).allowed


def test_learned_name_is_normalized():
    policy = make_policy("example.com")
    resolve(policy, "EXAMPLE.com.", [("192.0.2.10", 600)])
    assert policy.decide("192.0.2.10", 80, 1.0).name == "example.com"


def test_learned_ipv6_and_mapped():
    policy = make_policy("example.com")
    resolve(policy, "example.com", [("2001:db8::10", 600), ("198.51.100.4", 600)])
    assert policy.decide("2001:db8::10", 443, 1.0).allowed
    assert policy.decide("::ffff:198.51.100.4", 443, 1.0).allowed


def test_ttl_expiry():
    policy = make_policy("example.com", min_ttl=0)
    resolve(policy, "example.com", [("192.0.2.10", 60)], now=1000.0)
    assert policy.decide("192.0.2.10", 443, 1000.0).allowed
    assert policy.decide("192.0.2.10", 443, 1059.9).allowed
    expired = policy.decide("192.0.2.10", 443, 1060.0)
    assert not expired.allowed
    assert expired.reason == "no rule"


def test_min_ttl_extends_short_ttl():
    policy = make_policy("example.com")  # default min_ttl = 300
    resolve(policy, "example.com", [("192.0.2.10", 5)], now=0.0)
    assert policy.decide("192.0.2.10", 443, 299.0).allowed
    assert not policy.decide("192.0.2.10", 443, 300.0).allowed


def test_ttl_longer_than_min_ttl_is_kept():
    policy = make_policy("example.com", min_ttl=300)
    resolve(policy, "example.com", [("192.0.2.10", 3600)], now=0.0)
    assert policy.decide("192.0.2.10", 443, 3599.0).allowed
    assert not policy.decide("192.0.2.10", 443, 3600.0).allowed


def test_zero_and_negative_ttl_get_min_ttl():
    policy = make_policy("example.com", min_ttl=10)
    resolve(policy, "example.com", [("192.0.2.1", 0), ("192.0.2.2", -5)], now=0.0)
    assert policy.decide("192.0.2.1", 1, 9.0).allowed
    assert policy.decide("192.0.2.2", 1, 9.0).allowed
    assert not policy.decide("192.0.2.2", 1, 10.0).allowed


def test_relearning_refreshes_expiry():
    policy = make_policy("example.com", min_ttl=0)
    resolve(policy, "example.com", [("192.0.2.10", 100)], now=0.0)
    resolve(policy, "example.com", [("192.0.2.10", 100)], now=90.0)
    assert policy.decide("192.0.2.10", 443, 150.0).allowed
    assert not policy.decide("192.0.2.10", 443, 190.0).allowed


def test_shorter_relearn_does_not_shorten_expiry():
    policy = make_policy("example.com", min_ttl=0)
    resolve(policy, "example.com", [("192.0.2.10", 1000)], now=0.0)
    resolve(policy, "example.com", [("192.0.2.10", 10)], now=1.0)
    assert policy.decide("192.0.2.10", 443, 500.0).allowed


def test_name_rule_port_restriction():
    policy = make_policy("api.example.com:443")
    resolve(policy, "api.example.com", [("192.0.2.10", 600)])
    assert policy.decide("192.0.2.10", 443, 1.0).allowed
    denied = policy.decide("192.0.2.10", 80, 1.0)
    assert not denied.allowed
    assert denied.rule is None
    assert denied.name == "api.example.com"
    assert denied.reason == "port 80 not admitted (dns api.example.com via api.example.com:443)"


def test_several_rules_for_one_name_each_admit_their_ports():
    policy = make_policy("git.example.com:22", "git.example.com:443", "*.example.com:8000-8080")
    resolve(policy, "git.example.com", [("192.0.2.10", 600)])
    assert policy.decide("192.0.2.10", 22, 1.0).rule.text == "git.example.com:22"
    assert policy.decide("192.0.2.10", 443, 1.0).rule.text == "git.example.com:443"
    assert policy.decide("192.0.2.10", 8000, 1.0).rule.text == "*.example.com:8000-8080"
    assert not policy.decide("192.0.2.10", 80, 1.0).allowed


def test_shared_address_learned_under_two_names():
    policy = make_policy("a.example.com:443", "b.example.test:22", min_ttl=0)
    resolve(policy, "a.example.com", [("203.0.113.5", 100)], now=0.0)
    resolve(policy, "b.example.test", [("203.0.113.5", 1000)], now=0.0)
    assert policy.decide("203.0.113.5", 443, 50.0).name == "a.example.com"
    assert policy.decide("203.0.113.5", 22, 50.0).name == "b.example.test"
    # a.example.com's admission has expired; b.example.test's has not.
    assert not policy.decide("203.0.113.5", 443, 200.0).allowed
    assert policy.decide("203.0.113.5", 22, 200.0).allowed


def test_learn_with_no_rules_admits_nothing():
    policy = make_policy("example.com")
    assert policy.learn("other.test", [], [("192.0.2.10", 600)], 0.0) == []
    assert not policy.decide("192.0.2.10", 443, 1.0).allowed


def test_explicit_rule_wins_over_dns():
    policy = make_policy("example.com", "192.0.2.0/24:443")
    resolve(policy, "example.com", [("192.0.2.10", 600)])
    decision = policy.decide("192.0.2.10", 443, 1.0)
    assert decision.reason == "rule 192.0.2.0/24:443"
    assert decision.name is None
    # other ports still come through DNS learning
    assert policy.decide("192.0.2.10", 80, 1.0).name == "example.com"


# ---------------------------------------------------------------------------------------------
# Rebinding guard in learning


@pytest.mark.parametrize(
    "ip",
    [
        "127.0.0.1",
        "::1",
        "169.254.169.254",
        "fe80::1",
        "0.0.0.0",
        "::",
        "224.0.0.251",
        "ff02::fb",
        "10.0.2.2",
        "fd00::3",
        "::ffff:127.0.0.1",
        "::ffff:10.0.2.3",
    ],
)
def test_guarded_addresses_are_not_learned(ip):
    policy = make_policy("*.example.com")
    skipped = resolve(policy, "evil.example.com", [(ip, 600), ("192.0.2.10", 600)])
    assert skipped == [ip]
    decision = policy.decide(ip, 443, 1.0)
    assert not decision.allowed
    assert decision.name == "evil.example.com"
    assert decision.reason == f"guarded address ({is_guarded(ip)}) not admitted by name rule"
    assert policy.decide("192.0.2.10", 443, 1.0).allowed  # the good address still learned


def test_guarded_address_without_dns_is_plain_no_rule():
    policy = make_policy("example.com")
    assert policy.decide("127.0.0.1", 80, 0.0).reason == "no rule"


def test_guarded_note_expires():
    policy = make_policy("example.com", min_ttl=0)
    resolve(policy, "example.com", [("127.0.0.1", 10)], now=0.0)
    assert policy.decide("127.0.0.1", 80, 5.0).reason.startswith("guarded address (loopback)")
    assert policy.decide("127.0.0.1", 80, 11.0).reason == "no rule"


def test_explicit_rule_admits_guarded_address_that_dns_returned():
    policy = make_policy("example.com", "127.0.0.1:8080")
    assert resolve(policy, "example.com", [("127.0.0.1", 600)]) == ["127.0.0.1"]
    allowed = policy.decide("127.0.0.1", 8080, 1.0)
    assert allowed.allowed and allowed.reason == "rule 127.0.0.1:8080"
    assert not policy.decide("127.0.0.1", 8081, 1.0).allowed


# ---------------------------------------------------------------------------------------------
# Bounds and housekeeping


def test_bounded_entries_evicts_soonest_expiring():
    policy = make_policy("example.com", min_ttl=0, max_entries=3)
    resolve(policy, "example.com", [("192.0.2.1", 500)], now=0.0)
    resolve(policy, "example.com", [("192.0.2.2", 100)], now=0.0)  # soonest to expire
    resolve(policy, "example.com", [("192.0.2.3", 300)], now=0.0)
    assert len(policy) == 3
    resolve(policy, "example.com", [("192.0.2.4", 400)], now=0.0)
    assert len(policy) == 3
    assert not policy.decide("192.0.2.2", 443, 1.0).allowed
    for ip in ["192.0.2.1", "192.0.2.3", "192.0.2.4"]:
        assert policy.decide(ip, 443, 1.0).allowed


def test_bound_uses_refreshed_expiry():
    policy = make_policy("example.com", min_ttl=0, max_entries=2)
    resolve(policy, "example.com", [("192.0.2.1", 100), ("192.0.2.2", 200)], now=0.0)
    resolve(policy, "example.com", [("192.0.2.1", 1000)], now=0.0)  # now the latest
    resolve(policy, "example.com", [("192.0.2.3", 500)], now=0.0)
    assert policy.decide("192.0.2.1", 443, 1.0).allowed
    assert not policy.decide("192.0.2.2", 443, 1.0).allowed
    assert policy.decide("192.0.2.3", 443, 1.0).allowed


def test_bound_holds_under_many_learns_with_mixed_families():
    policy = make_policy("*.example.com", min_ttl=0, max_entries=50)
    for i in range(2000):
        ip = f"2001:db8::{i:x}" if i % 2 else f"198.51.{i // 256}.{i % 256}"
        # same TTL for many entries: ties must not compare IPv4 with IPv6 addresses
        resolve(policy, f"h{i}.example.com", [(ip, 100 + i % 3)], now=0.0)
        assert len(policy) <= 50
    assert len(policy._expiry_heap) <= 2 * 50 + 64 + 1


def test_expire_purges_old_entries():
    policy = make_policy("example.com", min_ttl=0)
    resolve(policy, "example.com", [("192.0.2.1", 10), ("192.0.2.2", 100)], now=0.0)
    assert len(policy) == 2
    policy.expire(50.0)
    assert len(policy) == 1
    assert policy.decide("192.0.2.2", 1, 50.0).allowed


def test_learn_purges_expired_entries():
    policy = make_policy("example.com", min_ttl=0)
    resolve(policy, "example.com", [("192.0.2.1", 10)], now=0.0)
    resolve(policy, "example.com", [("192.0.2.2", 10)], now=100.0)
    assert len(policy) == 1


def test_constructor_validation():
    with pytest.raises(ValueError):
        make_policy(min_ttl=-1)
    with pytest.raises(ValueError):
        make_policy(max_entries=0)


def test_name_allowed_is_allowlist_name_rules():
    policy = make_policy("*.example.com", "example.test")
    assert [r.text for r in policy.name_allowed("a.b.example.com")] == ["*.example.com"]
    assert policy.name_allowed("example.com") == []
    assert [r.text for r in policy.name_allowed("EXAMPLE.TEST.")] == ["example.test"]


def test_decision_is_frozen():
    decision = make_policy().decide("192.0.2.1", 1, 0.0)
    with pytest.raises(AttributeError):
        decision.allowed = True  # type: ignore[misc]
