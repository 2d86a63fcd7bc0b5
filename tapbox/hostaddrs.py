"""The host's own addresses: every address on every interface of tapbox's network namespace.

How this works: one rtnetlink dump request (RTM_GETADDR, both families; rtnetlink(7)) on a
netlink socket of the standard library, and a walk over the replies: each RTM_NEWADDR message
is an ifaddrmsg header followed by attributes, of which IFA_LOCAL (the local end of a
point-to-point link) or else IFA_ADDRESS is the address. pyroute2 would do the same, but its
import alone costs about 0.2 s of every sandboxed command's start-up.

Read once at start-up, in the host's namespace (where the engine's sockets live). A service the
host binds on 0.0.0.0 or :: answers on every one of these addresses, so each is guarded like
loopback (tapbox.guard).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

from tapbox.errors import SetupError

NETLINK_ROUTE = 0
RTM_GETADDR = 22
RTM_NEWADDR = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
IFA_ADDRESS = 1
IFA_LOCAL = 2

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, interface index
_RTATTR = struct.Struct("=HH")  # length, type


def host_addresses() -> list[str]:
    """Every address of this network namespace; SetupError if they cannot be read."""
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE) as sock:
            sock.settimeout(5)
            request = _NLMSGHDR.pack(_NLMSGHDR.size + _IFADDRMSG.size, RTM_GETADDR,
                                     NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + \
                _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
            sock.send(request)
            found: list[str] = []
            while True:
                data = sock.recv(1 << 16)
                if not data:
                    raise OSError("netlink closed the dump early")
                if _parse(data, found):
                    return found
    except (OSError, ValueError, struct.error) as exc:
        raise SetupError(
            f"tapbox: cannot read the host's network addresses ({exc}); tapbox needs them to "
            "keep the sandbox away from the host's own services"
        ) from None


def _parse(data: bytes, found: list[str]) -> bool:
    """Add the addresses in one datagram of the dump to `found`; True once it is complete."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise ValueError("malformed netlink message")
        if kind == NLMSG_DONE:
            return True
        if kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", data, offset + _NLMSGHDR.size)
            raise OSError(-code, f"netlink: {os.strerror(-code)}")
        if kind == RTM_NEWADDR:
            address = _address(data[offset + _NLMSGHDR.size:offset + length])
            if address is not None:
                found.append(address)
        offset += (length + 3) & ~3
    return False


def _address(body: bytes) -> str | None:
    family = body[0]
    attrs: dict[int, bytes] = {}
    at = _IFADDRMSG.size
    while at + _RTATTR.size <= len(body):
        length, kind = _RTATTR.unpack_from(body, at)
        if length < _RTATTR.size:
            break
        attrs[kind] = body[at + _RTATTR.size:at + length]
        at += (length + 3) & ~3
    raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
    if family == socket.AF_INET and raw is not None and len(raw) == 4:
        return str(ipaddress.IPv4Address(raw))
    if family == socket.AF_INET6 and raw is not None and len(raw) == 16:
        return str(ipaddress.IPv6Address(raw))
    return None
