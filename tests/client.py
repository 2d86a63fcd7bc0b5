"""A small network client that the end-to-end tests run *inside* the tapbox sandbox.

Theory of operation: every subcommand performs one network action the way an ordinary program
would (glibc ``getaddrinfo`` through /etc/resolv.conf, blocking sockets with timeouts), prints
exactly ONE line of JSON on stdout and exits 0 on success or 1 on the failure it reports.
Expected failures (refused, timeout, NXDOMAIN...) are results, never tracebacks.

    client.py resolve NAME [--type A|AAAA]       {"addresses": [...]} | {"error": "NXDOMAIN"|...}
    client.py resolve-raw SERVER NAME [--type T]  {"rcode": ..., "addresses": [...]} | {"error"}
    client.py hello HOST PORT                     {"reply": "hello from 192.0.2.10:80"}
    client.py get HOST PORT N                     {"sha256", "bytes", "seconds"}
    client.py put HOST PORT N                     {"sent_sha256", "server_sha256", ...}
    client.py connect HOST PORT                   {"result": "ok"|"refused"|"timeout"|..., ...}
    client.py udp HOST PORT                       {"result": "echo"|"unreachable"|"timeout"}

It imports only the standard library (plus dnspython, lazily, for ``resolve-raw``), and it also
holds the deterministic "blob" data generator shared with the fake servers (tests/fakenet.py),
so a transfer can be checked by sha256 at both ends.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import random
import socket
import struct
import sys
import time
from collections.abc import Iterator
from typing import Any

CONNECT_TIMEOUT = 5.0
UDP_TIMEOUT = 2.0
DNS_TIMEOUT = 2.0
IO_TIMEOUT = 60.0  # per recv/send while a transfer is in progress

# ---------------------------------------------------------------------------------------------
# Deterministic blob data: the stream for size N is an endless repetition of one pseudo-random
# block (fixed seed), starting at an offset derived from N. The block length is not a power of two
# so that block boundaries do not line up with segment or buffer boundaries.
BLOB_BLOCK_LEN = 1_048_573
_BLOCK: bytes | None = None


def _block() -> bytes:
    global _BLOCK
    if _BLOCK is None:
        _BLOCK = random.Random(0x7A9B0C).randbytes(BLOB_BLOCK_LEN)
    return _BLOCK


def blob_chunks(n: int, chunk: int = 1 << 20) -> Iterator[memoryview]:
    """Yield the n bytes of the blob for size n, in chunks of at most ``chunk`` bytes."""
    block = _block()
    doubled = memoryview(block + block)
    offset = (n * 2_654_435_761) % BLOB_BLOCK_LEN
    remaining = n
    while remaining > 0:
        take = min(remaining, chunk, BLOB_BLOCK_LEN)
        yield doubled[offset : offset + take]
        offset = (offset + take) % BLOB_BLOCK_LEN
        remaining -= take


def blob_bytes(n: int) -> bytes:
    return b"".join(blob_chunks(n))


def blob_sha256(n: int) -> str:
    h = hashlib.sha256()
    for c in blob_chunks(n):
        h.update(c)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------


class Failure(Exception):
    """An expected failure: reported as JSON with exit status 1."""

    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__(result)
        self.result = result


def _oserror_name(e: OSError) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, ConnectionResetError):
        return "reset"
    if isinstance(e, TimeoutError | socket.timeout):
        return "timeout"
    return {
        errno.ENETUNREACH: "unreachable",
        errno.EHOSTUNREACH: "host-unreachable",
        errno.ECONNREFUSED: "refused",
        errno.ECONNRESET: "reset",
        errno.ETIMEDOUT: "timeout",
        errno.EADDRNOTAVAIL: "address-not-available",
        errno.EACCES: "permission-denied",
        errno.EPERM: "permission-denied",
    }.get(e.errno or 0, "oserror")


def _gai_name(e: socket.gaierror) -> str:
    table = {
        socket.EAI_NONAME: "NXDOMAIN",
        socket.EAI_AGAIN: "TEMPORARY_FAILURE",
        socket.EAI_FAIL: "SERVFAIL",
    }
    for name in ("EAI_NODATA", "EAI_ADDRFAMILY"):
        code = getattr(socket, name, None)
        if code is not None:
            table[code] = "NODATA"
    return table.get(e.errno, "resolve-failed")


def _connect(host: str, port: int, start: float) -> socket.socket:
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except socket.gaierror as e:
        raise Failure(
            {
                "result": "resolve-failed",
                "error": _gai_name(e),
                "detail": str(e),
                "seconds": time.monotonic() - start,
            }
        ) from None
    except OSError as e:
        raise Failure(
            {
                "result": _oserror_name(e),
                "errno": e.errno,
                "detail": str(e),
                "seconds": time.monotonic() - start,
            }
        ) from None
    sock.settimeout(IO_TIMEOUT)
    return sock


def _io_failure(what: str, e: OSError, start: float, **extra: Any) -> Failure:
    return Failure(
        {
            "result": _oserror_name(e),
            "during": what,
            "errno": e.errno,
            "detail": str(e),
            "seconds": time.monotonic() - start,
            **extra,
        }
    )


def _recv_all(sock: socket.socket, limit: int = 1 << 16) -> bytes:
    out = bytearray()
    while len(out) < limit:
        data = sock.recv(4096)
        if not data:
            break
        out += data
    return bytes(out)


def cmd_resolve(args: argparse.Namespace) -> dict[str, Any]:
    family = {"A": socket.AF_INET, "AAAA": socket.AF_INET6, None: socket.AF_UNSPEC}[args.type]
    try:
        infos = socket.getaddrinfo(args.name, None, family, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise Failure({"error": _gai_name(e), "gai_errno": e.errno, "detail": str(e)}) from None
    addresses: list[str] = []
    for info in infos:
        addr = str(info[4][0])
        if addr not in addresses:
            addresses.append(addr)
    return {"addresses": addresses}


def cmd_resolve_raw(args: argparse.Namespace) -> dict[str, Any]:
    import dns.flags
    import dns.message
    import dns.rcode
    import dns.rdatatype

    query = dns.message.make_query(args.name, args.type or "A")
    family = socket.AF_INET6 if ":" in args.server else socket.AF_INET
    # A connected socket, so an ICMP port/host unreachable surfaces as an error on recv.
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(DNS_TIMEOUT)
        try:
            sock.connect((args.server, args.port))
            sock.send(query.to_wire())
            deadline = time.monotonic() + DNS_TIMEOUT
            while True:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                wire = sock.recv(65535)
                try:
                    response = dns.message.from_wire(wire)
                except Exception:  # noqa: BLE001 - garbage is "no answer", keep waiting
                    continue
                if response.id == query.id:
                    break
        except OSError as e:
            name = _oserror_name(e)
            raise Failure({"error": name, "errno": e.errno, "detail": str(e)}) from None
    addresses: list[str] = []
    records: list[str] = []
    for rrset in response.answer:
        for rd in rrset:
            records.append(f"{rrset.name} {dns.rdatatype.to_text(rrset.rdtype)} {rd.to_text()}")
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                addresses.append(rd.to_text())
    return {
        "rcode": dns.rcode.to_text(response.rcode()),
        "truncated": bool(response.flags & dns.flags.TC),
        "addresses": addresses,
        "records": records,
    }


def cmd_hello(args: argparse.Namespace) -> dict[str, Any]:
    start = time.monotonic()
    with _connect(args.host, args.port, start) as sock:
        try:
            sock.sendall(b"HELLO\n")
            reply = _recv_all(sock)
        except OSError as e:
            raise _io_failure("hello", e, start) from None
    if not reply:
        raise Failure({"result": "empty-reply", "seconds": time.monotonic() - start})
    return {"reply": reply.decode("utf-8", "replace").strip(), "seconds": time.monotonic() - start}


def cmd_reset_me(args: argparse.Namespace) -> dict[str, Any]:
    """Ask the server to reset the connection; report what the read then sees."""
    start = time.monotonic()
    with _connect(args.host, args.port, start) as sock:
        sock.sendall(b"RESET\n")
        sock.settimeout(5)
        try:
            data = sock.recv(100)
        except ConnectionResetError:
            return {"result": "reset", "seconds": time.monotonic() - start}
        except TimeoutError:
            raise Failure({"result": "timeout"}) from None
    raise Failure({"result": "eof" if not data else "data"})


def cmd_reset_them(args: argparse.Namespace) -> dict[str, Any]:
    """Echo a few bytes, then reset the connection ourselves (zero linger time)."""
    start = time.monotonic()
    with _connect(args.host, args.port, start) as sock:
        sock.sendall(b"ECHO\nabc")
        sock.settimeout(5)
        echoed = b""
        while len(echoed) < 3:
            chunk = sock.recv(3 - len(echoed))
            if not chunk:
                break
            echoed += chunk
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return {"result": "sent-reset", "echoed": echoed.decode(), "seconds": time.monotonic() - start}


def cmd_get(args: argparse.Namespace) -> dict[str, Any]:
    start = time.monotonic()
    h = hashlib.sha256()
    got = 0
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with _connect(args.host, args.port, start) as sock:
        try:
            sock.sendall(f"GET {args.n}\n".encode())
            while True:
                k = sock.recv_into(view)
                if k == 0:
                    break
                h.update(view[:k])
                got += k
        except OSError as e:
            raise _io_failure("get", e, start, bytes=got) from None
    result = {"sha256": h.hexdigest(), "bytes": got, "seconds": time.monotonic() - start}
    if got != args.n:
        result["error"] = "short"
        raise Failure(result)
    return result


def cmd_put(args: argparse.Namespace) -> dict[str, Any]:
    start = time.monotonic()
    h = hashlib.sha256()
    sent = 0
    with _connect(args.host, args.port, start) as sock:
        try:
            verb = "SLOWPUT" if args.slow else "PUT"
            sock.sendall(f"{verb} {args.n}\n".encode())
            for chunk in blob_chunks(args.n):
                sock.sendall(chunk)
                h.update(chunk)
                sent += len(chunk)
            sock.shutdown(socket.SHUT_WR)
            if args.no_wait:  # fire and forget: exit while the kernel may still be sending
                return {"sent_sha256": h.hexdigest(), "bytes": sent}
            reply = _recv_all(sock).decode("ascii", "replace").strip()
        except OSError as e:
            raise _io_failure("put", e, start, bytes=sent) from None
    result = {
        "sent_sha256": h.hexdigest(),
        "server_sha256": reply,
        "bytes": sent,
        "seconds": time.monotonic() - start,
    }
    if reply != result["sent_sha256"]:
        result["error"] = "mismatch"
        raise Failure(result)
    return result


def cmd_connect(args: argparse.Namespace) -> dict[str, Any]:
    start = time.monotonic()
    sock = _connect(args.host, args.port, start)
    peer = sock.getpeername()
    sock.close()
    return {
        "result": "ok",
        "peer": [str(peer[0]), int(peer[1])],
        "seconds": time.monotonic() - start,
    }


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def cmd_ping(args: argparse.Namespace) -> dict[str, Any]:
    """One echo request over a raw socket (the sandbox's root owns CAP_NET_RAW in its netns);
    reports "reply", "unreachable" (with the ICMP type/code and who sent it) or "timeout"."""
    start = time.monotonic()
    v6 = ":" in args.host
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    ident, seq, data = os.getpid() & 0xFFFF, 7, b"tapbox-ping"
    echo_type = 128 if v6 else 8
    head = echo_type.to_bytes(1, "big") + b"\0\0\0" + ident.to_bytes(2, "big") + \
        seq.to_bytes(2, "big")
    packet = head + data
    if not v6:  # the kernel fills in ICMPv6 checksums on raw sockets, not ICMPv4 ones
        packet = packet[:2] + _icmp_checksum(packet).to_bytes(2, "big") + packet[4:]
    with socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW, proto) as s:
        s.sendto(packet, (args.host, 0))
        deadline = start + 3.0
        while time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                reply, sender = s.recvfrom(65535)
            except TimeoutError:
                break
            icmp = reply if v6 else reply[(reply[0] & 0x0F) * 4:]
            kind, code = icmp[0], icmp[1]
            if kind == (129 if v6 else 0) and icmp[4:8] == head[4:8] and icmp[8:] == data:
                return {"result": "reply", "from": sender[0], "seconds": time.monotonic() - start}
            if kind in ((1, 3) if v6 else (3, 11)):
                raise Failure({"result": "unreachable", "type": kind, "code": code,
                               "from": sender[0], "seconds": time.monotonic() - start})
    raise Failure({"result": "timeout", "seconds": time.monotonic() - start})


def cmd_ttl1(args: argparse.Namespace) -> dict[str, Any]:
    """A traceroute-style probe: a UDP datagram with TTL 1; reports the ICMP that comes back."""
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as raw, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)
        udp.sendto(b"probe", (args.host, args.port))
        raw.settimeout(3.0)
        try:
            reply, sender = raw.recvfrom(65535)
        except TimeoutError:
            raise Failure({"result": "timeout"}) from None
        icmp = reply[(reply[0] & 0x0F) * 4:]
        return {"result": "icmp", "type": icmp[0], "code": icmp[1], "from": sender[0]}


def cmd_udp(args: argparse.Namespace) -> dict[str, Any]:
    start = time.monotonic()
    payload = b"tapbox-udp-" + os.urandom(8).hex().encode()
    try:
        infos = socket.getaddrinfo(args.host, args.port, socket.AF_UNSPEC, socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise Failure({"result": "resolve-failed", "error": _gai_name(e)}) from None
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(sockaddr)
            sock.send(payload)
            deadline = start + UDP_TIMEOUT
            while True:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                data = sock.recv(65535)
                if data == payload:
                    return {"result": "echo", "seconds": time.monotonic() - start}
        except OSError as e:
            name = _oserror_name(e)
            if name in ("refused", "host-unreachable"):
                name = "unreachable"  # ICMP port/host unreachable on a connected UDP socket
            raise Failure(
                {
                    "result": name,
                    "errno": e.errno,
                    "detail": str(e),
                    "seconds": time.monotonic() - start,
                }
            ) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="client.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("resolve")
    s.add_argument("name")
    s.add_argument("--type", choices=["A", "AAAA"], default=None)
    s.set_defaults(func=cmd_resolve)

    s = sub.add_parser("resolve-raw")
    s.add_argument("server")
    s.add_argument("name")
    s.add_argument("--type", default="A")
    s.add_argument("--port", type=int, default=53)
    s.set_defaults(func=cmd_resolve_raw)

    for name, func in (("hello", cmd_hello), ("connect", cmd_connect), ("udp", cmd_udp),
                       ("reset-me", cmd_reset_me), ("reset-them", cmd_reset_them)):
        s = sub.add_parser(name)
        s.add_argument("host")
        s.add_argument("port", type=int)
        s.set_defaults(func=func)

    s = sub.add_parser("ping")
    s.add_argument("host")
    s.set_defaults(func=cmd_ping)

    s = sub.add_parser("ttl1")
    s.add_argument("host")
    s.add_argument("port", type=int)
    s.set_defaults(func=cmd_ttl1)

    for name, func in (("get", cmd_get), ("put", cmd_put)):
        s = sub.add_parser(name)
        s.add_argument("host")
        s.add_argument("port", type=int)
        s.add_argument("n", type=int)
        s.add_argument("--slow", action="store_true", help="put: the server reads slowly")
        s.add_argument("--no-wait", action="store_true",
                       help="put: exit right after sending, without waiting for the reply")
        s.set_defaults(func=func)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
        status = 0
    except Failure as f:
        result = f.result
        status = 1
    print(json.dumps(result), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
