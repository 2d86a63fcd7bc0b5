"""Sanity of the hermetic test harness itself (no tapbox involved).

The namespace must be private and closed, the fake servers must speak their protocols, the DNS
zone must answer as documented in tests/fakenet.py, and tests/client.py (run directly in the
test namespace, outside any sandbox) must report results and expected failures as JSON.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import fakenet as fn
import pytest
from client import BLOB_BLOCK_LEN, blob_bytes, blob_chunks, blob_sha256
from conftest import (
    CLIENT,
    REPO_ROOT,
    build_tapbox_argv,
    client_cmd,
    parse_client_json,
    tapbox_env,
)
from fakenet import FakeNet


def client(
    *args: str, timeout: float = 60, prefix: list[str] | None = None
) -> tuple[int, dict[str, Any], str]:
    """Run tests/client.py directly in the test namespace."""
    proc = subprocess.run(
        [*(prefix or []), *client_cmd(*args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=tapbox_env(),
        cwd=REPO_ROOT,
    )
    result = parse_client_json(proc.stdout)
    assert result is not None, f"no JSON from client {args}: {proc.stdout!r} {proc.stderr!r}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, result, proc.stderr


# ------------------------------------------------------------------------------------------------
# The namespace


def test_session_runs_in_a_private_network_namespace() -> None:
    state = fn.netns_state()
    assert state.ok, state.error
    assert state.netns != state.outer_netns
    assert os.stat("/proc/self/ns/net").st_ino == state.netns


def test_namespace_has_no_default_route() -> None:
    assert fn.default_routes() == []


def test_fake_addresses_are_on_lo_of_the_internet_not_the_host() -> None:
    assert set(fn.LO_ADDRESSES) | {"127.0.0.1"} <= fn.lo_addresses_present()
    host = fn.host_addresses_present()
    assert set(fn.HOST_ADDRESSES) | {"127.0.0.1"} <= host
    assert not set(fn.LO_ADDRESSES) & host  # the servers are not the host's own addresses


@pytest.mark.parametrize("addr", ["203.0.113.99", "192.0.2.99", "2001:db8::99"])
def test_nothing_beyond_lo_is_reachable(addr: str) -> None:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        with pytest.raises(OSError) as info:
            s.connect((addr, 80))
        assert info.value.errno == errno.ENETUNREACH
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        with pytest.raises(OSError) as info:
            s.sendto(b"x", (addr, 53))
        assert info.value.errno == errno.ENETUNREACH


def test_children_inherit_the_namespace() -> None:
    out = subprocess.run(
        ["readlink", "/proc/self/ns/net"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == f"net:[{fn.netns_state().netns}]"


# ------------------------------------------------------------------------------------------------
# The blob data


def test_blob_data_is_deterministic_and_fast() -> None:
    n = 20_000_000
    start = time.monotonic()
    total = sum(len(c) for c in blob_chunks(n))
    assert time.monotonic() - start < 1.0
    assert total == n
    assert blob_bytes(5000) == blob_bytes(5000)
    assert blob_sha256(n) == blob_sha256(n)
    # crosses the block boundary seamlessly and depends on N
    big = blob_bytes(3 * BLOB_BLOCK_LEN + 17)
    assert big[:BLOB_BLOCK_LEN] == big[BLOB_BLOCK_LEN : 2 * BLOB_BLOCK_LEN]
    assert blob_bytes(100) != blob_bytes(101)[:100]
    assert len(set(blob_bytes(4096))) > 200  # not a constant filler


# ------------------------------------------------------------------------------------------------
# DNS


def udp_query(server: str, name: str, rdtype: str = "A", **kw: Any) -> dns.message.Message:
    return dns.query.udp(dns.message.make_query(name, rdtype, **kw), server, timeout=2)


def tcp_query(server: str, name: str, rdtype: str = "A") -> dns.message.Message:
    return dns.query.tcp(dns.message.make_query(name, rdtype), server, timeout=2)


def answers(msg: dns.message.Message) -> list[tuple[str, str, str, int]]:
    return [
        (rrset.name.to_text(), dns.rdatatype.to_text(rrset.rdtype), rd.to_text(), rrset.ttl)
        for rrset in msg.answer
        for rd in rrset
    ]


ZONE_CASES = [
    ("api.example.test", "A", [("api.example.test.", "A", "192.0.2.10", 60)]),
    ("api.example.test", "AAAA", [("api.example.test.", "AAAA", "2001:db8::10", 60)]),
    ("a.wild.test", "A", [("a.wild.test.", "A", "192.0.2.20", 60)]),
    ("b.c.wild.test", "A", [("b.c.wild.test.", "A", "192.0.2.20", 60)]),
    ("wild.test", "A", [("wild.test.", "A", "192.0.2.21", 60)]),
    (
        "alias.example.test",
        "A",
        [
            ("alias.example.test.", "CNAME", "edge.cdn.test.", 60),
            ("edge.cdn.test.", "A", "198.51.100.20", 60),
        ],
    ),
    ("edge.cdn.test", "A", [("edge.cdn.test.", "A", "198.51.100.20", 60)]),
    ("denied.test", "A", [("denied.test.", "A", "203.0.113.7", 60)]),
    ("meta.example.test", "A", [("meta.example.test.", "A", "169.254.169.254", 60)]),
    ("loop.example.test", "A", [("loop.example.test.", "A", "127.0.0.1", 60)]),
    ("txt.example.test", "TXT", [("txt.example.test.", "TXT", '"hello"', 60)]),
    ("API.Example.TEST", "A", [("API.Example.TEST.", "A", "192.0.2.10", 60)]),
]


@pytest.mark.parametrize(("name", "rdtype", "expected"), ZONE_CASES)
@pytest.mark.parametrize("server", ["198.51.100.53", "2001:db8::53", "203.0.113.53"])
def test_zone_answers_over_udp(
    fakenet: FakeNet, server: str, name: str, rdtype: str, expected: list[Any]
) -> None:
    msg = udp_query(server, name, rdtype)
    assert msg.rcode() == dns.rcode.NOERROR
    assert msg.flags & dns.flags.AA
    assert answers(msg) == expected
    (q,) = fakenet.dns_queries()
    assert (q.server_addr, q.transport, q.qname, q.qtype) == (
        server,
        "udp",
        name.lower() + ".",
        rdtype,
    )


@pytest.mark.parametrize("server", ["198.51.100.53", "2001:db8::53", "203.0.113.53"])
def test_zone_answers_over_tcp(fakenet: FakeNet, server: str) -> None:
    msg = tcp_query(server, "alias.example.test", "A")
    assert answers(msg)[-1] == ("edge.cdn.test.", "A", "198.51.100.20", 60)
    assert [q.transport for q in fakenet.dns_queries(server=server)] == ["tcp"]
    assert [c.kind for c in fakenet.connections(server, 53)] == ["dns"]


def test_tcp_connection_carries_several_queries(fakenet: FakeNet) -> None:
    """RFC 7766: length-prefixed messages, several per connection, pipelined."""
    q1 = dns.message.make_query("api.example.test", "A")
    q2 = dns.message.make_query("denied.test", "A")
    with socket.create_connection(("198.51.100.53", 53), timeout=2) as s:
        for q in (q1, q2):
            w = q.to_wire()
            s.sendall(struct.pack("!H", len(w)) + w)
        got = []
        for _ in range(2):
            (n,) = struct.unpack("!H", _recv_exact(s, 2))
            got.append(dns.message.from_wire(_recv_exact(s, n)))
    assert [answers(m)[0][2] for m in got] == ["192.0.2.10", "203.0.113.7"]
    assert [m.id for m in got] == [q1.id, q2.id]
    assert len(fakenet.connections("198.51.100.53", 53)) == 1


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, "EOF"
        buf += chunk
    return buf


@pytest.mark.parametrize(
    ("name", "rdtype"),
    [("nope.test", "A"), ("x.api.example.test", "A"), ("zz.wild.test", "AAAA")],
)
def test_unknown_names_are_nxdomain_with_soa(fakenet: FakeNet, name: str, rdtype: str) -> None:
    msg = udp_query("198.51.100.53", name, rdtype)
    assert msg.rcode() == dns.rcode.NXDOMAIN
    assert msg.answer == []
    assert [dns.rdatatype.to_text(r.rdtype) for r in msg.authority] == ["SOA"]


@pytest.mark.parametrize(
    ("name", "rdtype"),
    [
        ("api.example.test", "TXT"),
        ("txt.example.test", "A"),
        ("wild.test", "AAAA"),
        ("c.wild.test", "A"),  # empty non-terminal
        ("example.test", "A"),  # empty non-terminal
    ],
)
def test_name_without_that_type_is_nodata(fakenet: FakeNet, name: str, rdtype: str) -> None:
    msg = udp_query("198.51.100.53", name, rdtype)
    assert msg.rcode() == dns.rcode.NOERROR
    assert msg.answer == []
    assert [dns.rdatatype.to_text(r.rdtype) for r in msg.authority] == ["SOA"]


def test_names_outside_the_zone_are_refused(fakenet: FakeNet) -> None:
    msg = udp_query("198.51.100.53", "www.example.com", "A")
    assert msg.rcode() == dns.rcode.REFUSED
    assert not msg.flags & dns.flags.AA


def test_large_answer_truncated_over_udp_complete_over_tcp(fakenet: FakeNet) -> None:
    udp = udp_query("198.51.100.53", "big.example.test", "TXT")
    assert udp.flags & dns.flags.TC
    assert udp.answer == []
    tcp = tcp_query("198.51.100.53", "big.example.test", "TXT")
    assert not tcp.flags & dns.flags.TC
    assert len(answers(tcp)) == 9
    edns = udp_query("198.51.100.53", "big.example.test", "TXT", use_edns=0, payload=4096)
    assert len(answers(edns)) == 9


def test_malformed_query_gets_formerr_and_is_recorded(fakenet: FakeNet) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.connect(("198.51.100.53", 53))
        s.send(b"\x12\x34" + b"\x01\x00\x00\x01" + b"\xff" * 10)
        reply = s.recv(512)
    assert reply[:2] == b"\x12\x34"
    assert reply[3] & 0x0F == dns.rcode.FORMERR
    assert len(fakenet.dns_queries()) == 1


def test_records_are_reset_between_tests_and_filtered(fakenet: FakeNet) -> None:
    assert fakenet.dns_queries() == []
    assert fakenet.connections() == []
    assert fakenet.datagrams() == []
    udp_query("198.51.100.53", "api.example.test")
    udp_query("203.0.113.53", "denied.test")
    assert len(fakenet.dns_queries()) == 2
    assert [q.qname for q in fakenet.dns_queries(server="203.0.113.53")] == ["denied.test."]
    assert len(fakenet.dns_queries(qname="API.example.test")) == 1
    fakenet.reset()
    assert fakenet.dns_queries() == []


# ------------------------------------------------------------------------------------------------
# The blob servers, through tests/client.py run directly


@pytest.mark.parametrize(("addr", "port"), fn.BLOB_ENDPOINTS)
def test_hello_on_every_blob_endpoint(fakenet: FakeNet, addr: str, port: int) -> None:
    status, result, _ = client("hello", addr, str(port))
    host = f"[{addr}]" if ":" in addr else addr
    assert status == 0
    assert result["reply"] == f"hello from {host}:{port}"
    (conn,) = fakenet.connections(addr, port)
    assert conn.command == "HELLO"
    assert fakenet.connections() == [conn]


def test_get_returns_the_blob(fakenet: FakeNet) -> None:
    n = 20_000_000
    status, result, _ = client("get", "192.0.2.10", "8080", str(n))
    assert status == 0
    assert result["bytes"] == n
    assert result["sha256"] == fakenet.blob_sha256(n)
    (conn,) = fakenet.connections("192.0.2.10", 8080)
    assert (conn.command, conn.bytes_out) == (f"GET {n}", n)


@pytest.mark.parametrize("n", [0, 1, 65536, 20_000_000])
def test_put_hashes_what_arrives(fakenet: FakeNet, n: int) -> None:
    status, result, _ = client("put", "2001:db8::10", "80", str(n))
    assert status == 0
    assert result["server_sha256"] == result["sent_sha256"] == blob_sha256(n)
    assert fakenet.connections("2001:db8::10", 80)[0].bytes_in == len(f"PUT {n}\n") + n


def test_echo_and_unknown_command(fakenet: FakeNet) -> None:
    with socket.create_connection(("203.0.113.7", 443), timeout=5) as s:
        s.sendall(b"ECHO\nfirst")
        s.sendall(b" second")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data == b"first second"
    with socket.create_connection(("203.0.113.7", 443), timeout=5) as s:
        s.sendall(b"FROB 3\n")
        assert s.recv(4096).startswith(b"error")
    assert [c.command for c in fakenet.connections("203.0.113.7", 443)] == ["ECHO", "FROB 3"]


def test_put_reports_a_short_upload(fakenet: FakeNet) -> None:
    with socket.create_connection(("192.0.2.10", 80), timeout=5) as s:
        s.sendall(b"PUT 10\nabc")
        s.shutdown(socket.SHUT_WR)
        reply = s.recv(4096)
    import hashlib

    assert reply == hashlib.sha256(b"abc").hexdigest().encode() + b"\n"


# ------------------------------------------------------------------------------------------------
# UDP echo and the client's failure reports


@pytest.mark.parametrize(("addr", "port"), fn.UDP_ECHO_ENDPOINTS)
def test_udp_echo(fakenet: FakeNet, addr: str, port: int) -> None:
    status, result, _ = client("udp", addr, str(port))
    assert (status, result["result"]) == (0, "echo")
    assert len(fakenet.datagrams(addr, port)) == 1


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("connect", "192.0.2.10", "80"), (0, "result", "ok")),
        (("connect", "192.0.2.10", "81"), (1, "result", "refused")),
        (("connect", "203.0.113.99", "80"), (1, "result", "unreachable")),
        (("hello", "192.0.2.10", "81"), (1, "result", "refused")),
        (("get", "192.0.2.10", "81", "10"), (1, "result", "refused")),
        (("put", "192.0.2.10", "81", "10"), (1, "result", "refused")),
        (("udp", "192.0.2.10", "9"), (1, "result", "unreachable")),
        (("udp", "203.0.113.99", "9"), (1, "result", "unreachable")),
        (("resolve-raw", "198.51.100.53", "api.example.test"), (0, "rcode", "NOERROR")),
        (("resolve-raw", "198.51.100.53", "nope.test"), (0, "rcode", "NXDOMAIN")),
        (("resolve-raw", "192.0.2.10", "api.example.test"), (1, "error", "refused")),
        (("resolve-raw", "203.0.113.99", "api.example.test"), (1, "error", "unreachable")),
    ],
)
def test_client_reports(fakenet: FakeNet, args: tuple[str, ...], expected: tuple[Any, ...]) -> None:
    status, result, stderr = client(*args)
    assert (status, expected[1], result.get(expected[1])) == expected, result
    assert stderr == ""


def test_client_resolve_raw_by_ipv6_and_type(fakenet: FakeNet) -> None:
    status, result, _ = client("resolve-raw", "2001:db8::53", "api.example.test", "--type", "AAAA")
    assert (status, result["addresses"]) == (0, ["2001:db8::10"])
    status, result, _ = client("resolve-raw", "198.51.100.53", "alias.example.test")
    assert result["addresses"] == ["198.51.100.20"]


def test_client_resolve_raw_times_out_when_nobody_answers(fakenet: FakeNet) -> None:
    """A server that swallows queries: a listening UDP socket that never replies."""
    def bound_sink() -> socket.socket:
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind(("192.0.2.21", 53))
        return sink

    with fn.in_internet(bound_sink):
        start = time.monotonic()
        status, result, _ = client("resolve-raw", "192.0.2.21", "api.example.test")
        assert (status, result["error"]) == (1, "timeout")
        assert 1.5 < time.monotonic() - start < 10


# ------------------------------------------------------------------------------------------------
# The client's getaddrinfo path, with a private resolv.conf as tapbox would bind-mount


@pytest.fixture
def with_resolv_conf(tmp_path: Path) -> list[str]:
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) not installed")
    conf = tmp_path / "resolv.conf"
    conf.write_text(f"nameserver {fn.DNS_UPSTREAM}\noptions timeout:2 attempts:1\n")
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        'mount --bind "$0" /etc/resolv.conf && exec "$@"',
        str(conf),
    ]


@pytest.mark.parametrize(
    ("args", "status", "expected"),
    [
        (("resolve", "api.example.test"), 0, {"addresses": {"192.0.2.10", "2001:db8::10"}}),
        (("resolve", "api.example.test", "--type", "A"), 0, {"addresses": {"192.0.2.10"}}),
        (("resolve", "api.example.test", "--type", "AAAA"), 0, {"addresses": {"2001:db8::10"}}),
        (("resolve", "alias.example.test", "--type", "A"), 0, {"addresses": {"198.51.100.20"}}),
        (("resolve", "nope.test"), 1, {"error": "NXDOMAIN"}),
        (("hello", "api.example.test", "80"), 0, {"reply": None}),
        (("connect", "nope.test", "80"), 1, {"result": "resolve-failed", "error": "NXDOMAIN"}),
    ],
)
def test_client_resolves_through_resolv_conf(
    fakenet: FakeNet,
    with_resolv_conf: list[str],
    args: tuple[str, ...],
    status: int,
    expected: dict[str, Any],
) -> None:
    got_status, result, _ = client(*args, prefix=with_resolv_conf)
    assert got_status == status, result
    for key, value in expected.items():
        if isinstance(value, set):
            assert set(result[key]) == value
        elif value is not None:
            assert result[key] == value
    assert fakenet.dns_queries(server=fn.DNS_UPSTREAM)


def test_client_nodata_is_an_error(fakenet: FakeNet, with_resolv_conf: list[str]) -> None:
    status, result, _ = client(
        "resolve", "txt.example.test", "--type", "A", prefix=with_resolv_conf
    )
    assert status == 1
    assert result["error"] in ("NODATA", "NXDOMAIN")


# ------------------------------------------------------------------------------------------------
# The fixtures' own plumbing


def test_tapbox_argv_always_points_dns_at_the_fake_upstream(tmp_path: Path) -> None:
    argv = build_tapbox_argv(
        tmp_path, ["-v"], ["true"], allow_file_text="api.example.test\n", allow=["192.0.2.10:80"]
    )
    assert argv[1:3] == ["-m", "tapbox"]
    assert argv[argv.index("--dns-upstream") + 1] == "198.51.100.53"
    f = argv[argv.index("-F") + 1]
    assert Path(f).read_text() == "api.example.test\n"
    assert Path(f).name == "allowed.txt"
    assert argv[argv.index("--allow") + 1] == "192.0.2.10:80"
    assert argv[-3:] == ["-v", "--", "true"]
    rootless = build_tapbox_argv(tmp_path, [], ["id", "-u"], user=65534)
    assert rootless[:4] == ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    with pytest.raises(ValueError):
        build_tapbox_argv(tmp_path, [], ["true"], allow_file_text="x", user=65534)


def test_parse_client_json() -> None:
    assert parse_client_json('noise\n{"a": 1}\n') == {"a": 1}
    assert parse_client_json("Traceback...\n") is None
    assert parse_client_json("") is None
    assert CLIENT.is_file()
