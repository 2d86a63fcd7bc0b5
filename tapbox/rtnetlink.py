"""rtnetlink, the few messages tapbox needs, on a netlink socket of the standard library.

How this works (rtnetlink(7), netlink(7)): every message is a 16-byte nlmsghdr (length, type,
flags, sequence, port id), a fixed family header (ifinfomsg for links, ifaddrmsg for addresses,
rtmsg for routes) and attributes (rtattr: length, type, value, padded to 4 bytes). A request
with NLM_F_ACK is answered with an NLMSG_ERROR message whose error field is 0 (done) or a
negative errno; a dump (NLM_F_DUMP) is answered with messages until NLMSG_DONE.

Used in two places: reading the host's addresses at start-up (tapbox.hostaddrs) and setting up
the sandbox's links inside its network namespace (tapbox.isolate.tap: lo up; tap0's MTU,
addresses, up; default routes). A handful of messages, microseconds each; a netlink library
would cost far more to import than all of them take.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

NETLINK_ROUTE = 0
# Message types (<linux/rtnetlink.h>)
RTM_NEWLINK = 16
RTM_NEWADDR = 20
RTM_GETADDR = 22
RTM_NEWROUTE = 24
NLMSG_ERROR = 2
NLMSG_DONE = 3
# Flags (<linux/netlink.h>)
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_DUMP = 0x300
# Attributes
IFLA_MTU = 4
IFA_ADDRESS = 1
IFA_LOCAL = 2
RTA_OIF = 4
RTA_GATEWAY = 5
# Values
IFF_UP = 0x1
IFA_F_NODAD = 0x02  # the address is ours alone on its link: no duplicate detection (RFC 4862)
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3  # as `ip route add` marks its routes
RT_SCOPE_UNIVERSE = 0
RTN_UNICAST = 1

NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change mask
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, index
RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst/src len, tos, table, protocol, scope, type, flags
RTATTR = struct.Struct("=HH")  # length, type


class NetlinkError(OSError):
    """The kernel refused a request (errno in `.errno`)."""


def attr(kind: int, value: bytes) -> bytes:
    length = RTATTR.size + len(value)
    return RTATTR.pack(length, kind) + value + bytes(-length % 4)


def attrs(body: bytes) -> dict[int, bytes]:
    """The attributes in `body` (which starts with them), by type; a malformed one ends it."""
    found: dict[int, bytes] = {}
    at = 0
    while at + RTATTR.size <= len(body):
        length, kind = RTATTR.unpack_from(body, at)
        if length < RTATTR.size:
            break
        found[kind] = body[at + RTATTR.size:at + length]
        at += (length + 3) & ~3
    return found


def messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each message in one datagram; ValueError if one is malformed."""
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > len(data):
            raise ValueError("malformed netlink message")
        yield kind, data[offset + NLMSGHDR.size:offset + length]
        offset += (length + 3) & ~3


def error_code(payload: bytes) -> int:
    """The errno of an NLMSG_ERROR message (0: an acknowledgement)."""
    (code,) = struct.unpack_from("=i", payload)
    return -code


class Route:
    """A NETLINK_ROUTE socket of the current network namespace."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self.sock.settimeout(5)
        self.seq = 0

    def __enter__(self) -> Route:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, kind: int, flags: int, body: bytes) -> int:
        self.seq += 1
        self.sock.send(NLMSGHDR.pack(NLMSGHDR.size + len(body), kind,
                                     NLM_F_REQUEST | flags, self.seq, 0) + body)
        return self.seq

    def request(self, kind: int, flags: int, body: bytes) -> None:
        """Send one request and wait for its acknowledgement; NetlinkError if refused."""
        seq = self.send(kind, flags | NLM_F_ACK, body)
        while True:
            data = self.sock.recv(1 << 16)
            for reply_kind, payload in messages(data):
                if reply_kind == NLMSG_ERROR:
                    _, _, _, reply_seq, _ = NLMSGHDR.unpack_from(payload, 4)
                    if reply_seq != seq:
                        continue
                    code = error_code(payload)
                    if code:
                        raise NetlinkError(code, os.strerror(code))
                    return

    def dump(self, kind: int, body: bytes) -> Iterator[tuple[int, bytes]]:
        """The messages answering a dump request, up to NLMSG_DONE."""
        self.send(kind, NLM_F_DUMP, body)
        while True:
            data = self.sock.recv(1 << 16)
            if not data:
                raise OSError("netlink closed the dump early")
            for reply_kind, payload in messages(data):
                if reply_kind == NLMSG_DONE:
                    return
                if reply_kind == NLMSG_ERROR:
                    code = error_code(payload)
                    raise NetlinkError(code, f"netlink: {os.strerror(code)}")
                yield reply_kind, payload

    # ----- the requests tapbox makes --------------------------------------------------------

    def set_link(self, index: int, up: bool | None = None, mtu: int | None = None) -> None:
        flags = IFF_UP if up else 0
        change = IFF_UP if up is not None else 0
        body = IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change)
        if mtu is not None:
            body += attr(IFLA_MTU, struct.pack("=I", mtu))
        self.request(RTM_NEWLINK, 0, body)

    def add_address(self, index: int, address: str, prefixlen: int, flags: int = 0) -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        packed = socket.inet_pton(family, address)
        body = IFADDRMSG.pack(family, prefixlen, flags, RT_SCOPE_UNIVERSE, index)
        body += attr(IFA_LOCAL, packed) + attr(IFA_ADDRESS, packed)
        self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body)

    def add_default_route(self, gateway: str, index: int) -> None:
        family = socket.AF_INET6 if ":" in gateway else socket.AF_INET
        body = RTMSG.pack(family, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE,
                          RTN_UNICAST, 0)
        body += attr(RTA_GATEWAY, socket.inet_pton(family, gateway))
        body += attr(RTA_OIF, struct.pack("=i", index))
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body)
