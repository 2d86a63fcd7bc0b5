"""tapbox.guard and the policy: what only an explicit rule inside a guarded range reaches.

(a) the host's own addresses are guarded like its loopback; (b) every IPv6 form of an IPv4
address (mapped, compatible, NAT64) is judged as the IPv4 address; (c) a broad rule does not
admit guarded ranges, a rule inside one does. One Guard serves the policy, the DNS rebinding
guard and audit mode.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest

from tapbox import hostaddrs, rtnetlink
from tapbox.allowlist import Allowlist, normalize_address, parse_rule
from tapbox.auditpolicy import WOULD_DENY, AuditPolicy
from tapbox.errors import SetupError
from tapbox.guard import HOST_OWN, Guard
from tapbox.hostaddrs import host_addresses
from tapbox.policy import Policy

HOST = ("192.0.2.1", "2001:db8::2", "198.51.100.7")


def policy(*rules: str, audit: bool = False) -> Policy:
    allowlist = Allowlist([parse_rule(r) for r in rules])
    cls = AuditPolicy if audit else Policy
    return cls(allowlist, guard=Guard(HOST))


@pytest.mark.parametrize("ip", ["192.0.2.1", "::ffff:192.0.2.1", "::192.0.2.1",
                                "64:ff9b::192.0.2.1", "2001:db8::2", "198.51.100.7"])
def test_the_host_s_own_addresses_are_guarded_in_every_form(ip: str) -> None:
    assert Guard(HOST).reason(ip) == HOST_OWN
    assert Guard().reason(ip) is None  # without the host's addresses they are not


@pytest.mark.parametrize(("ip", "v4"), [
    ("::ffff:10.0.2.2", "10.0.2.2"), ("::10.0.2.2", "10.0.2.2"),
    ("64:ff9b::a9fe:a9fe", "169.254.169.254"), ("::ffff:7f00:1", "127.0.0.1"),
])
def test_ipv6_forms_are_normalised_to_ipv4(ip: str, v4: str) -> None:
    assert normalize_address(ip) == ipaddress.IPv4Address(v4)
    assert Guard().reason(ip) == Guard().reason(v4) is not None


def test_loopback_and_unspecified_ipv6_are_not_taken_for_ipv4() -> None:
    assert normalize_address("::1") == ipaddress.IPv6Address("::1")
    assert normalize_address("::") == ipaddress.IPv6Address("::")
    assert Guard().reason("::1") == "loopback"


@pytest.mark.parametrize("broad", ["0.0.0.0/0", "10.0.0.0/8", "192.0.0.0/8", "169.0.0.0/8",
                                   "::/0", "fd00::/8", "fe00::/7", "126.0.0.0/7"])
@pytest.mark.parametrize("ip", ["169.254.169.254", "169.254.1.1", "127.0.0.1", "10.0.2.2",
                                "10.0.2.3", "0.1.2.3", "192.0.2.1", "198.51.100.7",
                                "::1", "fe80::1", "fd00::2", "fd00:ec2::254", "2001:db8::2",
                                "::ffff:10.0.2.2", "64:ff9b::a9fe:a9fe", "::ffff:192.0.2.1"])
def test_a_broad_rule_does_not_admit_guarded_addresses(broad: str, ip: str) -> None:
    decision = policy(broad).decide(ip, 80, 0.0)
    assert not decision.allowed, decision
    network, address = ipaddress.ip_network(broad), normalize_address(ip)
    if network.version == address.version and address in network:
        assert decision.reason.startswith("guarded address (")
        assert decision.reason.endswith(f"not admitted by broad rule {broad}")


def test_a_broad_rule_still_admits_what_is_not_guarded() -> None:
    p = policy("0.0.0.0/0", "::/0")
    for ip in ("192.0.2.10", "203.0.113.7", "10.0.3.1", "2001:db8::10", "fd00:1::1",
               "::ffff:192.0.2.10", "64:ff9b::c000:20a"):
        assert p.decide(ip, 443, 0.0).allowed, ip


@pytest.mark.parametrize(("rule", "ip"), [
    ("169.254.169.254:80", "169.254.169.254"),
    ("169.254.0.0/16", "169.254.169.254"),
    ("127.0.0.1", "::ffff:127.0.0.1"),
    ("127.0.0.0/8", "127.0.0.1"),
    ("192.0.2.1", "192.0.2.1"),
    ("192.0.2.1:80", "64:ff9b::192.0.2.1"),
    ("[2001:db8::2]:80", "2001:db8::2"),
    ("fe80::/10", "fe80::1"),
    ("10.0.2.2", "10.0.2.2"),
    ("::ffff:127.0.0.1", "127.0.0.1"),
    ("64:ff9b::a9fe:a9fe", "169.254.169.254"),
])
def test_a_rule_inside_the_guarded_range_admits_it(rule: str, ip: str) -> None:
    decision = policy(rule).decide(ip, 80, 0.0)
    assert decision.allowed and decision.reason == f"rule {rule}", decision


def test_the_host_s_own_address_needs_that_address_not_its_subnet() -> None:
    # 192.0.2.0/24 holds the host's 192.0.2.1 but does not lie inside the guarded /32.
    p = policy("192.0.2.0/24")
    assert p.decide("192.0.2.10", 80, 0.0).allowed
    assert not p.decide("192.0.2.1", 80, 0.0).allowed


def test_the_first_admitting_rule_is_found_past_a_broad_one() -> None:
    p = policy("0.0.0.0/0", "169.254.169.254:80")
    assert p.decide("169.254.169.254", 80, 0.0).reason == "rule 169.254.169.254:80"
    assert not p.decide("169.254.169.254", 81, 0.0).allowed
    assert p.decide("192.0.2.10", 81, 0.0).reason == "rule 0.0.0.0/0"


def test_dns_never_teaches_the_host_s_own_addresses() -> None:
    p = policy("*.example.test")
    answers = [("192.0.2.1", 60), ("::ffff:192.0.2.1", 60), ("64:ff9b::a9fe:a9fe", 60),
               ("2001:db8::2", 60), ("192.0.2.10", 60)]
    skipped = p.learn("evil.example.test", p.name_allowed("evil.example.test"), answers, 0.0)
    assert skipped == [a for a, _ in answers[:4]]
    assert p.decide("192.0.2.10", 443, 1.0).allowed
    denied = p.decide("192.0.2.1", 443, 1.0)
    assert not denied.allowed and denied.name == "evil.example.test"
    assert denied.reason == f"guarded address ({HOST_OWN}) not admitted by name rule"


def test_dns64_answers_are_learned_as_the_ipv4_address() -> None:
    p = policy("api.example.test")
    p.learn("api.example.test", p.name_allowed("api.example.test"),
            [("64:ff9b::c000:20a", 60)], 0.0)
    assert p.decide("192.0.2.10", 443, 1.0).allowed
    assert p.decide("64:ff9b::c000:20a", 443, 1.0).allowed


def test_audit_mode_never_lets_a_flow_through_to_the_host() -> None:
    p = policy("api.example.test", audit=True)
    assert p.learn("other.test", [WOULD_DENY], [("192.0.2.1", 60)], now=0) == ["192.0.2.1"]
    for ip in ("192.0.2.1", "2001:db8::2", "::ffff:192.0.2.1", "127.0.0.1", "169.254.169.254"):
        decision = p.decide(ip, 8081, 1.0)
        assert not decision.allowed and not decision.would_deny, (ip, decision)
    assert p.decide("203.0.113.7", 80, 1.0).would_deny  # the rest is let through


def test_ipv6_forms_in_rules_are_the_ipv4_rule() -> None:
    assert parse_rule("64:ff9b::192.0.2.10").network == ipaddress.IPv4Network("192.0.2.10/32")
    assert parse_rule("::ffff:192.0.2.0/120").network == ipaddress.IPv4Network("192.0.2.0/24")
    assert parse_rule("[64:ff9b::/96]:443").network == ipaddress.IPv4Network("0.0.0.0/0")
    assert parse_rule("::1").network == ipaddress.IPv6Network("::1/128")


def test_the_host_s_addresses_are_read_from_the_kernel() -> None:
    import fakenet

    found = host_addresses()
    assert set(found) == fakenet.host_addresses_present()  # pyroute2's view: the same
    assert set(fakenet.HOST_ADDRESSES) | {"127.0.0.1", "::1"} <= set(found)


def test_a_netlink_error_is_reported_and_stops_tapbox(monkeypatch: pytest.MonkeyPatch) -> None:
    error = struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", -1) + bytes(16)

    class _Refusing:
        def send(self, data: bytes) -> int:
            return len(data)

        def recv(self, size: int) -> bytes:
            return error

    route = rtnetlink.Route()
    route.sock.close()
    route.sock = _Refusing()  # type: ignore[assignment]
    with pytest.raises(OSError, match="Operation not permitted"):
        list(route.dump(rtnetlink.RTM_GETADDR, bytes(8)))

    def no_netlink(*args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(hostaddrs.socket, "socket", no_netlink)
    with pytest.raises(SetupError) as info:
        host_addresses()
    assert "cannot read the host's network addresses" in str(info.value)
    assert "\n" not in str(info.value)
