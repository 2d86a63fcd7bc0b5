"""Allowlist parsing and matching.

How this works
--------------
An allowlist is a list of rules, one per line (``#`` starts a comment). A rule names either
DNS names (``example.com`` exactly, or ``*.example.com`` for every subdomain but not the apex)
or IP addresses (``192.0.2.1``, ``192.0.2.0/24``, ``2001:db8::/32``), optionally restricted to a
port or port range (``:443``, ``:8000-8080``; IPv6 with a port needs brackets:
``[2001:db8::1]:443``). The full format is in docs/allowlist.md.

Parsing turns each line into a frozen :class:`Rule`. Any bad line raises
:class:`AllowlistError` (tapbox.errors) whose text is ``"<file>:<line>: <problem>"`` (or
``"--allow 'RULE': <problem>"`` for a rule given on the command line), so the CLI can print it
as is and exit.

Matching is indexed so its cost does not grow with the number of rules:

* names: exact names sit in a dict; wildcard rules sit in a dict keyed by their suffix, and a
  query walks the suffixes of the queried name (O(labels));
* addresses: rules are bucketed by (IP version, prefix length) and network number, and a query
  masks the address once per prefix length in use (at most 33 or 129 lookups).

When several rules match, the one written first wins. An IPv4 address written in an IPv6 form
(IPv4-mapped ``::ffff:192.0.2.1``, IPv4-compatible ``::192.0.2.1``, NAT64
``64:ff9b::192.0.2.1``: netstack.wire.ipv6.embedded_ipv4) is the IPv4 address it carries, in
rules and in queries alike. `address_rule` can be asked for rules inside given networks only
(tapbox.guard: only such a rule admits a guarded address).

This module does no I/O except :func:`load_file` reading the file it is asked to read.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from netstack.wire.ipv6 import embedded_ipv4
from tapbox.errors import AllowlistError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
RuleKind = Literal["name", "wildcard", "address", "network"]

CLI_SOURCE = "--allow"
API_SOURCE = "allow="  # a rule given to the Python API (tapbox.run(..., allow=[...]))
MAX_NAME_LENGTH = 253
MAX_LABEL_LENGTH = 63

_LABEL_RE = re.compile(r"[a-z0-9_-]+")
_PORT_SPEC_RE = re.compile(r"([0-9]+)(?:-([0-9]+))?")


class _Problem(Exception):
    """Internal: what is wrong with one rule, before the location is known."""


@dataclass(frozen=True)
class PortRange:
    """An inclusive range of ports, ``low`` to ``high``."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not (1 <= self.low <= self.high <= 65535):
            raise ValueError(f"bad port range {self.low}-{self.high}")

    def __contains__(self, port: int) -> bool:
        return self.low <= port <= self.high

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


@dataclass(frozen=True)
class Rule:
    """One allowlist rule.

    ``kind`` is ``"name"`` (exact DNS name), ``"wildcard"`` (any subdomain of ``name``),
    ``"address"`` (one IP, stored as a /32 or /128 ``network``) or ``"network"`` (a CIDR).
    ``text`` is the rule as written; ``source`` is where it came from (``"allowed.txt:7"`` or
    ``"--allow"``). ``ports`` is None when the rule admits every port.
    """

    kind: RuleKind
    text: str
    source: str
    name: str | None
    network: IPNetwork | None
    ports: PortRange | None

    def admits_port(self, port: int) -> bool:
        return self.ports is None or port in self.ports

    def __str__(self) -> str:
        return self.text


# --------------------------------------------------------------------------------------------
# Parsing


def parse_rule(text: str, source: str = CLI_SOURCE) -> Rule:
    """Parse one rule (no comment). ``source`` is ``"--allow"`` or ``"file:line"``."""
    rule_text = text.strip()
    try:
        kind, name, network, ports = _parse_rule_text(rule_text)
    except _Problem as exc:
        problem = str(exc)
        if source in (CLI_SOURCE, API_SOURCE):
            message = f"{source} '{rule_text}': {problem}"
        else:
            message = f"{source}: {problem}"
        raise AllowlistError(message, problem=problem) from None
    return Rule(kind=kind, text=rule_text, source=source, name=name, network=network, ports=ports)


def parse_lines(lines: Iterable[str], source: str) -> list[Rule]:
    """Parse the lines of an allowlist file named ``source`` (used in messages)."""
    rules = []
    for lineno, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if text:
            rules.append(parse_rule(text, f"{source}:{lineno}"))
    return rules


