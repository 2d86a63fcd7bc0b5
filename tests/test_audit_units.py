"""Unit tests of the auditing pieces, without a sandbox: /proc parsing and attribution of this
test process's own sockets, audit-mode policy, the summary table, the event log, the learner,
the audit fan-out's ordering, and the CLI's new flags."""

from __future__ import annotations

import io
import json
import os
import socket
import time
from pathlib import Path

import pytest

from netstack.events import Flow
from tapbox.allowlist import Allowlist, parse_rule
from tapbox.attribution import (
    UNKNOWN_GONE,
    Scanner,
    SocketEntry,
    match_raw,
    match_socket,
    namespace_of,
    parse_net_table,
)
from tapbox.audit import Audit
from tapbox.auditpolicy import WOULD_DENY, AuditPolicy
from tapbox.cli import parse_args
from tapbox.eventlog import (
    EventLog,
    LogError,
    ending_category,
    flow_end_event,
    read_events,
)
from tapbox.flows import FlowRecord, ProcessInfo
from tapbox.learn import Learner
from tapbox.summary import Summary, human_bytes

# ------------------------------------------------------------------------------------------------
# Attribution

TCP_TABLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 6402000A:9C40 0A0200C0:0050 02 00000001:00000000 01:00000067 00000002  1000        0 4242 1 0
   1: 6402000A:9C41 0A0200C0:0050 06 00000000:00000000 03:00001657 00000000     0        0 0 3 0
"""
TCP6_TABLE = """\
  sl  local_address                         remote_address                        st tx_queue
   0: 0000000000000000FFFF00006402000A:9C42 0000000000000000FFFF00000A0200C0:01BB 01 0:0 0:0 0 0 0 7
   1: 00000000000000000000000000000000:9C43 B80D0120000000000000000010000000:0050 01 0:0 0:0 0 0 0 8
