"""Where tapbox resolves allowed names: --dns-upstream values and the host's resolv.conf.

Kept apart from tapbox.net.dns so that reading the configuration costs no dnspython or trio
import before the sandbox is forked (start-up time).
"""

from __future__ import annotations

import ipaddress

DNS_PORT = 53


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def parse_upstream(text: str) -> tuple[str, int]:
    """Parse "ADDR", "ADDR:PORT", "[V6]", "[V6]:PORT" or "V6" into (address, port).

    Only IP addresses are accepted (resolving a host name for the resolver would need DNS).
    """
    s = text.strip()
    if not s:
        raise ValueError("empty DNS upstream")
    port_text: str | None = None
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise ValueError(f"DNS upstream {text!r}: missing ']'")
        addr, rest = s[1:end], s[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"DNS upstream {text!r}: expected ':PORT' after ']'")
            port_text = rest[1:]
        ip = _ip(addr)
        if not isinstance(ip, ipaddress.IPv6Address):
            raise ValueError(f"DNS upstream {text!r}: {addr!r} is not an IPv6 address")
    elif s.count(":") == 1:
        addr, port_text = s.split(":")
        ip = _ip(addr)
        if not isinstance(ip, ipaddress.IPv4Address):
            raise ValueError(f"DNS upstream {text!r}: {addr!r} is not an IPv4 address")
    else:
        addr = s
        ip = _ip(addr)
        if ip is None:
            raise ValueError(
                f"DNS upstream {text!r} is not an IP address (use ADDR, ADDR:PORT, V6 or [V6]:PORT)"
            )
    port = DNS_PORT
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"DNS upstream {text!r}: port must be 1-65535")
        port = int(port_text)
    return str(ip), port


def upstreams_from_resolv_conf(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """The `nameserver` addresses of a resolv.conf, in order, each on port 53.

    Entries that are not IP addresses are skipped; a missing file gives [] (the caller reports
    that no upstream is known).  Loopback stubs such as 127.0.0.53 are kept: tapbox's resolver
    runs in the host's network namespace, where they work.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except FileNotFoundError:
        return []
    out: list[tuple[str, int]] = []
    for line in lines:
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        ip = _ip(fields[1])
        if ip is None:
            continue
        entry = (str(ip), DNS_PORT)
        if entry not in out:
            out.append(entry)
    return out