def load_file(path: str) -> list[Rule]:
    """Read and parse an allowlist file."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            content = f.read()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise AllowlistError(f"{path}: cannot read: {reason}", problem=reason) from None
    except UnicodeDecodeError as exc:
        reason = f"not UTF-8 text (bad byte at offset {exc.start})"
        raise AllowlistError(f"{path}: cannot read: {reason}", problem=reason) from None
    return parse_lines(content.splitlines(), path)


def _parse_rule_text(text: str) -> tuple[RuleKind, str | None, IPNetwork | None, PortRange | None]:
    if not text:
        raise _Problem("empty rule")
    if any(ch.isspace() for ch in text):
        raise _Problem(
            "unexpected space inside the rule (write one rule per line; a port is written "
            "HOST:PORT with no spaces)"
        )
    if "://" in text:
        raise _Problem(_url_problem(text))
    host, port_spec = _split_port(text)
    ports = _parse_ports(port_spec) if port_spec is not None else None
    if text.startswith("["):
        return (*_parse_ip_host(host, require_v6=True), ports)
    if host.count(":") >= 2 or "/" in host:
        return (*_parse_ip_host(host, require_v6=False), ports)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        kind, name = _parse_name_host(host)
        return kind, name, None, ports
    return "address", None, _single_network(address), ports


def _url_problem(text: str) -> str:
    """What to say about a URL written as a rule, with the rule it probably meant."""
    from urllib.parse import urlsplit

    try:
        url = urlsplit(text)
        host, port = url.hostname, url.port
    except ValueError:
        host = port = None
    problem = "this is a URL: rules are names or addresses, with an optional port"
    if not host:
        return problem
    host = f"[{host}]" if ":" in host else host
    return f"{problem} (write '{host}:{port}')" if port else f"{problem} (write '{host}')"


def _split_port(text: str) -> tuple[str, str | None]:
    """Split ``HOST[:PORTS]`` / ``[V6HOST][:PORTS]`` into host and port spec (None if absent)."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise _Problem("missing ']' after the IPv6 address")
        host, rest = text[1:close], text[close + 1 :]
        if not host:
            raise _Problem("empty address in brackets")
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise _Problem(f"expected ':PORT' after ']', found '{rest}'")
        return host, rest[1:]
    if "]" in text:
        raise _Problem("']' without a matching '['")
    if text.count(":") == 1:
        host, _, spec = text.partition(":")
        if not host:
            raise _Problem(f"empty name before ':{spec}'")
        return host, spec
    # No colon: a name or IPv4 with no port. Two or more: a bare IPv6 address, which never
    # carries a port (that needs brackets).
    return text, None


def _parse_ports(spec: str) -> PortRange:
    if not spec:
        raise _Problem("missing port after ':'")
    match = _PORT_SPEC_RE.fullmatch(spec)
    if match is None:
        raise _Problem(
            f"invalid port '{spec}' (expected a port like 443 or a range like 8000-8080)"
        )
    low_text, high_text = match.group(1), match.group(2)
    low = _port_number(low_text)
    high = _port_number(high_text) if high_text is not None else low
    if low > high:
        raise _Problem(
            f"invalid port range '{spec}' (low port {low} is greater than high port {high})"
        )
    return PortRange(low, high)


