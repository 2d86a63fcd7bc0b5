"""The hermetic "fake internet" the tests run against.

Theory of operation
-------------------
1. ``enter_test_netns()`` (called once from conftest's ``pytest_configure``, before anything opens
   a socket) moves the pytest process into a throwaway network namespace, the test's "host":
   plain ``unshare(CLONE_NEWNET)`` when root, else ``unshare(CLONE_NEWUSER|CLONE_NEWNET)`` with
   the caller's uid/gid mapped to 0. Every child process (tapbox, the client) inherits it;
   tapbox's engine runs here and its proxy sockets reach the fake servers below.
   The servers live in a second namespace, the "internet", made by a helper thread (a thread
   can enter a network namespace of its own) and joined to the host by a veth pair
   (``fnet0`` here, ``fnet1`` there). Their TEST-NET addresses (``LO_ADDRESSES``) are on the
   internet's ``lo``; the host has one route per address through the veth and no other route
   out, so no test packet can leave the machine: a connect to anything else fails with
   ENETUNREACH at once. The servers are not the host's own addresses (tapbox guards those);
   the host has ``HOST_ADDRESSES`` on ``fnet0`` and runs ``HOST_BLOB_ENDPOINTS`` itself
   (its loopback, and a service bound to every address).
2. ``FakeNet`` runs the servers: one selector thread accepts TCP connections and answers UDP
   datagrams; each TCP connection gets its own daemon thread. Sockets of the internet are
   created by a thread inside it (``in_internet``); once made they work from any thread.
   - blob TCP servers (``BLOB_ENDPOINTS``), one line-based protocol:
       ``GET N\\n``        -> N bytes of deterministic data (``client.blob_chunks(N)``), then close
       ``PUT N\\n`` + N bytes -> ``<sha256 hex of what arrived>\\n``, then close
       ``SLOWPUT N\\n``  -> as PUT, but read slowly (64 KiB, pause, ...)
       ``ECHO\\n``         -> echoes everything until EOF, then closes
       ``HELLO\\n``        -> ``hello from <local ip>:<port>\\n`` (IPv6 as ``[ip]:port``)
       ``RESET\\n``        -> the server resets the connection (RST)
   - UDP echo servers (``UDP_ECHO_ENDPOINTS``).
   - an authoritative DNS server for the ``test.`` zone (``ZONE_TEXT``) over UDP and TCP
     (RFC 7766 length-prefixed) on ``DNS_ENDPOINTS``; unknown names NXDOMAIN, a name without
     the asked type NOERROR/NODATA, CNAMEs chased inside the zone, SOA in negative answers,
     names outside the zone REFUSED, except a name whose last label is all digits (a literal
     address such as ``169.254.169.254``): NXDOMAIN, as a recursive resolver answers for a
     top-level domain that does not exist; TC set when a UDP answer does not fit.
   Everything that reaches a server is recorded (connections, datagrams, DNS queries) so a test
   can assert that a server was *not* reached. ``reset()`` forgets the records.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import ipaddress
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.zone
from client import blob_chunks, blob_sha256

__all__ = [
    "BLOB_ENDPOINTS",
    "DNS_ENDPOINTS",
    "DNS_UPSTREAM",
    "HOST_ADDRESSES",
    "HOST_BLOB_ENDPOINTS",
    "LO_ADDRESSES",
    "UDP_ECHO_ENDPOINTS",
    "Connection",
    "Datagram",
    "DnsQuery",
    "FakeNet",
    "NetnsState",
    "blob_sha256",
    "enter_test_netns",
    "in_internet",
    "netns_state",
]

# ------------------------------------------------------------------------------------------------
# Addresses and endpoints (documentation ranges only: RFC 5737, RFC 3849, plus link-local
# metadata and loopback for the DNS-rebinding tests).

# The host's own addresses (on its end of the link to the fake internet). 2001:db8::1 is left
# unrouted: tapbox's `--ipv6 auto` probes it, and the tests expect it to find no IPv6.
HOST_ADDRESSES: tuple[str, ...] = ("192.0.2.1", "2001:db8::2")

# The fake internet's addresses, on the internet namespace's lo.
LO_ADDRESSES: tuple[str, ...] = (
    "192.0.2.10",
    "192.0.2.20",
    "192.0.2.21",
    "198.51.100.20",
    "198.51.100.53",
    "203.0.113.7",
    "203.0.113.10",
    "203.0.113.53",
    "169.254.169.254",
    "2001:db8::10",
    "2001:db8::53",
)

BLOB_ENDPOINTS: tuple[tuple[str, int], ...] = (
    ("192.0.2.10", 80),
    ("192.0.2.10", 443),
    ("192.0.2.10", 8080),
    ("192.0.2.20", 80),
    ("192.0.2.21", 80),
    ("198.51.100.20", 80),
    ("203.0.113.7", 80),
    ("203.0.113.7", 443),
    ("203.0.113.10", 80),
    ("169.254.169.254", 80),
    ("2001:db8::10", 80),
)

# Services of the host itself: on its loopback, and on every address it has (as a service
# bound to 0.0.0.0 / :: is).
HOST_BLOB_ENDPOINTS: tuple[tuple[str, int], ...] = (
    ("127.0.0.1", 80),
    ("0.0.0.0", 8081),
    ("::", 8081),
)

UDP_ECHO_ENDPOINTS: tuple[tuple[str, int], ...] = (
    ("192.0.2.10", 5353),
    ("203.0.113.7", 5353),
    ("2001:db8::10", 5353),
)

# (address, port, udp?, tcp?)
DNS_ENDPOINTS: tuple[tuple[str, int, bool, bool], ...] = (
    ("198.51.100.53", 53, True, True),
    ("2001:db8::53", 53, True, True),
    ("203.0.113.53", 53, True, True),  # "another DNS server" the sandbox must not reach
)

DNS_UPSTREAM = "198.51.100.53"

ZONE_ORIGIN = "test."
ZONE_TEXT = """\
$ORIGIN test.
$TTL 60
@                   SOA   ns.test. hostmaster.test. 2024010101 3600 600 86400 60
@                   NS    ns.test.
ns                  A     198.51.100.53
ns                  AAAA  2001:db8::53
api.example         A     192.0.2.10
api.example         AAAA  2001:db8::10
twin.example        A     192.0.2.10
v6only.example      AAAA  2001:db8::10
multi.example       A     192.0.2.10
multi.example       A     192.0.2.20
a.wild              A     192.0.2.20
b.c.wild            A     192.0.2.20
wild                A     192.0.2.21
alias.example       CNAME edge.cdn
edge.cdn            A     198.51.100.20
denied              A     203.0.113.7
meta.example        A     169.254.169.254
loop.example        A     127.0.0.1
self.example        A     192.0.2.1
self.example        AAAA  2001:db8::2
txt.example         TXT   "hello"
big.example         TXT   "{filler}"
big.example         TXT   "{filler}1"
big.example         TXT   "{filler}2"
big.example         TXT   "{filler}3"
big.example         TXT   "{filler}4"
big.example         TXT   "{filler}5"
big.example         TXT   "{filler}6"
big.example         TXT   "{filler}7"
big.example         TXT   "{filler}8"
""".replace("{filler}", "x" * 100) + "".join(
    f"bigv4.example       A     203.0.113.{i}\n" for i in range(100, 160)
) + "".join(
    f"huge.example        AAAA  2001:db8:f::{i:x}\n" for i in range(1, 2339)
)
"""The ``test.`` zone. ``big.example.test`` TXT (~1 KB) does not fit a plain 512-byte UDP answer:
it comes back with TC set, for testing TCP fallback. ``bigv4.example.test`` has 60 A records
(~1 KB). ``huge.example.test`` has 2,338 AAAA records, 65,510 bytes over TCP with EDNS: more
than one UDP datagram on tapbox's link can carry (65,492 bytes at MTU 65520).
``c.wild.test`` is an empty non-terminal (NOERROR, no data). There is deliberately no DNS
wildcard: ``*.wild.test`` is an allowlist rule."""

# ------------------------------------------------------------------------------------------------
# The namespace

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
IFA_F_NODAD = 0x02
RT_SCOPE_LINK = 253
HOST_LINK, INTERNET_LINK = "fnet0", "fnet1"
HOST_LL, INTERNET_LL = "fe80::1", "fe80::2"  # the two ends' link-local addresses
LINK_MTU = 65535


@dataclass
class NetnsState:
    mode: str = "none"  # "root" (CLONE_NEWNET) | "userns" (CLONE_NEWUSER|CLONE_NEWNET) | "none"
    error: str | None = None
    outer_uid: int = -1
    outer_gid: int = -1
    outer_netns: int = 0  # inode of the network namespace pytest started in
    netns: int = 0  # inode of the test network namespace
    internet_fd: int = -1  # an open handle on the fake internet's namespace

    @property
    def ok(self) -> bool:
        return self.error is None and self.mode != "none"


_STATE = NetnsState()


def netns_state() -> NetnsState:
    return _STATE


def _unshare(flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(0x{flags:x}): {os.strerror(err)}")


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(ctypes.c_int(fd), ctypes.c_int(CLONE_NEWNET)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


_T = TypeVar("_T")


def _in_thread(fn: Callable[[], _T]) -> _T:
    """Run fn in a new thread (which may change its own network namespace) and return."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=run, name="fakenet-netns")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


