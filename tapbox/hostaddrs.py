"""The host's own addresses: every address on every interface of tapbox's network namespace.

How this works: one rtnetlink dump request (RTM_GETADDR, both families; tapbox.rtnetlink), and
a walk over the replies: each RTM_NEWADDR message is an ifaddrmsg header followed by
attributes, of which IFA_LOCAL (the local end of a point-to-point link) or else IFA_ADDRESS is
the address.

Read once at start-up, in the host's namespace (where the engine's sockets live). A service the
host binds on 0.0.0.0 or :: answers on every one of these addresses, so each is guarded like
loopback (tapbox.guard).
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from tapbox.errors import SetupError
from tapbox.rtnetlink import (
    IFA_ADDRESS,
    IFA_LOCAL,
    IFADDRMSG,
    RTM_GETADDR,
    RTM_NEWADDR,
    Route,
    attrs,
)


def host_addresses() -> list[str]:
    """Every address of this network namespace; SetupError if they cannot be read."""
    try:
        with Route() as route:
            found: list[str] = []
            for kind, payload in route.dump(RTM_GETADDR,
                                            IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
                if kind == RTM_NEWADDR:
                    address = _address(payload)
                    if address is not None:
                        found.append(address)
            return found
    except (OSError, ValueError, struct.error) as exc:
        raise SetupError(
            f"tapbox: cannot read the host's network addresses ({exc}); tapbox needs them to "
            "keep the sandbox away from the host's own services"
        ) from None


def _address(body: bytes) -> str | None:
    family = body[0]
    found = attrs(body[IFADDRMSG.size:])
    raw = found.get(IFA_LOCAL) or found.get(IFA_ADDRESS)
    if family == socket.AF_INET and raw is not None and len(raw) == 4:
        return str(ipaddress.IPv4Address(raw))
    if family == socket.AF_INET6 and raw is not None and len(raw) == 16:
        return str(ipaddress.IPv6Address(raw))
    return None
