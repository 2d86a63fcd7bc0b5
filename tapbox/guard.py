"""Guarded destinations: the machine itself, the link, the sandbox's own network.

How this works
--------------
Some destinations are never reached through a name rule, a broad rule or audit mode: the host
tapbox runs on (its loopback, and every address on its interfaces, read at start-up), the
link-local ranges (where cloud metadata services answer), the unspecified, multicast and
broadcast addresses, and the sandbox's own network. `Guard` holds them as a table of ranges,
each with the reason shown to the user, and answers two questions:

- `reason(address)`: why the address is guarded, or None;
- `ranges(address)`: the guarded ranges holding it. A rule admits a guarded address only if
  the rule's own address or range lies inside one of them: `169.254.169.254:80` or
  `127.0.0.0/8` do; `0.0.0.0/0`, `::/0` or `10.0.0.0/8` do not (they do not name it).

This is the one definition of "guarded": tapbox.policy decides flows with it, the DNS
rebinding guard (Policy.learn) strips answers with it, and audit mode (tapbox.auditpolicy)
never lets a flow through to it. Addresses are normalised first (tapbox.allowlist.
normalize_address): an IPv4 address in an IPv6 form (IPv4-mapped, IPv4-compatible, NAT64) is
judged as the IPv4 address. No I/O here: the host's addresses are given by the caller.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from tapbox.allowlist import IPAddress, IPNetwork, normalize_address
from tapbox.layout import SANDBOX_NETWORK, SANDBOX_NETWORK6

SANDBOX_NET4 = ipaddress.IPv4Network(SANDBOX_NETWORK)
SANDBOX_NET6 = ipaddress.IPv6Network(SANDBOX_NETWORK6)
HOST_OWN = "the host's own address"

# Most specific first: the first range holding an address names the reason.
FIXED_RANGES: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(text), reason) for text, reason in (
        ("0.0.0.0/32", "unspecified"),
        ("0.0.0.0/8", "this network"),  # RFC 1122 §3.2.1.3
        ("127.0.0.0/8", "loopback"),
        ("169.254.169.254/32", "metadata"),  # cloud instance metadata
        ("169.254.0.0/16", "link-local"),  # RFC 3927
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        (str(SANDBOX_NET4), "sandbox network"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("fd00:ec2::254/128", "metadata"),  # cloud instance metadata over IPv6
        ("fe80::/10", "link-local"),  # RFC 4291 §2.5.6
        ("ff00::/8", "multicast"),
        (str(SANDBOX_NET6), "sandbox network"),
    )
)


class Guard:
    """The guarded ranges: FIXED_RANGES plus one /32 or /128 per host address."""

    def __init__(self, host_addresses: Iterable[str | IPAddress] = ()) -> None:
        self.host_addresses: frozenset[IPAddress] = frozenset(
            normalize_address(a) for a in host_addresses)

    def ranges(self, ip: str | IPAddress) -> list[tuple[IPNetwork, str]]:
        """The guarded ranges holding ``ip``, most specific first (empty: not guarded).

        Raises ValueError if ``ip`` is not an IP address."""
        address = normalize_address(ip)
        found: list[tuple[IPNetwork, str]] = []
        if address in self.host_addresses:
            found.append((ipaddress.ip_network(address), HOST_OWN))
        found.extend((net, why) for net, why in FIXED_RANGES
                     if net.version == address.version and address in net)
        return found

    def reason(self, ip: str | IPAddress) -> str | None:
        """Why ``ip`` may only be reached through a rule inside its guarded range, or None."""
        found = self.ranges(ip)
        return found[0][1] if found else None

    def admits(self, network: IPNetwork, ip: str | IPAddress) -> bool:
        """Whether a rule for ``network`` may admit ``ip``: always if ``ip`` is not guarded,
        else only if ``network`` lies inside a guarded range holding ``ip``."""
        found = self.ranges(ip)
        return not found or any(network.version == net.version and network.subnet_of(net)
                                for net, _ in found)
