"""Smaller things found by using tapbox (issue 8, item 7): flow labels for names sharing an
address, the summary's layout, reverse lookups of the sandbox's own addresses, DNS
exfiltration through an exactly admitted name, and a few messages."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import trio
from conftest import CLIENT, REPO_ROOT, RunTapbox, tapbox_env
from fakenet import FakeNet

from tapbox.allowlist import Allowlist, AllowlistError, parse_rule
from tapbox.net.dns import DnsEvent, DnsForwarder
from tapbox.policy import Policy
from tapbox.summary import Summary

SHORT = 30.0
PY = sys.executable


def client(*args: str) -> str:
    return " ".join([PY, str(CLIENT), *args])


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------------
# Labels: the name whose answer gave the address most recently


def test_policy_labels_with_the_most_recent_name() -> None:
    policy = Policy(Allowlist([parse_rule("good.example.test"), parse_rule("twin.example.test"),
                               parse_rule("*.wild.test")]))
    for name in ("good.example.test", "twin.example.test"):
        policy.learn(name, policy.name_allowed(name), [("192.0.2.10", 60)], now=0)
    assert policy.decide("192.0.2.10", 80, now=1).name == "twin.example.test"
    policy.learn("good.example.test", policy.name_allowed("good.example.test"),
                 [("192.0.2.10", 60)], now=2)
    assert policy.decide("192.0.2.10", 80, now=3).name == "good.example.test"
    # two names under one wildcard rule: the later one, and the admission lasts the longest
    policy.learn("a.wild.test", policy.name_allowed("a.wild.test"), [("192.0.2.20", 3600)], 0)
    policy.learn("b.wild.test", policy.name_allowed("b.wild.test"), [("192.0.2.20", 60)], 10)
    assert policy.decide("192.0.2.20", 80, now=11).name == "b.wild.test"
    assert policy.decide("192.0.2.20", 80, now=3000).allowed


def test_a_flow_is_labelled_with_the_name_just_looked_up(
        run_tapbox: RunTapbox, fakenet: FakeNet, tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    script = "set -e; " + "; ".join([client("resolve", "api.example.test", "--type", "A"),
                                     client("hello", "twin.example.test", "80"),
                                     client("hello", "api.example.test", "80")])
    proc = run_tapbox("--log", str(log), "--summary", cmd=["sh", "-c", script],
                      allow_file_text="api.example.test\ntwin.example.test\n", timeout=SHORT)
    assert proc.returncode == 0, describe(proc)
    ends = [e for e in read_log(log) if e["event"] == "flow_end"]
    assert [e["domain"] for e in ends] == ["twin.example.test", "api.example.test"], ends
    assert "twin.example.test" in proc.stderr, describe(proc)


# ------------------------------------------------------------------------------------------------
# The summary's layout


def test_an_allowed_and_a_denied_flow_to_one_name_are_two_rows() -> None:
    summary = Summary()
    summary.add_flow(domain="api.example.test", dst="192.0.2.10", proto="tcp", dport=443,
                     verdict="allowed", rule="api.example.test:443", reason="")
    summary.add_flow(domain="api.example.test", dst="192.0.2.10", proto="tcp", dport=8080,
                     verdict="denied", rule=None,
                     reason="port 8080 not admitted (dns api.example.test via "
                            "api.example.test:443)")
    lines = summary.render()
    rows = [line.split() for line in lines[2:]]
    assert rows == [["DENIED", "1", "0", "0", "tcp/8080", "api.example.test"],
                    ["(port", "8080", "not", "admitted)"],
                    ["allowed", "1", "0", "0", "tcp/443", "api.example.test"],
                    ["(rule", "api.example.test:443)"]], "\n".join(lines)


def test_long_names_keep_both_ends_and_verdicts_are_whole() -> None:
    summary = Summary()
    name = "build-artifacts-eu-west-1-0123456789.storage.service.example.test"
    summary.add_flow(domain=name, dst="192.0.2.10", proto="tcp", dport=8443,
                     verdict="would-deny", rule=None, reason="port 8443 not admitted (...)")
    summary.add_flow(domain="a.example.test", dst="192.0.2.11", proto="tcp", dport=443,
                     verdict="allowed", rule="*.example.test:443", reason="")
    lines = summary.render()
    assert all(len(line) <= 80 for line in lines), "\n".join(lines)
    text = "\n".join(lines)
    assert lines[2].startswith("WOULD DENY ") and lines[4].startswith("allowed "), text
    assert "build-artifacts" in lines[2] and lines[2].endswith("example.test"), text
    assert "(port 8443 not admitted)" in text and "(rule *.example.test:443)" in text, text


# ------------------------------------------------------------------------------------------------
# Reverse lookups of the sandbox's own addresses


def test_reverse_lookup_of_the_gateway_is_answered_locally(
        run_tapbox: RunTapbox, fakenet: FakeNet, tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    script = client("resolve-raw", "10.0.2.3", "2.2.0.10.in-addr.arpa", "--type", "PTR")
    proc = run_tapbox("--log", str(log), cmd=["sh", "-c", script],
                      allow_file_text="api.example.test\n", timeout=SHORT)
    assert json.loads(proc.stdout)["rcode"] == "NXDOMAIN", describe(proc)
    assert "denied" not in proc.stderr and "summary" not in proc.stderr, describe(proc)
    asked = [e for e in read_log(log) if e["event"] == "dns"]
    assert [(e["name"], e["verdict"]) for e in asked] == [("2.2.0.10.in-addr.arpa", "local")]
    assert fakenet.dns_queries(qname="2.2.0.10.in-addr.arpa.") == []


# ------------------------------------------------------------------------------------------------
# DNS: only lowercase names and a few query types go upstream


class _RawUpstream:
    """A UDP resolver on 127.0.0.1 that records each query as it came, and answers an A."""

    def __init__(self) -> None:
        self.queries: list[dns.message.Message] = []
        self.sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    async def start(self) -> int:
        await self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    async def serve(self) -> None:
        while True:
            data, peer = await self.sock.recvfrom(65535)
            query = dns.message.from_wire(data)
            self.queries.append(query)
            reply = dns.message.make_response(query)
            reply.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A",
                                                    "192.0.2.10"))
            await self.sock.sendto(reply.to_wire(), peer)


async def test_names_go_upstream_lowercased_with_fixed_flags(nursery: trio.Nursery) -> None:
    upstream = _RawUpstream()
    port = await upstream.start()
    nursery.start_soon(upstream.serve)
    policy = Policy(Allowlist([parse_rule("api.example.test")]))
    events: list[DnsEvent] = []
    forwarder = DnsForwarder(policy, [("127.0.0.1", port)], on_event=events.append)
    query = dns.message.make_query("ApI.eXaMpLe.TeSt", "A")
    query.flags |= dns.flags.CD
    wire = await forwarder.answer(query.to_wire())
    assert wire is not None
    reply = dns.message.from_wire(wire)
    assert reply.rcode() == dns.rcode.NOERROR
    sent = upstream.queries[0]
    assert sent.question[0].name.to_text() == "api.example.test."
    assert not sent.flags & dns.flags.CD and sent.flags & dns.flags.RD
    # the reply speaks the client's case, as resolvers answer a 0x20-randomised query
    assert reply.question[0].name.to_text() == "ApI.eXaMpLe.TeSt."
    assert [rd.address for rrset in reply.answer for rd in rrset] == ["192.0.2.10"]
    assert policy.decide("192.0.2.10", 80, now=trio.current_time()).name == "api.example.test"


async def test_local_reverse_zones_never_go_upstream() -> None:
    forwarder = DnsForwarder(Policy(Allowlist([parse_rule("*.arpa")])), [("127.0.0.1", 9)])
    for name, rdtype, rcode in (
            ("100.2.0.10.in-addr.arpa", "PTR", dns.rcode.NXDOMAIN),
            ("0.0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa", "PTR",
             dns.rcode.NXDOMAIN),
            ("2.0.10.in-addr.arpa", "SOA", dns.rcode.NOERROR)):
        wire = await forwarder.answer(dns.message.make_query(name, rdtype).to_wire())
        assert wire is not None
        reply = dns.message.from_wire(wire)
        assert reply.rcode() == rcode and reply.flags & dns.flags.AA, (name, reply)
    assert reply.answer and reply.answer[0].rdtype == dns.rdatatype.SOA


# ------------------------------------------------------------------------------------------------
# Messages


@pytest.mark.parametrize(("rule", "suggestion"), [
    ("http://example.com/", "'example.com'"),
    ("https://api.example.com:8443/v1?x=1", "'api.example.com:8443'"),
    ("https://[2001:db8::1]/", "'[2001:db8::1]'"),
])
def test_a_url_in_an_allowlist_is_explained(rule: str, suggestion: str) -> None:
    with pytest.raises(AllowlistError) as exc:
        parse_rule(rule)
    assert "rules are names or addresses" in str(exc.value), exc.value
    assert f"write {suggestion}" in str(exc.value), exc.value


def tapbox(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "tapbox", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=tapbox_env(), timeout=SHORT)


def test_log_subcommand_usage() -> None:
    bare = tapbox("log")
    assert bare.returncode == 2, describe(bare)
    assert bare.stderr.startswith("usage: tapbox log show FILE [--denied]"), describe(bare)
    assert "no action given" in bare.stderr, describe(bare)
    show = tapbox("log", "show")
    assert show.returncode == 2, describe(show)
    assert show.stderr.splitlines() == [
        "usage: tapbox log show FILE [--denied] [--domain NAME] [--flows]",
        "tapbox log show: error: the following arguments are required: FILE"], describe(show)


def test_quiet_silences_the_empty_allowlist_note(run_tapbox: RunTapbox) -> None:
    proc = run_tapbox("-q", cmd=["true"], timeout=SHORT)
    assert proc.returncode == 0 and proc.stderr == "", describe(proc)
    loud = run_tapbox(cmd=["true"], timeout=SHORT)
    assert "the allowlist is empty" in loud.stderr, describe(loud)


def test_verbose_names_drop_reasons_in_words(run_tapbox: RunTapbox, fakenet: FakeNet,
                                             tmp_path: Path) -> None:
    """IPv6 duplicate address detection probes come from the unspecified address: dropped
    (`icmpv6-foreign-source`), and -v says so in words; the log keeps the internal name."""
    log = tmp_path / "run.jsonl"
    proc = run_tapbox("-v", "--ipv6", "on", "--log", str(log), cmd=["sleep", "1"],
                      allow_file_text="192.0.2.10\n", timeout=SHORT)
    assert proc.returncode == 0, describe(proc)
    dropped = read_log(log)[-1]["dropped"]
    assert dropped.get("icmpv6-foreign-source"), dropped
    assert "frames dropped" in proc.stderr, describe(proc)
    assert "ICMPv6 messages from an address that is not the sandbox's" in proc.stderr
    assert not any(reason in proc.stderr for reason in dropped), describe(proc)
