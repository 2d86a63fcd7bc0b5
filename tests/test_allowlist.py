"""Tests for tapbox.allowlist: parsing each rule form, error messages, matching."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tapbox.allowlist import (
    Allowlist,
    AllowlistError,
    PortRange,
    Rule,
    load_file,
    parse_lines,
    parse_rule,
)

# ---------------------------------------------------------------------------------------------
# Rule forms


def test_exact_name():
    rule = parse_rule("example.com", "allowed.txt:3")
    assert rule.kind == "name"
    assert rule.name == "example.com"
    assert rule.network is None
    assert rule.ports is None
    assert rule.text == "example.com"
    assert rule.source == "allowed.txt:3"


def test_default_source_is_cli():
    assert parse_rule("example.com").source == "--allow"


def test_name_is_lowercased_and_trailing_dot_dropped():
    rule = parse_rule("API.Example.COM.")
    assert rule.kind == "name"
    assert rule.name == "api.example.com"
    assert rule.text == "API.Example.COM."


def test_single_label_name():
    rule = parse_rule("localhost")
    assert rule.kind == "name"
    assert rule.name == "localhost"


def test_underscore_allowed_in_labels():
    assert parse_rule("_dmarc.example.com").name == "_dmarc.example.com"
    assert parse_rule("a_b.example.com").name == "a_b.example.com"


def test_wildcard():
    rule = parse_rule("*.Example.com.:443")
    assert rule.kind == "wildcard"
    assert rule.name == "example.com"
    assert rule.ports == PortRange(443, 443)
    assert rule.text == "*.Example.com.:443"


def test_ipv4_address():
    rule = parse_rule("192.0.2.1")
    assert rule.kind == "address"
    assert rule.name is None
    assert rule.network == ipaddress.IPv4Network("192.0.2.1/32")


def test_ipv4_address_with_port():
    rule = parse_rule("192.0.2.1:8080")
    assert rule.kind == "address"
    assert rule.network == ipaddress.IPv4Network("192.0.2.1/32")
    assert rule.ports == PortRange(8080, 8080)


def test_ipv4_network_with_range():
    rule = parse_rule("198.51.100.0/24:80-89")
    assert rule.kind == "network"
    assert rule.network == ipaddress.IPv4Network("198.51.100.0/24")
    assert rule.ports == PortRange(80, 89)


def test_bare_ipv6_address_has_no_port():
    rule = parse_rule("2001:db8::1")
    assert rule.kind == "address"
    assert rule.network == ipaddress.IPv6Network("2001:db8::1/128")
    assert rule.ports is None


def test_bare_ipv6_with_trailing_group_is_an_address_not_a_port():
    # "2001:db8::1:443" is a valid IPv6 address; it must not be read as port 443.
    rule = parse_rule("2001:db8::1:443")
    assert rule.ports is None
    assert rule.network == ipaddress.IPv6Network("2001:db8::1:443/128")


def test_bare_ipv6_network():
    rule = parse_rule("2001:db8::/32")
    assert rule.kind == "network"
    assert rule.network == ipaddress.IPv6Network("2001:db8::/32")
    assert rule.ports is None


def test_bracketed_ipv6_address_with_port():
    rule = parse_rule("[2001:db8::1]:443")
    assert rule.kind == "address"
    assert rule.network == ipaddress.IPv6Network("2001:db8::1/128")
    assert rule.ports == PortRange(443, 443)


def test_bracketed_ipv6_network_with_range():
    rule = parse_rule("[2001:db8::/32]:80-89")
    assert rule.kind == "network"
    assert rule.network == ipaddress.IPv6Network("2001:db8::/32")
    assert rule.ports == PortRange(80, 89)


def test_bracketed_ipv6_without_port():
    rule = parse_rule("[2001:db8::1]")
    assert rule.kind == "address"
    assert rule.ports is None


def test_ipv4_mapped_rule_is_stored_as_ipv4():
    assert parse_rule("::ffff:192.0.2.1").network == ipaddress.IPv4Network("192.0.2.1/32")
    assert parse_rule("::ffff:192.0.2.0/120").network == ipaddress.IPv4Network("192.0.2.0/24")


def test_port_edges():
    assert parse_rule("example.com:1").ports == PortRange(1, 1)
    assert parse_rule("example.com:65535").ports == PortRange(65535, 65535)
    assert parse_rule("example.com:1-65535").ports == PortRange(1, 65535)
    assert parse_rule("example.com:7-7").ports == PortRange(7, 7)


def test_port_range_contains_and_admits():
    rule = parse_rule("example.com:80-89")
    assert 80 in rule.ports and 89 in rule.ports and 85 in rule.ports
    assert 79 not in rule.ports and 90 not in rule.ports
    assert rule.admits_port(80)
    assert not rule.admits_port(90)
    assert parse_rule("example.com").admits_port(12345)


def test_port_range_rejects_bad_construction():
    with pytest.raises(ValueError):
        PortRange(10, 9)
    with pytest.raises(ValueError):
        PortRange(0, 5)


def test_rules_are_frozen():
    rule = parse_rule("example.com")
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.name = "other.test"  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# Errors


def error_of(text: str, source: str = "--allow") -> str:
    with pytest.raises(AllowlistError) as info:
        parse_rule(text, source)
    return str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("example.com:99999", "invalid port '99999' (must be 1-65535)"),
        ("example.com:0", "invalid port '0' (must be 1-65535)"),
        ("example.com:80-70000", "invalid port '70000' (must be 1-65535)"),
        (
            "example.com:90-80",
            "invalid port range '90-80' (low port 90 is greater than high port 80)",
        ),
        ("example.com:", "missing port after ':'"),
        (
            "example.com:https",
            "invalid port 'https' (expected a port like 443 or a range like 8000-8080)",
        ),
        (
            "example.com:80-",
            "invalid port '80-' (expected a port like 443 or a range like 8000-8080)",
        ),
        ("192.0.2.1/24", "host bits set in '192.0.2.1/24' (did you mean 192.0.2.0/24?)"),
        (
            "2001:db8::1/32",
            "host bits set in '2001:db8::1/32' (did you mean 2001:db8::/32?)",
        ),
        ("192.0.2.0/33", "invalid prefix length '/33' for IPv4 (must be 0-32)"),
        ("2001:db8::/129", "invalid prefix length '/129' for IPv6 (must be 0-128)"),
        (
            "a.*.com",
            "invalid wildcard 'a.*.com' ('*' is only allowed as the whole first label, "
            "as in '*.example.com')",
        ),
        (
            "*example.com",
            "invalid wildcard '*example.com' ('*' is only allowed as the whole first label, "
            "as in '*.example.com')",
        ),
        (
            "*.*.example.com",
            "invalid wildcard '*.*.example.com' ('*' is only allowed as the whole first "
            "label, as in '*.example.com')",
        ),
        (
            "*",
            "'*' alone is not a rule (a wildcard is written '*.DOMAIN'; to admit every "
            "address use 0.0.0.0/0 and ::/0)",
        ),
        ("*.", "wildcard '*.' needs a domain after '*.'"),
        (
            "-bad.example.com",
            "label '-bad' in '-bad.example.com' must not start or end with a hyphen",
        ),
        (
            "bad-.example.com",
            "label 'bad-' in 'bad-.example.com' must not start or end with a hyphen",
        ),
        ("a..example.com", "empty label in name 'a..example.com'"),
        (".example.com", "empty label in name '.example.com'"),
        ("example.com..", "empty label in name 'example.com..'"),
        (".", "empty name"),
        (":443", "empty name before ':443'"),
        ("ex!ample.com", "invalid character '!' in name 'ex!ample.com'"),
        (
            "bücher.example",
            "invalid character 'ü' in name 'bücher.example' "
            "(write internationalized names in their xn-- form)",
        ),
        ("192.0.2.256", "invalid IPv4 address '192.0.2.256'"),
        ("192.0.2", "invalid IPv4 address '192.0.2'"),
        ("example.123", "invalid name 'example.123' (the last label must not be all digits)"),
        (
            "2001:db8::/32:443",
            "an IPv6 network with a port must be written in brackets: '[2001:db8::/32]:443'",
        ),
        (
            "2001:db8:0:0:0:0:0:1:443",
            "invalid IPv6 address '2001:db8:0:0:0:0:0:1:443' "
            "(to give a port with an IPv6 address, use brackets: [ADDR]:PORT)",
        ),
        ("[2001:db8::1", "missing ']' after the IPv6 address"),
        ("[2001:db8::1]443", "expected ':PORT' after ']', found '443'"),
        ("[]:443", "empty address in brackets"),
        ("[example.com]:443", "invalid IPv6 address 'example.com'"),
        (
            "[192.0.2.1]:443",
            "brackets are only for IPv6 addresses; write '192.0.2.1' without them",
        ),
        (
            "[192.0.2.0/24]",
            "brackets are only for IPv6 networks; write '192.0.2.0/24' without them",
        ),
        ("fe80::1%eth0", "zone index '%eth0' is not supported in rules"),
        (
            "example.com/24",
            "invalid network 'example.com/24': 'example.com' is not an IP address "
            "(a network is written like 192.0.2.0/24 or 2001:db8::/32)",
        ),
        (
            "192.0.2.0/255.255.255.0",
            "invalid prefix length '/255.255.255.0' in '192.0.2.0/255.255.255.0' "
            "(must be a number 0-32)",
        ),
        (
            "example.com 443",
            "unexpected space inside the rule (write one rule per line; a port is written "
            "HOST:PORT with no spaces)",
        ),
        ("", "empty rule"),
    ],
)
def test_error_messages(text, message):
    assert error_of(text) == f"--allow '{text}': {message}"
    assert error_of(text, "allowed.txt:7") == f"allowed.txt:7: {message}"


def test_error_exposes_problem_without_location():
    with pytest.raises(AllowlistError) as info:
        parse_rule("example.com:0", "f.txt:2")
    assert info.value.problem == "invalid port '0' (must be 1-65535)"


def test_label_too_long():
    message = error_of("a" * 64 + ".example.com")
    assert "64 characters long (at most 63 allowed)" in message
    parse_rule("a" * 63 + ".example.com")  # exactly 63 is fine


def test_name_too_long():
    long_name = ".".join(["a" * 63] * 4)  # 255 characters
    assert error_of(long_name).endswith("is longer than 253 characters")
    ok_name = ".".join(["a" * 63] * 3 + ["a" * 61])  # 253 characters
    assert parse_rule(ok_name).name == ok_name


# ---------------------------------------------------------------------------------------------
# Files


def test_parse_lines_comments_blanks_and_sources():
    lines = [
        "# header comment",
        "",
        "example.com   # trailing comment",
        "   *.example.test:443  ",
        "\t192.0.2.0/24:80-89",
        "[2001:db8::1]:22 # ssh",
    ]
    rules = parse_lines(lines, "allowed.txt")
    assert [r.text for r in rules] == [
        "example.com",
        "*.example.test:443",
        "192.0.2.0/24:80-89",
        "[2001:db8::1]:22",
    ]
    assert [r.source for r in rules] == [
        "allowed.txt:3",
        "allowed.txt:4",
        "allowed.txt:5",
        "allowed.txt:6",
    ]


def test_parse_lines_error_names_file_and_line():
    lines = ["example.com", "# fine", "", "", "", "", "example.com:99999"]
    with pytest.raises(AllowlistError) as info:
        parse_lines(lines, "allowed.txt")
    assert str(info.value) == "allowed.txt:7: invalid port '99999' (must be 1-65535)"


def test_load_file(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("\ufeff# bom and CRLF\r\nexample.com:443\r\n198.51.100.7\r\n", encoding="utf-8")
    rules = load_file(str(path))
    assert [r.text for r in rules] == ["example.com:443", "198.51.100.7"]
    assert rules[0].source == f"{path}:2"


def test_load_file_error_has_line(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("example.com\n*example.com\n", encoding="utf-8")
    with pytest.raises(AllowlistError) as info:
        load_file(str(path))
    assert str(info.value).startswith(f"{path}:2: invalid wildcard '*example.com'")


def test_load_file_missing(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(AllowlistError) as info:
        load_file(str(path))
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


def test_load_file_directory(tmp_path):
    with pytest.raises(AllowlistError) as info:
        load_file(str(tmp_path))
    assert str(info.value) == f"{tmp_path}: cannot read: Is a directory"


def test_load_file_not_utf8(tmp_path):
    path = tmp_path / "bin.txt"
    path.write_bytes(b"example.com\n\xff\xfe\x00junk\n")
    with pytest.raises(AllowlistError) as info:
        load_file(str(path))
    assert str(info.value).startswith(f"{path}: cannot read: not UTF-8 text")


# ---------------------------------------------------------------------------------------------
# Name matching


def allowlist(*texts: str) -> Allowlist:
    return Allowlist([parse_rule(t, f"test:{i + 1}") for i, t in enumerate(texts)])


def test_exact_name_matches_only_itself():
    al = allowlist("example.com")
    assert [r.text for r in al.name_rules("example.com")] == ["example.com"]
    assert al.name_rules("www.example.com") == []
    assert al.name_rules("example.co") == []
    assert al.name_rules("notexample.com") == []


def test_wildcard_matches_subdomains_at_any_depth_but_not_apex():
    al = allowlist("*.example.com")
    assert len(al.name_rules("a.example.com")) == 1
    assert len(al.name_rules("a.b.example.com")) == 1
    assert len(al.name_rules("x.y.z.example.com")) == 1
    assert al.name_rules("example.com") == []
    assert al.name_rules("badexample.com") == []
    assert al.name_rules("example.com.evil.test") == []


def test_name_matching_is_case_insensitive_and_accepts_trailing_dot():
    al = allowlist("Example.COM", "*.Example.Test")
    assert len(al.name_rules("EXAMPLE.com.")) == 1
    assert len(al.name_rules("WWW.example.TEST.")) == 1
    assert al.name_rules("example.test.") == []


def test_name_rules_returns_all_matches_in_written_order():
    al = allowlist("*.example.com:443", "api.example.com:22", "*.api.example.com", "other.test")
    rules = al.name_rules("api.example.com")
    assert [r.text for r in rules] == ["*.example.com:443", "api.example.com:22"]
    deeper = al.name_rules("v1.api.example.com")
    assert [r.text for r in deeper] == ["*.example.com:443", "*.api.example.com"]


def test_name_rules_ignores_address_rules_and_junk():
    al = allowlist("192.0.2.1", "example.com")
    assert al.name_rules("192.0.2.1") == []
    assert al.name_rules("") == []
    assert al.name_rules(".") == []
    assert al.name_rules("a" * 300) == []


_label = st.text(alphabet="abcx", min_size=1, max_size=3)
_name = st.lists(_label, min_size=1, max_size=5).map(".".join)


@given(rules=st.lists(st.tuples(st.booleans(), _name), max_size=8), query=_name)
def test_name_index_agrees_with_brute_force(rules, query):
    texts = [("*." if wild else "") + name for wild, name in rules]
    al = allowlist(*texts)

    def matches(text: str) -> bool:
        if text.startswith("*."):
            return query.endswith("." + text[2:])
        return query == text

    expected = [t for t in texts if matches(t)]
    assert [r.text for r in al.name_rules(query)] == expected


# ---------------------------------------------------------------------------------------------
# Address matching


def test_address_rule_exact_and_network():
    al = allowlist("192.0.2.1", "198.51.100.0/24:443", "[2001:db8::/32]:80-89")
    assert al.address_rule("192.0.2.1", 1).text == "192.0.2.1"
    assert al.address_rule("192.0.2.2", 1) is None
    assert al.address_rule("198.51.100.200", 443).text == "198.51.100.0/24:443"
    assert al.address_rule("198.51.100.200", 444) is None
    assert al.address_rule("198.51.101.1", 443) is None
    assert al.address_rule("2001:db8:ffff::1", 85).text == "[2001:db8::/32]:80-89"
    assert al.address_rule("2001:db8:ffff::1", 90) is None
    assert al.address_rule("2001:db9::1", 85) is None


def test_address_rule_accepts_address_objects():
    al = allowlist("203.0.113.0/24")
    assert al.address_rule(ipaddress.ip_address("203.0.113.9"), 1) is not None
    assert al.address_rule(ipaddress.ip_address("203.0.114.9"), 1) is None


def test_address_rule_first_written_wins():
    al = allowlist("192.0.2.0/24:443", "192.0.2.0/25", "192.0.2.7")
    assert al.address_rule("192.0.2.7", 443).text == "192.0.2.0/24:443"
    assert al.address_rule("192.0.2.7", 80).text == "192.0.2.0/25"
    assert al.address_rule("192.0.2.200", 80) is None


def test_address_rule_skips_rules_not_admitting_port():
    al = allowlist("192.0.2.7:22", "192.0.2.7:443")
    assert al.address_rule("192.0.2.7", 443).text == "192.0.2.7:443"
    assert al.address_rule("192.0.2.7", 22).text == "192.0.2.7:22"
    assert al.address_rule("192.0.2.7", 80) is None


def test_ipv4_mapped_query_matches_ipv4_rule():
    al = allowlist("192.0.2.0/24:443")
    assert al.address_rule("::ffff:192.0.2.1", 443).text == "192.0.2.0/24:443"
    assert al.address_rule(ipaddress.ip_address("::ffff:192.0.2.1"), 443) is not None
    assert al.address_rule("::ffff:198.51.100.1", 443) is None


def test_ipv4_mapped_rule_matches_ipv4_query():
    al = allowlist("::ffff:192.0.2.0/120")
    assert al.address_rule("192.0.2.99", 1) is not None
    assert al.address_rule("192.0.3.99", 1) is None


def test_ipv6_rule_does_not_match_ipv4():
    al = allowlist("::/0")
    assert al.address_rule("2001:db8::1", 1) is not None
    assert al.address_rule("192.0.2.1", 1) is None
    v4 = allowlist("0.0.0.0/0")
    assert v4.address_rule("192.0.2.1", 1) is not None
    assert v4.address_rule("2001:db8::1", 1) is None


def test_address_rule_ignores_name_rules():
    al = allowlist("example.com", "*.example.com")
    assert al.address_rule("192.0.2.1", 443) is None


def test_address_rule_invalid_ip_raises():
    with pytest.raises(ValueError):
        allowlist("192.0.2.1").address_rule("not-an-ip", 1)


@given(
    networks=st.lists(
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)), min_size=0, max_size=8
    ),
    ip=st.integers(0, 2**32 - 1),
)
def test_address_index_agrees_with_brute_force(networks, ip):
    nets = [ipaddress.IPv4Network((value, plen), strict=False) for value, plen in networks]
    al = Allowlist([parse_rule(str(n)) for n in nets])
    address = ipaddress.IPv4Address(ip)
    expected = next((str(n) for n in nets if address in n), None)
    found = al.address_rule(address, 80)
    assert (found.text if found else None) == expected


# ---------------------------------------------------------------------------------------------
# Allowlist object


def test_empty_allowlist():
    al = Allowlist([])
    assert not al
    assert len(al) == 0
    assert al.name_rules("example.com") == []
    assert al.address_rule("192.0.2.1", 443) is None


def test_allowlist_keeps_rules_in_order():
    rules = [parse_rule("example.com"), parse_rule("192.0.2.1")]
    al = Allowlist(rules)
    assert al
    assert al.rules == tuple(rules)
    assert list(al) == rules


def test_hand_built_rule_is_indexed():
    rule = Rule(
        kind="network",
        text="custom",
        source="code",
        name=None,
        network=ipaddress.IPv4Network("203.0.113.0/24"),
        ports=None,
    )
    assert Allowlist([rule]).address_rule("203.0.113.5", 9) is rule


# ---------------------------------------------------------------------------------------------
# Curated lists shipped in allowlists/

CURATED = sorted((Path(__file__).resolve().parent.parent / "allowlists").glob("*.txt"))


def test_curated_lists_exist():
    assert len(CURATED) >= 2


@pytest.mark.parametrize("path", CURATED, ids=lambda p: p.name)
def test_curated_list_parses_and_has_header(path):
    rules = load_file(str(path))
    assert rules, f"{path.name} has no rules"
    assert path.read_text(encoding="utf-8").startswith("#"), "needs a header comment"
    assert all(r.kind in ("name", "wildcard") for r in rules)