def in_internet(fn: Callable[[], _T]) -> _T:
    """Run fn inside the fake internet's namespace (sockets it makes belong there)."""
    fd = _STATE.internet_fd
    if fd < 0:
        raise RuntimeError("the fake internet's namespace does not exist")

    def inside() -> _T:
        _setns(fd)
        return fn()

    return _in_thread(inside)


def _netns_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def _write_proc(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def enter_test_netns() -> NetnsState:
    """Move this process into a fresh network namespace with only ``lo`` and no route out.

    Idempotent. Never raises: the outcome (or the reason it failed) is in the returned state.
    Must run while the process is single-threaded (CLONE_NEWUSER requires it).
    """
    if _STATE.mode != "none" or _STATE.error is not None:
        return _STATE
    _STATE.outer_uid, _STATE.outer_gid = os.getuid(), os.getgid()
    _STATE.outer_netns = _netns_inode()
    try:
        if os.geteuid() == 0:
            _unshare(CLONE_NEWNET)
            _STATE.mode = "root"
        else:
            uid, gid = os.getuid(), os.getgid()
            _unshare(CLONE_NEWUSER | CLONE_NEWNET)
            _write_proc("/proc/self/setgroups", "deny")
            _write_proc("/proc/self/uid_map", f"0 {uid} 1\n")
            _write_proc("/proc/self/gid_map", f"0 {gid} 1\n")
            _STATE.mode = "userns"
        _STATE.netns = _netns_inode()
        _build_topology()
    except Exception as e:  # noqa: BLE001 - reported to the user by conftest
        _STATE.error = f"{type(e).__name__}: {e}"
    return _STATE


def _new_netns() -> int:
    _unshare(CLONE_NEWNET)
    return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


def _add_address(ipr: object, index: int, addr: str, prefixlen: int | None = None) -> None:
    ip = ipaddress.ip_address(addr)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    ipr.addr("add", index=index, address=addr,  # type: ignore[attr-defined]
             prefixlen=ip.max_prefixlen if prefixlen is None else prefixlen,
             family=family, flags=IFA_F_NODAD)


def _route_to(ipr: object, addr: str, index: int, v6_gateway: str) -> None:
    """A host route to addr over the veth (IPv6 through the far end's link-local address)."""
    ip = ipaddress.ip_address(addr)
    if ip.version == 4:
        ipr.route("add", dst=f"{addr}/32", oif=index,  # type: ignore[attr-defined]
                  scope=RT_SCOPE_LINK)
    else:
        ipr.route("add", dst=f"{addr}/128", gateway=v6_gateway,  # type: ignore[attr-defined]
                  oif=index, family=socket.AF_INET6)


def _build_topology() -> None:
    """The host (this namespace) and the internet (a new one), joined by a veth pair."""
    from pyroute2 import IPRoute  # after unshare: the netlink socket belongs to the new netns

    _STATE.internet_fd = _in_thread(_new_netns)
    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        ipr.link("add", ifname=HOST_LINK, kind="veth", peer=INTERNET_LINK)
        ipr.link("set", index=ipr.link_lookup(ifname=INTERNET_LINK)[0],
                 net_ns_fd=_STATE.internet_fd)
        link = ipr.link_lookup(ifname=HOST_LINK)[0]
        ipr.link("set", index=link, mtu=LINK_MTU, state="up")
        _add_address(ipr, link, HOST_LL, 64)
        for addr in HOST_ADDRESSES:
            _add_address(ipr, link, addr)
        for addr in LO_ADDRESSES:
            _route_to(ipr, addr, link, INTERNET_LL)

    def internet_side() -> None:
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.link("set", index=lo, state="up")
            for addr in LO_ADDRESSES:
                _add_address(ipr, lo, addr)
            link = ipr.link_lookup(ifname=INTERNET_LINK)[0]
            ipr.link("set", index=link, mtu=LINK_MTU, state="up")
            _add_address(ipr, link, INTERNET_LL, 64)
            for addr in HOST_ADDRESSES:
                _route_to(ipr, addr, link, HOST_LL)

    in_internet(internet_side)


def _addresses_here() -> set[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return {ipaddress.ip_address(a.get_attr("IFA_ADDRESS")).compressed for a in ipr.get_addr()}


def lo_addresses_present() -> set[str]:
    """Every address in the fake internet's namespace."""
    return in_internet(_addresses_here)


def host_addresses_present() -> set[str]:
    """Every address in this (the host's) namespace."""
    return _addresses_here()


def default_routes() -> list[str]:
    """Every route with a zero-length prefix, in any table, for either family."""
    from pyroute2 import IPRoute

    found: list[str] = []
    with IPRoute() as ipr:
        for family in (socket.AF_INET, socket.AF_INET6):
            for r in ipr.get_routes(family=family, table=0):
                if r.get("dst_len") == 0 and r.get("type") in (1, None):  # RTN_UNICAST
                    found.append(repr(r))
    return found


# ------------------------------------------------------------------------------------------------
# Records


def _norm(addr: str) -> str:
    return ipaddress.ip_address(addr.split("%")[0]).compressed


@dataclass
class Connection:
    """One TCP connection accepted by a fake server."""

    local_addr: str
    local_port: int
    peer_addr: str
    peer_port: int
    at: float
    kind: str  # "blob" | "dns"
    command: str = ""  # first line, for blob connections
    bytes_in: int = 0
    bytes_out: int = 0
    ending: str = ""  # "reset" when the client reset the connection


@dataclass(frozen=True)
class Datagram:
    local_addr: str
    local_port: int
    peer_addr: str
    peer_port: int
    size: int
    at: float


@dataclass(frozen=True)
class DnsQuery:
    server_addr: str
    server_port: int
    transport: str  # "udp" | "tcp"
    qname: str  # absolute, lower case, with trailing dot: "api.example.test."
    qtype: str  # "A", "AAAA", ...
    client_addr: str
    at: float


# ------------------------------------------------------------------------------------------------
# DNS


class FakeZone:
    """Answers queries for one zone, authoritatively."""

    def __init__(self, text: str = ZONE_TEXT, origin: str = ZONE_ORIGIN) -> None:
        self.origin = dns.name.from_text(origin)
        self.zone = dns.zone.from_text(text, origin=self.origin, relativize=False)
        self.names = set(self.zone.nodes.keys())
        soa = self.zone.get_rdataset(self.origin, dns.rdatatype.SOA)
        assert soa is not None
        self.soa_rrset = dns.rrset.from_rdata_list(self.origin, soa.ttl, list(soa))

    def _rrset(self, name: dns.name.Name, rdtype: int) -> dns.rrset.RRset | None:
        node = self.zone.get_node(name)
        if node is None:
            return None
        rds = node.get_rdataset(dns.rdataclass.IN, rdtype)
        if rds is None:
            return None
        return dns.rrset.from_rdata_list(name, rds.ttl, list(rds))

    def _exists(self, name: dns.name.Name) -> bool:
        """The name owns records or is an empty non-terminal (RFC 8020)."""
        return any(n == name or n.is_subdomain(name) for n in self.names)

    def respond(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
            return response
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        q = query.question[0]
        labels = [label for label in q.name.labels if label]
        if q.rdclass == dns.rdataclass.IN and labels and labels[-1].isdigit():
            response.set_rcode(dns.rcode.NXDOMAIN)  # no such top-level domain
            return response
        if q.rdclass != dns.rdataclass.IN or not q.name.is_subdomain(self.origin):
            response.set_rcode(dns.rcode.REFUSED)
            return response
        response.flags |= dns.flags.AA
        name = q.name
        for _ in range(8):  # CNAME chain limit
            if not self._exists(name):
                response.set_rcode(dns.rcode.NXDOMAIN)
                response.authority.append(self.soa_rrset)
                return response
            if q.rdtype == dns.rdatatype.ANY:
                node = self.zone.get_node(name)
                if node is not None:
                    for rds in node.rdatasets:
                        response.answer.append(dns.rrset.from_rdata_list(name, rds.ttl, list(rds)))
                return response
            rrset = self._rrset(name, q.rdtype)
            if rrset is not None:
                response.answer.append(rrset)
                return response
            cname = self._rrset(name, dns.rdatatype.CNAME)
            if cname is None:
                break
            response.answer.append(cname)
            name = cname[0].target
            if not name.is_subdomain(self.origin):
                return response
        response.authority.append(self.soa_rrset)  # NODATA
        return response

    def answer_wire(self, wire: bytes, max_size: int | None) -> tuple[bytes | None, str, str]:
        """Wire query -> (wire response or None to drop, qname, qtype)."""
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # noqa: BLE001 - malformed query: FORMERR if we can say to whom
            if len(wire) < 12:
                return None, "", ""
            header = wire[:2] + struct.pack("!HHHHH", 0x8001, 0, 0, 0, 0)
            return header, "", ""
        qname = qtype = ""
        if query.question:
            qname = query.question[0].name.to_text().lower()
            qtype = dns.rdatatype.to_text(query.question[0].rdtype)
        if query.flags & dns.flags.QR:
            return None, qname, qtype
        response = self.respond(query)
        if max_size is None:  # TCP (RFC 7766 §8): any size up to 65535, whatever EDNS says
            return response.to_wire(max_size=65535), qname, qtype
        limit = 512
        if query.edns >= 0:
            limit = max(512, min(query.payload, 4096))
        try:
            return response.to_wire(max_size=limit), qname, qtype
        except dns.exception.TooBig:
            response.answer.clear()
            response.authority.clear()
            response.additional.clear()
            response.flags |= dns.flags.TC
            return response.to_wire(max_size=limit), qname, qtype


# ------------------------------------------------------------------------------------------------
# The servers


@dataclass
class _Listener:
    sock: socket.socket
    kind: str  # "blob" | "dns-tcp" | "dns-udp" | "udp-echo" | "wakeup"
    addr: str
    port: int


def _bind(family: int, type_: int, addr: str, port: int) -> socket.socket:
    sock = socket.socket(family, type_)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((addr, port))
        if type_ == socket.SOCK_STREAM:
            sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _family(addr: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET


def _fmt_hostport(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


@dataclass
class FakeNet:
    """The fake internet. ``start()`` binds everything (the namespace must already exist)."""

    blob_endpoints: Iterable[tuple[str, int]] = BLOB_ENDPOINTS
    host_blob_endpoints: Iterable[tuple[str, int]] = HOST_BLOB_ENDPOINTS
    udp_echo_endpoints: Iterable[tuple[str, int]] = UDP_ECHO_ENDPOINTS
    dns_endpoints: Iterable[tuple[str, int, bool, bool]] = DNS_ENDPOINTS
    dns_upstream: str = DNS_UPSTREAM
    zone: FakeZone = field(default_factory=FakeZone)
    idle_timeout: float = 60.0

    def __post_init__(self) -> None:
        self.blob_endpoints = tuple(self.blob_endpoints)
        self.host_blob_endpoints = tuple(self.host_blob_endpoints)
        self.udp_echo_endpoints = tuple(self.udp_echo_endpoints)
        self.dns_endpoints = tuple(self.dns_endpoints)
        self._lock = threading.Lock()
        self._connections: list[Connection] = []
        self._datagrams: list[Datagram] = []
        self._queries: list[DnsQuery] = []
        self._listeners: list[_Listener] = []
        self._active: set[socket.socket] = set()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()

    # -- accessors ------------------------------------------------------------------------------

    def connections(self, addr: str | None = None, port: int | None = None) -> list[Connection]:
        """TCP connections accepted (since the last reset) on addr:port (None = any)."""
        a = _norm(addr) if addr is not None else None
        with self._lock:
            return [
                c
                for c in self._connections
                if (a is None or c.local_addr == a) and (port is None or c.local_port == port)
            ]

    def datagrams(self, addr: str | None = None, port: int | None = None) -> list[Datagram]:
        """UDP datagrams received by the echo servers on addr:port (None = any)."""
        a = _norm(addr) if addr is not None else None
        with self._lock:
            return [
                d
                for d in self._datagrams
                if (a is None or d.local_addr == a) and (port is None or d.local_port == port)
            ]

    def dns_queries(self, server: str | None = None, qname: str | None = None) -> list[DnsQuery]:
        """DNS queries received, optionally only by one server address and/or for one name."""
        s = _norm(server) if server is not None else None
        n = None
        if qname is not None:
            n = qname.lower() if qname.endswith(".") else qname.lower() + "."
        with self._lock:
            return [
                q
                for q in self._queries
                if (s is None or q.server_addr == s) and (n is None or q.qname == n)
            ]

    def reset(self) -> None:
        with self._lock:
            self._connections.clear()
            self._datagrams.clear()
            self._queries.clear()

    @staticmethod
    def blob_sha256(n: int) -> str:
        return blob_sha256(n)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> FakeNet:
        def internet_listeners() -> None:
            for addr, port in self.blob_endpoints:
                self._listen(socket.SOCK_STREAM, "blob", addr, port)
            for addr, port in self.udp_echo_endpoints:
                self._listen(socket.SOCK_DGRAM, "udp-echo", addr, port)
            for addr, port, udp, tcp in self.dns_endpoints:
                if udp:
                    self._listen(socket.SOCK_DGRAM, "dns-udp", addr, port)
                if tcp:
                    self._listen(socket.SOCK_STREAM, "dns-tcp", addr, port)

        try:
            in_internet(internet_listeners)
            for addr, port in self.host_blob_endpoints:
                self._listen(socket.SOCK_STREAM, "blob", addr, port)
        except OSError:
            self.stop()
            raise
        self._thread = threading.Thread(target=self._loop, name="fakenet", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for lst in self._listeners:
            lst.sock.close()
        self._listeners.clear()
        with self._lock:
            active = list(self._active)
        for s in active:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> FakeNet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _listen(self, type_: int, kind: str, addr: str, port: int) -> None:
        sock = _bind(_family(addr), type_, addr, port)
        self._listeners.append(_Listener(sock, kind, _norm(addr), port))

    # -- the selector thread --------------------------------------------------------------------

    def _loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        for lst in self._listeners:
            sel.register(lst.sock, selectors.EVENT_READ, lst)
        try:
            while not self._stopping.is_set():
                for key, _ in sel.select(timeout=1.0):
                    lst = key.data
                    if lst is None:
                        return
                    try:
                        if lst.sock.type == socket.SOCK_STREAM:
                            self._accept(lst)
                        else:
                            self._datagram(lst)
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError:
                        if self._stopping.is_set():
                            return
        finally:
            sel.close()

    def _accept(self, lst: _Listener) -> None:
        conn, peer = lst.sock.accept()
        conn.settimeout(self.idle_timeout)
        rec = Connection(
            local_addr=_norm(conn.getsockname()[0]),  # the address reached (for 0.0.0.0 too)
            local_port=lst.port,
            peer_addr=_norm(peer[0]),
            peer_port=int(peer[1]),
            at=time.monotonic(),
            kind="blob" if lst.kind == "blob" else "dns",
        )
        with self._lock:
            self._connections.append(rec)
            self._active.add(conn)
        target = self._serve_blob if lst.kind == "blob" else self._serve_dns_tcp
        threading.Thread(
            target=self._run_conn,
            args=(target, conn, lst, rec),
            daemon=True,
            name=f"fakenet-{lst.kind}-{lst.addr}:{lst.port}",
        ).start()

    def _datagram(self, lst: _Listener) -> None:
        data, peer = lst.sock.recvfrom(65535)
        now = time.monotonic()
        if lst.kind == "udp-echo":
            with self._lock:
                self._datagrams.append(
                    Datagram(lst.addr, lst.port, _norm(peer[0]), int(peer[1]), len(data), now)
                )
            lst.sock.sendto(data, peer)
            return
        wire, qname, qtype = self.zone.answer_wire(data, max_size=512)
        with self._lock:
            self._queries.append(
                DnsQuery(lst.addr, lst.port, "udp", qname, qtype, _norm(peer[0]), now)
            )
        if wire is not None:
            lst.sock.sendto(wire, peer)

    # -- per-connection threads -----------------------------------------------------------------

    def _run_conn(
        self,
        target: Callable[[socket.socket, _Listener, Connection], None],
        conn: socket.socket,
        lst: _Listener,
        rec: Connection,
    ) -> None:
        try:
            target(conn, lst, rec)
        except OSError:
            pass
        finally:
            with self._lock:
                self._active.discard(conn)
            conn.close()

    @staticmethod
    def _finish(conn: socket.socket) -> None:
        """Half-close, then drain what the peer still sends, so close() does not RST."""
        try:
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(10)
            while conn.recv(65536):
                pass
        except OSError:
            pass

    def _serve_blob(self, conn: socket.socket, lst: _Listener, rec: Connection) -> None:
        buf = b""
        while b"\n" not in buf and len(buf) < 1024:
            data = conn.recv(4096)
            if not data:
                break
            buf += data
        line, _, rest = buf.partition(b"\n")
        rec.bytes_in = len(buf)
        words = line.decode("ascii", "replace").strip().split()
        rec.command = " ".join(words)
        cmd = words[0].upper() if words else ""
        if cmd == "GET" and len(words) == 2 and words[1].isdigit():
            for chunk in blob_chunks(int(words[1])):
                conn.sendall(chunk)
                rec.bytes_out += len(chunk)
        elif cmd in ("PUT", "SLOWPUT") and len(words) == 2 and words[1].isdigit():
            # SLOWPUT reads in 64 KiB sips with pauses: a slow host peer (back-pressure).
            slow = cmd == "SLOWPUT"
            want = int(words[1])
            h = hashlib.sha256(rest[:want])
            got = len(rest[:want])
            view = memoryview(bytearray(1 << 16 if slow else 1 << 20))
            while got < want:
                k = conn.recv_into(view, min(len(view), want - got))
                if k == 0:
                    break
                if slow:
                    time.sleep(0.004)
                h.update(view[:k])
                got += k
            rec.bytes_in += got - len(rest[:want])
            reply = (h.hexdigest() + "\n").encode()
            conn.sendall(reply)
            rec.bytes_out += len(reply)
        elif cmd == "ECHO" and len(words) == 1:
            if rest:
                conn.sendall(rest)
                rec.bytes_out += len(rest)
            view = memoryview(bytearray(1 << 16))
            while True:
                try:
                    k = conn.recv_into(view)
                except ConnectionResetError:
                    rec.ending = "reset"
                    break
                if k == 0:
                    break
                rec.bytes_in += k
                conn.sendall(view[:k])
                rec.bytes_out += k
        elif cmd == "RESET" and len(words) == 1:
            # Abort: close with a zero linger time, which sends RST instead of FIN.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return  # no half-close first: the caller's close() is the reset
        elif cmd == "HELLO" and len(words) == 1:
            local = conn.getsockname()
            reply = f"hello from {_fmt_hostport(_norm(local[0]), int(local[1]))}\n".encode()
            conn.sendall(reply)
            rec.bytes_out += len(reply)
        else:
            conn.sendall(b"error unknown command\n")
        self._finish(conn)

    def _serve_dns_tcp(self, conn: socket.socket, lst: _Listener, rec: Connection) -> None:
        while True:
            head = _recv_exact(conn, 2)
            if head is None:
                return
            (length,) = struct.unpack("!H", head)
            wire = _recv_exact(conn, length)
            if wire is None:
                return
            rec.bytes_in += 2 + length
            answer, qname, qtype = self.zone.answer_wire(wire, max_size=None)
            with self._lock:
                self._queries.append(
                    DnsQuery(
                        lst.addr, lst.port, "tcp", qname, qtype, rec.peer_addr, time.monotonic()
                    )
                )
            if answer is None:
                continue
            conn.sendall(struct.pack("!H", len(answer)) + answer)
            rec.bytes_out += 2 + len(answer)


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        try:
            data = conn.recv(n - len(buf))
        except OSError as e:
            if e.errno in (errno.ECONNRESET, None) or isinstance(e, TimeoutError):
                return None
            raise
        if not data:
            return None
        buf += data
    return bytes(buf)
