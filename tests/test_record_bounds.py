"""What tapbox records about the sandbox is bounded (issue 8, item 4).

With an empty allowlist and no privileges, the sandbox can denial-flood tapbox: datagrams to
ever-new destinations, DNS questions for ever-new names, a loop on one denied destination. The
summary, the "denied once" memory and stderr must stay bounded, and the --log file must neither
grow per datagram nor without limit.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from conftest import RunTapbox
from fakenet import FakeNet

from netstack.events import Flow
from tapbox.audit import Audit
from tapbox.cli import parse_args
from tapbox.eventlog import EventLog
from tapbox.flows import FlowRecord
from tapbox.summary import Summary

SHORT = 30.0
PY = sys.executable


def describe(proc: object) -> str:
    return (f"exit {proc.returncode}\nstdout:\n{proc.stdout}\n"  # type: ignore[attr-defined]
            f"stderr:\n{proc.stderr}")  # type: ignore[attr-defined]


def _denied(dst: str, port: int = 5353) -> FlowRecord:
    return FlowRecord(Flow("udp", "10.0.2.100", 40000, dst, port), False, "no rule", None,
                      None, 0.0, ended=0.0, ending="denied")


def _address(i: int) -> str:
    return f"198.{18 + i // 65536}.{i // 256 % 256}.{i % 256}"


def test_the_summary_keeps_a_bounded_number_of_rows() -> None:
    summary = Summary()
    for i in range(5000):
        summary.add_flow(domain=None, dst=_address(i), proto="udp", dport=5353,
                         verdict="denied", rule=None, reason="no rule")
        summary.add_dns(name=f"n{i}.denied.test", verdict="denied")
    for port in range(1, 3000):  # ever-new ports of one destination
        summary.add_flow(domain=None, dst=_address(0), proto="tcp", dport=port,
                         verdict="denied", rule=None, reason="no rule")
    assert len(summary.rows) <= 1000
    assert all(len(row.ports) <= 32 for row in summary.rows.values())
    lines = summary.render()
    assert lines[0].startswith("tapbox summary: 7999 flows to 10000 destinations, "
                               "7999 denied"), lines[0]
    assert any("+9000 more destinations" in line for line in lines), "\n".join(lines)
    assert all(len(line) <= 80 for line in lines), "\n".join(lines)


def test_denial_lines_are_bounded_and_rate_limited() -> None:
    stream = io.StringIO()
    audit = Audit(stream=stream)
    for i in range(10_000):
        record = _denied(_address(i))
        audit.flow_started(record)
        audit.flow_ended(record)
    audit.print_summary()
    lines = stream.getvalue().splitlines()
    denials = [line for line in lines if line.startswith("tapbox: denied udp")]
    assert 1 <= len(denials) <= 100, len(denials)
    told = [line for line in lines if "not shown" in line]
    assert told and str(10_000 - len(denials)) in told[-1], told
    assert len(audit._denied_seen) <= 10_000 // 2


def test_the_event_log_stops_at_its_limit_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    log = EventLog(str(path), 10_000)
    for i in range(1000):
        log.write({"event": "message", "time": 1.0, "text": f"line {i}"})
    log.write({"event": "exit", "time": 2.0, "status": 0})
    log.close()
    data = path.read_bytes()
    assert len(data) <= 10_000
    events = [json.loads(line) for line in data.splitlines()]
    assert events[-1]["event"] == "truncated" and events[-1]["limit"] == 10_000
    assert [e["event"] for e in events[:-1]] == ["message"] * (len(events) - 1)
    assert log.failed and "--log-limit" in log.failed


def test_cli_log_limit() -> None:
    limit = parse_args(["--log-limit", "1M", "--", "true"]).options.record.log_limit
    assert limit == 1_000_000
    assert parse_args(["--", "true"]).options.record.log_limit == 100_000_000
    for bad in ("0", "100", "lots"):
        with pytest.raises(SystemExit):
            parse_args(["--log-limit", bad, "--", "true"])


LOOP = (
    "import socket, time\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "for i in range(200):\n"
    "    s.sendto(b'x' * 10, ('203.0.113.7', 5353))\n"
    "    time.sleep(0.002)\n"
    "print('sent', flush=True)\n"
)


def test_a_datagram_loop_to_one_denied_destination_is_one_flow(
        run_tapbox: RunTapbox, fakenet: FakeNet, tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    proc = run_tapbox("--log", str(log), cmd=[PY, "-c", LOOP], allow_file_text="192.0.2.10\n",
                      timeout=SHORT)
    assert proc.returncode == 0 and "sent" in proc.stdout, describe(proc)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    starts = [e for e in events if e["event"] == "flow_start" and e["dst"] == "203.0.113.7"]
    ends = [e for e in events if e["event"] == "flow_end" and e["dst"] == "203.0.113.7"]
    assert len(starts) == 1 and len(ends) == 1, [e for e in events if "dst" in e][:5]
    assert ends[0]["verdict"] == "denied" and ends[0]["ending"] == "denied"
    assert ends[0]["datagrams_out"] == 200 and ends[0]["bytes_out"] == 0, ends[0]
    assert proc.stderr.count("denied udp 203.0.113.7:5353") == 1, describe(proc)
    assert fakenet.datagrams("203.0.113.7") == []


SPRAY = (
    "import socket\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "for port in range(1000, 1400):\n"
    "    s.sendto(b'x', ('203.0.113.7', port))\n"
    "print('sent', flush=True)\n"
)


def test_log_limit_truncates_the_log_with_a_last_event(
        run_tapbox: RunTapbox, fakenet: FakeNet, tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    proc = run_tapbox("--log", str(log), "--log-limit", "20K", "-q", cmd=[PY, "-c", SPRAY],
                      allow_file_text="192.0.2.10\n", timeout=SHORT)
    assert proc.returncode == 0 and "sent" in proc.stdout, describe(proc)
    data = log.read_bytes()
    assert len(data) <= 20_000
    events = [json.loads(line) for line in data.splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "truncated", events[-1]
    assert "size limit" in proc.stderr, describe(proc)


def test_large_counts_keep_the_columns() -> None:
    summary = Summary()
    for _ in range(123_456):
        summary.add_flow(domain=None, dst="203.0.113.7", proto="udp", dport=53,
                         verdict="denied", rule=None, reason="no rule")
    summary.add_flow(domain=None, dst="192.0.2.10", proto="udp", dport=53, verdict="allowed",
                     rule=None, reason="")
    lines = summary.render()
    assert lines[2].split()[:2] == ["DENIED", "123K"], lines
    assert lines[2].index("203.0.113.7") == lines[3].index("192.0.2.10") \
        == lines[1].index("DESTINATION"), "\n".join(lines)