def _port_number(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise _Problem(f"invalid port '{text}' (must be 1-65535)")
    return value


def _parse_ip_host(host: str, *, require_v6: bool) -> tuple[RuleKind, str | None, IPNetwork | None]:
    """Parse an address or CIDR written as an IP (bare IPv6, or inside brackets)."""
    if "%" in host:
        zone = host[host.index("%") :].split("/", 1)[0]
        raise _Problem(f"zone index '{zone}' is not supported in rules")
    bracket_hint = (
        "" if require_v6 else " (to give a port with an IPv6 address, use brackets: [ADDR]:PORT)"
    )
    if "/" in host:
        network = _parse_network(host, bracket_hint)
        if require_v6 and network.version != 6:
            raise _Problem(f"brackets are only for IPv6 networks; write '{host}' without them")
        return "network", None, _unmap_network(network)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if require_v6:
            raise _Problem(f"invalid IPv6 address '{host}'") from None
        raise _Problem(f"invalid IPv6 address '{host}'{bracket_hint}") from None
    if require_v6 and address.version != 6:
        raise _Problem(f"brackets are only for IPv6 addresses; write '{host}' without them")
    return "address", None, _single_network(address)


def _parse_network(host: str, bracket_hint: str) -> IPNetwork:
    addr_text, _, prefix_text = host.partition("/")
    try:
        address = ipaddress.ip_address(addr_text)
    except ValueError:
        if addr_text.count(":") >= 2:
            raise _Problem(f"invalid IPv6 network '{host}'{bracket_hint}") from None
        raise _Problem(
            f"invalid network '{host}': '{addr_text}' is not an IP address "
            "(a network is written like 192.0.2.0/24 or 2001:db8::/32)"
        ) from None
    max_prefix = address.max_prefixlen
    prefix_part, colon, port_part = prefix_text.partition(":")
    if colon and address.version == 6 and prefix_part.isdigit():
        raise _Problem(
            "an IPv6 network with a port must be written in brackets: "
            f"'[{addr_text}/{prefix_part}]:{port_part}'"
        )
    if not prefix_text.isascii() or not prefix_text.isdigit():
        hint = bracket_hint if address.version == 6 else ""
        raise _Problem(
            f"invalid prefix length '/{prefix_text}' in '{host}' "
            f"(must be a number 0-{max_prefix}){hint}"
        )
    prefix = int(prefix_text)
    if prefix > max_prefix:
        raise _Problem(
            f"invalid prefix length '/{prefix_text}' for IPv{address.version} "
            f"(must be 0-{max_prefix})"
        )
    network = ipaddress.ip_network((address, prefix), strict=False)
    if network.network_address != address:
        raise _Problem(f"host bits set in '{host}' (did you mean {network}?)")
    return network


def _single_network(address: IPAddress) -> IPNetwork:
    address = unmap(address)
    return ipaddress.ip_network((address, address.max_prefixlen))


def _unmap_network(network: IPNetwork) -> IPNetwork:
    """``::ffff:192.0.2.0/120`` -> ``192.0.2.0/24`` (likewise the other IPv6 forms of IPv4
    addresses, when every address of the network is one); anything else unchanged."""
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        first = embedded_ipv4(network.network_address.packed)
        last = embedded_ipv4(network.broadcast_address.packed)
        if first is not None and last is not None:
            return ipaddress.IPv4Network((ipaddress.IPv4Address(first), network.prefixlen - 96))
    return network


def _parse_name_host(host: str) -> tuple[RuleKind, str]:
    name = host.lower()
    if name == "*":
        raise _Problem(
            "'*' alone is not a rule (a wildcard is written '*.DOMAIN'; "
            "to admit every address use 0.0.0.0/0 and ::/0)"
        )
    if name.startswith("*."):
        suffix = normalize_name(name[2:])
        if "*" in suffix:
            raise _Problem(_wildcard_problem(host))
        if not suffix:
            raise _Problem(f"wildcard '{host}' needs a domain after '*.'")
        _check_name(suffix, host)
        return "wildcard", suffix
    if "*" in name:
        raise _Problem(_wildcard_problem(host))
    name = normalize_name(name)
    _check_name(name, host)
    return "name", name


def _wildcard_problem(host: str) -> str:
    return (
        f"invalid wildcard '{host}' ('*' is only allowed as the whole first label, "
        "as in '*.example.com')"
    )


def _check_name(name: str, written: str) -> None:
    """Validate a lower-cased name without trailing dot; ``written`` is used in messages."""
    if not name:
        raise _Problem("empty name")
    if len(name) > MAX_NAME_LENGTH:
        raise _Problem(f"name '{written}' is longer than {MAX_NAME_LENGTH} characters")
    labels = name.split(".")
    for label in labels:
        _check_label(label, written)
    if labels[-1].isdigit():
        if len(labels) > 1 and all(label.isdigit() for label in labels):
            raise _Problem(f"invalid IPv4 address '{written}'")
        raise _Problem(f"invalid name '{written}' (the last label must not be all digits)")


def _check_label(label: str, written: str) -> None:
    if not label:
        raise _Problem(f"empty label in name '{written}'")
    if len(label) > MAX_LABEL_LENGTH:
        raise _Problem(
            f"label '{label[:16]}...' in name is {len(label)} characters long "
            f"(at most {MAX_LABEL_LENGTH} allowed)"
        )
    if not _LABEL_RE.fullmatch(label):
        bad = next(ch for ch in label if not _LABEL_RE.fullmatch(ch))
        hint = " (write internationalized names in their xn-- form)" if not bad.isascii() else ""
        raise _Problem(f"invalid character '{bad}' in name '{written}'{hint}")
    if label.startswith("-") or label.endswith("-"):
        raise _Problem(f"label '{label}' in '{written}' must not start or end with a hyphen")


# --------------------------------------------------------------------------------------------
# Matching


def unmap(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 address stands for (IPv4-mapped, IPv4-compatible, NAT64);
    any other address unchanged."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = embedded_ipv4(address.packed)
        if embedded is not None:
            return ipaddress.IPv4Address(embedded)
    return address


def normalize_address(ip: str | IPAddress) -> IPAddress:
    """Parse ``ip`` (raises ValueError if invalid); an IPv6 form of an IPv4 address becomes
    that IPv4 address."""
    if isinstance(ip, str):
        return unmap(ipaddress.ip_address(ip))
    return unmap(ip)


def normalize_name(name: str) -> str:
    """Lower-case and drop one trailing dot."""
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


class Allowlist:
    """An ordered, indexed collection of rules."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self._exact: dict[str, list[tuple[int, Rule]]] = {}
        self._wildcard: dict[str, list[tuple[int, Rule]]] = {}
        # (version, prefixlen) -> network number -> rules; plus prefix lengths in use per version
        self._by_prefix: dict[tuple[int, int], dict[int, list[tuple[int, Rule]]]] = {}
        self._prefixes: dict[int, list[int]] = {4: [], 6: []}
        for index, rule in enumerate(self.rules):
            self._index(index, rule)

    def _index(self, index: int, rule: Rule) -> None:
        if rule.kind == "name" and rule.name is not None:
            self._exact.setdefault(rule.name, []).append((index, rule))
        elif rule.kind == "wildcard" and rule.name is not None:
            self._wildcard.setdefault(rule.name, []).append((index, rule))
        elif rule.network is not None:
            network = _unmap_network(rule.network)
            key = (network.version, network.prefixlen)
            bucket = self._by_prefix.setdefault(key, {})
            bucket.setdefault(int(network.network_address), []).append((index, rule))
            if network.prefixlen not in self._prefixes[network.version]:
                self._prefixes[network.version].append(network.prefixlen)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __repr__(self) -> str:
        return f"Allowlist({len(self.rules)} rules)"

    def name_rules(self, name: str) -> list[Rule]:
        """Name and wildcard rules matching DNS name ``name``, in the order written."""
        name = normalize_name(name)
        if not name or len(name) > MAX_NAME_LENGTH:
            return []
        found = list(self._exact.get(name, ()))
        rest = name
        while True:
            dot = rest.find(".")
            if dot < 0:
                break
            rest = rest[dot + 1 :]
            found.extend(self._wildcard.get(rest, ()))
        found.sort(key=lambda item: item[0])
        return [rule for _, rule in found]

    def address_rule(self, ip: str | IPAddress, port: int,
                     within: Sequence[IPNetwork] | None = None) -> Rule | None:
        """The first address/network rule containing ``ip`` and admitting ``port``, if any;
        with ``within``, only a rule whose network lies inside one of those networks.

        Raises ValueError if ``ip`` is not a valid IP address.
        """
        address = normalize_address(ip)
        value = int(address)
        bits = address.max_prefixlen
        best: tuple[int, Rule] | None = None
        for prefixlen in self._prefixes[address.version]:
            if within is not None and not any(
                    net.version == address.version and prefixlen >= net.prefixlen
                    for net in within):
                continue  # wider than every network asked for: cannot lie inside one
            mask = ((1 << prefixlen) - 1) << (bits - prefixlen)
            candidates = self._by_prefix[(address.version, prefixlen)].get(value & mask, ())
            for index, rule in candidates:
                if rule.admits_port(port) and (best is None or index < best[0]) and \
                        (within is None or _inside(rule, within)):
                    best = (index, rule)
                    break  # candidates are in index order
        return best[1] if best is not None else None


def _inside(rule: Rule, networks: Sequence[IPNetwork]) -> bool:
    network = rule.network
    return network is not None and any(
        network.version == net.version and network.subnet_of(net)  # type: ignore[arg-type]
        for net in networks)