"""


@pytest.mark.skipif(socket.htonl(1) == 1, reason="the sample tables are little-endian")
def test_parse_net_table_and_match() -> None:
    v4 = parse_net_table(TCP_TABLE)
    assert v4 == [SocketEntry(0x9C40, "192.0.2.10", 80, 4242)]  # TIME-WAIT (inode 0) skipped
    flow = Flow("tcp", "10.0.2.100", 0x9C40, "192.0.2.10", 80)
    assert match_socket(v4, flow) == 4242
    assert match_socket(v4, Flow("tcp", "10.0.2.100", 0x9C40, "192.0.2.11", 80)) is None
    v6 = parse_net_table(TCP6_TABLE)
    assert [e.remote for e in v6] == ["192.0.2.10", "2001:db8::10"]  # v4-mapped unwrapped
    assert match_socket(v6, Flow("tcp", "10.0.2.100", 0x9C42, "192.0.2.10", 443)) == 7
    assert match_socket(v6, Flow("tcp", "x", 0x9C43, "2001:db8:0::10", 80)) == 8


def test_unconnected_udp_matches_by_local_port() -> None:
    entries = [SocketEntry(5000, "0.0.0.0", 0, 11), SocketEntry(5001, "192.0.2.10", 53, 12)]
    assert match_socket(entries, Flow("udp", "10.0.2.100", 5000, "192.0.2.10", 53)) == 11
    assert match_socket(entries, Flow("udp", "10.0.2.100", 5001, "192.0.2.10", 53)) == 12
    assert match_socket(entries, Flow("tcp", "10.0.2.100", 5000, "192.0.2.10", 53)) is None


def test_pings_match_ping_sockets_and_a_lone_raw_socket() -> None:
    ping = Flow("icmp", "10.0.2.100", 0x1234, "192.0.2.10", 0)
    assert match_socket([SocketEntry(0x1234, "0.0.0.0", 0, 21)], ping) == 21
    assert match_socket([SocketEntry(0x1235, "0.0.0.0", 0, 21)], ping) is None
    raw_v4, raw_v6 = SocketEntry(1, "0.0.0.0", 0, 31), SocketEntry(58, "::", 0, 32)
    assert match_raw([raw_v4, raw_v6], ping) == 31
    assert match_raw([raw_v4, raw_v6], Flow("icmp", "fd00::100", 7, "2001:db8::10", 0)) == 32
    other = SocketEntry(1, "0.0.0.0", 0, 33)
    assert match_raw([raw_v4, other], ping) is None  # two candidates: no guess
    assert match_raw([SocketEntry(6, "0.0.0.0", 0, 34)], ping) is None  # raw TCP


def _scanner() -> Scanner:
    netns = namespace_of(os.getpid())
    assert netns is not None
    return Scanner(os.getpid(), netns)


def test_scanner_finds_this_process_and_shared_sockets() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.sendto(b"x", ("127.0.0.1", 9))
    try:
        tcp_flow = Flow("tcp", "127.0.0.1", client.getsockname()[1], "127.0.0.1",
                        server.getsockname()[1])
        udp_flow = Flow("udp", "127.0.0.1", udp.getsockname()[1], "127.0.0.1", 9)
        gone = Flow("tcp", "127.0.0.1", 1, "127.0.0.1", 2)
        deadline = time.monotonic() + 5
        found = _scanner().attribute([(tcp_flow, deadline), (udp_flow, deadline),
                                      (gone, deadline)])
        assert found[0].pid == os.getpid() and found[1].pid == os.getpid()
        assert found[0].comm and found[0].cmdline and not found[0].shared_with
        assert found[2] == ProcessInfo(None, note=UNKNOWN_GONE)

        child = os.fork()
        if child == 0:  # holds the inherited socket until killed
            time.sleep(30)
            os._exit(0)
        try:
            shared = _scanner().attribute([(tcp_flow, time.monotonic() + 5)])[0]
        finally:
            os.kill(child, 9)
            os.waitpid(child, 0)
        assert shared.pid == min(os.getpid(), child)
        assert shared.shared_with == (max(os.getpid(), child),)
    finally:
        client.close()
        server.close()
        udp.close()


# ------------------------------------------------------------------------------------------------
# Audit-mode policy


def test_audit_policy_would_deny_but_names_and_guards() -> None:
    policy = AuditPolicy(Allowlist([parse_rule("api.example.test:443"),
                                    parse_rule("127.0.0.1:8080")]))
    assert policy.name_allowed("other.test") == [WOULD_DENY]
    assert [r.text for r in policy.name_allowed("api.example.test")] == ["api.example.test:443"]
    assert policy.learn("other.test", [WOULD_DENY], [("203.0.113.7", 60)], now=0) == []
    assert policy.learn("api.example.test", policy.name_allowed("api.example.test"),
                        [("192.0.2.10", 60)], now=0) == []
    # the guard applies to names without rules too
    assert policy.learn("evil.test", [WOULD_DENY], [("127.0.0.1", 60)], now=0) == ["127.0.0.1"]

    ok = policy.decide("192.0.2.10", 443, now=1)
    assert ok.allowed and not ok.would_deny and ok.name == "api.example.test"
    port = policy.decide("192.0.2.10", 80, now=1)
    assert not port.allowed and port.would_deny and port.name == "api.example.test"
    other = policy.decide("203.0.113.7", 80, now=1)
    assert other.would_deny and other.name == "other.test" and other.rule is None
    raw = policy.decide("198.51.100.1", 80, now=1)
    assert raw.would_deny and raw.name is None and raw.reason == "no rule"
    for address, port_number in (("127.0.0.1", 80), ("169.254.169.254", 80), ("::1", 80)):
        guarded = policy.decide(address, port_number, now=1)
        assert not guarded.allowed and not guarded.would_deny, address
    explicit = policy.decide("127.0.0.1", 8080, now=1)
    assert explicit.allowed and not explicit.would_deny
    # the shadow never leaks into the real admissions
    assert len(policy) == 1 and len(policy.shadow) == 1


# ------------------------------------------------------------------------------------------------
# Summary


def test_summary_table_fits_80_columns_and_puts_denials_first() -> None:
    summary = Summary()
    long_name = "a-very-long-subdomain-name.of-some-service.example.test"
    summary.add_flow(domain=long_name, dst="192.0.2.10", proto="tcp", dport=443,
                     verdict="allowed", rule="*.of-some-service.example.test:443",
                     reason="", bytes_out=1500, bytes_in=20 * 1024 * 1024)
    for port in (80, 81, 82):
        summary.add_flow(domain=None, dst="203.0.113.7", proto="tcp", dport=port,
                         verdict="denied", rule=None, reason="no rule")
    summary.add_dns(name="denied.test", verdict="denied")
    summary.add_dns(name="api.example.test", verdict="allowed")
    lines = summary.render()
    assert lines[0] == ("tapbox summary: 4 flows to 3 destinations, 3 denied, "
                        "1 name denied in DNS")
    assert all(len(line) <= 80 for line in lines), "\n".join(lines)
    assert lines[1].split() == ["VERDICT", "COUNT", "SENT", "RECV", "PORTS", "DESTINATION"]
    rows = [line.split() for line in lines[2:]]
    assert rows[0] == ["DENIED", "3", "0", "0", "tcp/80,+2", "203.0.113.7", "(no", "rule)"]
    assert rows[1] == ["DENIED", "1", "-", "-", "dns", "denied.test", "(no", "rule)"]
    assert rows[2][:5] == ["allowed", "1", "1.5K", "20M", "tcp/443"]
    assert rows[2][5] == long_name[:15] + "..." + long_name[-15:]  # the middle elided
    assert rows[3] == ["(rule", "*.of-some-service.example.test:443)"]  # on a line of its own
    assert summary.denied_anything
    assert not Summary().denied_anything


def test_summary_marks_audit_mode() -> None:
    summary = Summary()
    summary.add_flow(domain="denied.test", dst="203.0.113.7", proto="tcp", dport=80,
                     verdict="would-deny", rule=None, reason="no rule for dns denied.test")
    lines = summary.render()
    assert "1 would be denied" in lines[0]
    assert lines[2].startswith("WOULD DENY ") and lines[2].endswith("denied.test  (no rule)")
    assert lines[-1].startswith("audit mode: nothing was blocked")
    assert not summary.denied_anything


def test_summary_pings_have_no_port() -> None:
    summary = Summary()
    summary.add_flow(domain=None, dst="192.0.2.10", proto="icmp", dport=0, verdict="allowed",
                     rule="192.0.2.10", reason="rule 192.0.2.10")
    assert summary.render()[2].split() == ["allowed", "1", "0", "0", "icmp", "192.0.2.10"]


@pytest.mark.parametrize(("n", "text"), [(0, "0"), (999, "999"), (1000, "1.0K"),
                                         (1536, "1.5K"), (200 * 1024, "200K"),
                                         (5 * 1024**3, "5.0G")])
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text and len(text) <= 5


# ------------------------------------------------------------------------------------------------
# Event log


@pytest.mark.parametrize(("detail", "category"), [
    ("closed", "closed"), ("reset by sandbox", "reset"), ("reset by host", "reset"),
    ("refused upstream", "refused upstream"), ("connect timeout", "timeout"),
    ("idle timeout", "timeout"), ("timeout", "timeout"), ("denied", "denied"),
    ("unreachable upstream: Network is unreachable", "unreachable"),
    ("open when tapbox stopped", "open at exit"), ("given up by the sandbox", "abandoned"),
    ("host error: Broken pipe", "error"), (None, None)])
def test_ending_categories(detail: str | None, category: str | None) -> None:
    assert ending_category(detail) == category


def _record(**kw: object) -> FlowRecord:
    fields: dict[str, object] = dict(flow=Flow("tcp", "10.0.2.100", 40000, "192.0.2.10", 80),
                                     allowed=True, reason="rule 192.0.2.10", rule="192.0.2.10",
                                     name=None, started=1000.0)
    fields.update(kw)
    return FlowRecord(**fields)  # type: ignore[arg-type]


def test_event_log_lines_and_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    log = EventLog(str(path))
    record = _record(ended=1002.5, ending="reset by host", bytes_out=10, bytes_in=20,
                     process=ProcessInfo(42, "curl", ("curl", "-s")))
    log.write({"event": "start", "time": 1.0})
    log.write(flow_end_event(record))
    log.close()
    with open(path, "a") as f:
        f.write('{"v": 1, "event": "dns", "na')  # tapbox killed mid-line
    events = list(read_events(str(path)))
    assert [e["event"] for e in events] == ["start", "flow_end"]
    end = events[1]
    assert end["v"] == 1 and end["duration"] == 2.5 and end["ending"] == "reset"
    assert end["ending_detail"] == "reset by host"
    assert end["process"] == {"pid": 42, "comm": "curl", "cmdline": ["curl", "-s"]}
    unknown = flow_end_event(_record(process=ProcessInfo(None, note="gone")))
    assert unknown["process"] == "unknown" and unknown["process_note"] == "gone"

    newer = tmp_path / "newer.jsonl"
    newer.write_text(json.dumps({"v": 99, "event": "start"}) + "\n")
    with pytest.raises(LogError, match="newer"):
        list(read_events(str(newer)))
    garbage = tmp_path / "garbage.txt"
    garbage.write_text("hello\n")
    with pytest.raises(LogError, match="not a tapbox log"):
        list(read_events(str(garbage)))


# ------------------------------------------------------------------------------------------------
# The audit fan-out


def test_audit_holds_a_flow_until_attributed(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    stream = io.StringIO()
    audit = Audit(stream=stream, log=EventLog(str(path)), summary=Summary())
    record = _record(allowed=False, rule=None, reason="no rule", attributing=True)
    audit.flow_started(record)
    record.ended, record.ending = 1000.1, "denied"
    audit.flow_ended(record)
    assert path.read_text() == "" and stream.getvalue() == ""
    record.process = ProcessInfo(7, "sh", ("sh",))
    record.attributing = False
    audit.flow_attributed(record)
    audit.run_finished(0)
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["event"] for e in events] == ["flow_start", "flow_end", "exit"]
    assert events[0]["process"]["pid"] == 7 and events[0]["id"] == 1
    assert stream.getvalue() == "tapbox: denied tcp 192.0.2.10:80\n"
    assert audit.summary_lines()[0].startswith("tapbox summary: 1 flow")


def test_audit_releases_held_flows_at_exit_as_unknown(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    audit = Audit(stream=io.StringIO(), log=EventLog(str(path)), summary_mode="never")
    audit.flow_started(_record(attributing=True))
    audit.run_finished(3)
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["event"] for e in events] == ["flow_start", "exit"]
    assert events[0]["process"] == "unknown" and events[1]["status"] == 3


# ------------------------------------------------------------------------------------------------
# Learner


def test_learner_rules_sorted_and_merged(tmp_path: Path) -> None:
    path = tmp_path / "a.allow"
    path.write_text("*.example.test:443\n")
    learner = Learner(str(path), ["make"])
    for name, dst, port in (("b.example.test", "192.0.2.20", 443),  # already admitted
                            ("b.example.test", "192.0.2.20", 80),
                            ("a.other.test", "198.51.100.20", 80),
                            (None, "2001:db8::10", 443),
                            (None, "192.0.2.10", 8080),
                            (None, "192.0.2.9", 8080)):
        learner.flow(_record(flow=Flow("tcp", "10.0.2.100", 1, dst, port), name=name))
    learner.flow(_record(allowed=False, flow=Flow("tcp", "10.0.2.100", 1, "10.0.2.2", 80)))
    learner.flow(_record(flow=Flow("icmp", "10.0.2.100", 77, "198.51.100.7", 0)))
    learner.flow(_record(flow=Flow("tcp", "10.0.2.100", 1, "198.51.100.7", 22)))  # pinged too
    learner.dns("b.example.test", "allowed")
    learner.dns("c.other.test", "would-deny")  # looked up only: never a rule
    learner.dns("d.example.test", "denied")
    add, bad = learner.new_rules()
    assert bad == []
    assert [u.text for u in add] == ["b.example.test:80", "a.other.test:80",
                                     "192.0.2.9:8080", "192.0.2.10:8080",
                                     "198.51.100.7", "[2001:db8::10]:443"]
    assert add[4].comment.startswith("pinged")
    report = learner.write(0)
    assert report == [f"learn: added 6 rules to {path}: " + ", ".join(u.text for u in add)]
    text = path.read_text()
    assert text.startswith("*.example.test:443\n\n# added by tapbox --learn")
    assert "#   c.other.test" in text and "d.example.test" not in text
    from tapbox.allowlist import load_file
    assert len(load_file(str(path))) == 7


# ------------------------------------------------------------------------------------------------
# CLI


@pytest.mark.parametrize("argv", [["-n", "--log", "x", "--", "true"],
                                  ["-n", "--audit", "--", "true"],
                                  ["--summary", "-q", "--", "true"],
                                  ["--pcap-limit", "0", "--", "true"]])
def test_cli_rejects(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2


def test_cli_accepts() -> None:
    args = parse_args(["--log", "r.jsonl", "--learn", "p.allow", "--pcap", "r.pcap",
                       "--pcap-limit", "1M", "-q", "--", "log", "show"])
    assert (args.log, args.learn, args.pcap, args.pcap_limit, args.quiet) == \
        ("r.jsonl", "p.allow", "r.pcap", 1_000_000, True)
    assert args.command == ["log", "show"]
