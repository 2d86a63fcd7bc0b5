"""Auditing end to end: the event log, attribution, audit mode, the summary, `tapbox log show`.

Every test runs the real CLI in the fake internet (conftest.py, fakenet.py). The sandboxed
command is usually a shell script running tests/client.py several times, one network action
each, so one run produces a known set of DNS queries and flows; the test then reads the --log
file and checks each event (and, where it matters, what the fake servers saw).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import fakenet as fn
import pytest
from conftest import CLIENT, REPO_ROOT, RunTapbox, SpawnTapbox, read_line, tapbox_env
from fakenet import FakeNet
from test_e2e import NOBODY, rootless_problems

SHORT = 30.0
PY = sys.executable

RESET_SCRIPT = (
    "import socket, struct, time\n"
    "s = socket.create_connection(('203.0.113.10', 80), timeout=5)\n"
    "s.sendall(b'ECHO\\nabc')\n"
    "assert s.recv(3) == b'abc'\n"
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))\n"
    "s.close()\n"
    "print('reset-sent', flush=True)\n"
)


def client(*args: str) -> str:
    """A shell word list running tests/client.py with `args` (paths quoted for sh)."""
    return " ".join([PY, str(CLIENT), *args])


def read_log(path: Path) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert all(e.get("v") == 1 for e in events), events
    return events


def flows(events: list[dict[str, Any]], kind: str = "flow_end", **match: Any) -> list[dict]:
    return [e for e in events if e["event"] == kind
            and all(e.get(k) == v for k, v in match.items())]


def dns(events: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == "dns"
            and all(e.get(k) == v for k, v in match.items())]


def one(items: list[dict[str, Any]], what: str, events: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(items) == 1, f"expected one {what}, got {items}\nlog:\n" + "\n".join(
        json.dumps(e) for e in events)
    return items[0]


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


# ------------------------------------------------------------------------------------------------
# The event log


SCRIPTED_RULES = "api.example.test\n192.0.2.10:5353\n192.0.2.10:9\n203.0.113.10:80\n"


def scripted_run(run_tapbox: RunTapbox, log: Path, *extra: str) -> subprocess.CompletedProcess:
    script = "; ".join([
        client("hello", "api.example.test", "80"),
        client("resolve", "denied.test"),
        client("connect", "203.0.113.7", "80"),
        client("udp", "192.0.2.10", "5353"),
        client("connect", "192.0.2.10", "9"),
        f"{PY} -c \"$RESET\"",
        "exit 0",
    ])
    return run_tapbox("--log", str(log), *extra, cmd=["sh", "-c", script],
                      allow_file_text=SCRIPTED_RULES, env={"RESET": RESET_SCRIPT},
                      timeout=SHORT)


def test_log_holds_every_dns_query_and_flow(run_tapbox: RunTapbox, fakenet: FakeNet,
                                            tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    proc = scripted_run(run_tapbox, log)
    assert proc.returncode == 0, describe(proc)
    assert "reset-sent" in proc.stdout, describe(proc)
    events = read_log(log)
    assert events[0]["event"] == "start" and events[-1]["event"] == "exit", events
    assert events[0]["mode"] == "enforce" and events[0]["command"][:2] == ["sh", "-c"]
    assert events[-1]["status"] == 0
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert results[2]["result"] == "refused", results  # the denied connect...
    assert results[2]["seconds"] < 1.0, results  # ...still fails at once with attribution on

    # DNS: the allowed name with its answer and rule; the denied name with no rule
    asked = one(dns(events, name="api.example.test", qtype="A"), "A query", events)
    assert asked["verdict"] == "allowed" and asked["rule"] == "api.example.test"
    assert asked["answers"] == ["192.0.2.10"]
    denied_q = dns(events, name="denied.test")
    assert denied_q and all(q["verdict"] == "denied" and q["rule"] == "no rule"
                            for q in denied_q), denied_q

    # a flow to a name: domain, rule, bytes both ways, closed
    hello = one(flows(events, dst="192.0.2.10", dport=80), "hello flow", events)
    assert hello["proto"] == "tcp" and hello["domain"] == "api.example.test"
    assert hello["verdict"] == "allowed" and hello["rule"] == "api.example.test"
    assert hello["bytes_out"] == len(b"HELLO\n")
    assert hello["bytes_in"] == len(b"hello from 192.0.2.10:80\n")
    assert hello["ending"] == "closed" and hello["end"] >= hello["start"]

    # a denied IP: no rule, ended at once, and never reached its server
    denied = one(flows(events, dst="203.0.113.7", dport=80), "denied flow", events)
    assert denied["verdict"] == "denied" and denied["rule"] == "no rule"
    assert denied["domain"] is None and denied["ending"] == "denied"
    assert denied["reason"] == "no rule"
    assert fakenet.connections("203.0.113.7", 80) == []

    # UDP, admitted by an IP rule
    udp = one(flows(events, proto="udp", dst="192.0.2.10", dport=5353), "udp flow", events)
    assert udp["verdict"] == "allowed" and udp["rule"] == "192.0.2.10:5353"
    assert udp["bytes_out"] == udp["bytes_in"] > 0

    # an allowed IP and port where nothing listens
    refused = one(flows(events, dst="192.0.2.10", dport=9), "refused flow", events)
    assert refused["verdict"] == "allowed" and refused["ending"] == "refused upstream"

    # a connection the sandbox reset
    reset = one(flows(events, dst="203.0.113.10", dport=80), "reset flow", events)
    assert reset["ending"] == "reset", reset
    assert reset["bytes_out"] == len(b"ECHO\nabc") and reset["bytes_in"] == 3

    # every flow started before it ended, under the same id, and each id once
    starts = {e["id"]: e for e in flows(events, "flow_start")}
    ends = {e["id"]: e for e in flows(events)}
    assert set(starts) == set(ends) and len(ends) == len(flows(events))
    order = {id(e): i for i, e in enumerate(events)}
    for key, end in ends.items():
        assert order[id(starts[key])] < order[id(end)]
        assert starts[key]["dst"] == end["dst"] and starts[key]["verdict"] == end["verdict"]


def test_flows_name_the_process_that_opened_them(run_tapbox: RunTapbox, fakenet: FakeNet,
                                                 tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    proc = scripted_run(run_tapbox, log)
    assert proc.returncode == 0, describe(proc)
    events = read_log(log)
    expect = {("tcp", "192.0.2.10", 80): ["hello", "api.example.test", "80"],
              ("tcp", "203.0.113.7", 80): ["connect", "203.0.113.7", "80"],  # refused at once
              ("udp", "192.0.2.10", 5353): ["udp", "192.0.2.10", "5353"],
              ("tcp", "192.0.2.10", 9): ["connect", "192.0.2.10", "9"]}
    for (proto, dst, port), argv in expect.items():
        flow = one(flows(events, proto=proto, dst=dst, dport=port), f"{dst}:{port}", events)
        process = flow["process"]
        assert isinstance(process, dict), flow
        assert process["comm"].startswith("python"), flow
        assert process["cmdline"][-len(argv):] == argv, flow
        assert process["cmdline"][1] == str(CLIENT), flow
    reset = one(flows(events, dst="203.0.113.10"), "reset flow", events)
    assert reset["process"]["cmdline"][:2] == [PY, "-c"], reset


def test_two_concurrent_processes_are_told_apart(run_tapbox: RunTapbox, fakenet: FakeNet,
                                                tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    # Each client announces its pid, then execs (same pid) and connects; both at once.
    script = (
        f"sh -c 'echo A $$; exec {client('hello', '192.0.2.10', '80')}' & "
        f"sh -c 'echo B $$; exec {client('hello', '203.0.113.10', '80')}' & "
        "wait"
    )
    proc = run_tapbox("--log", str(log), cmd=["sh", "-c", script],
                      allow_file_text="192.0.2.10:80\n203.0.113.10:80\n", timeout=SHORT)
    assert proc.returncode == 0, describe(proc)
    pids = {line.split()[0]: int(line.split()[1]) for line in proc.stdout.splitlines()
            if line[:2] in ("A ", "B ")}
    assert set(pids) == {"A", "B"} and pids["A"] != pids["B"], proc.stdout
    events = read_log(log)
    for tag, dst in (("A", "192.0.2.10"), ("B", "203.0.113.10")):
        flow = one(flows(events, dst=dst, dport=80), dst, events)
        process = flow["process"]
        assert isinstance(process, dict), flow
        assert process["pid"] == pids[tag], (tag, flow, pids)
        assert process["comm"].startswith("python"), flow
        assert process["cmdline"][1:] == [str(CLIENT), "hello", dst, "80"], flow
    assert len(fakenet.connections(port=80)) == 2


def test_attribution_works_rootless(run_tapbox: RunTapbox, fakenet: FakeNet) -> None:
    """As an unprivileged user, /proc still shows tapbox its own sandbox's processes."""
    if fn.netns_state().mode != "root":
        pytest.skip("not root: the whole session already runs rootless")
    problems = rootless_problems()
    if problems:
        pytest.fail("cannot run rootless here:\n  - " + "\n  - ".join(problems), pytrace=False)
    shared = Path(tempfile.mkdtemp(prefix="tapbox-rootless-"))  # pytest's tmp is root-only
    shared.chmod(0o777)
    log = shared / "run.jsonl"
    try:
        proc = run_tapbox("--log", str(log), user=NOBODY, allow=["api.example.test"],
                          cmd=["sh", "-c", f"{client('hello', 'api.example.test', '80')}; "
                                           f"{client('connect', '203.0.113.7', '80')}"],
                          timeout=SHORT)
        events = read_log(log) if log.exists() else []
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    assert proc.returncode == 1, describe(proc)
    for dst, argv in (("192.0.2.10", ["hello", "api.example.test", "80"]),
                      ("203.0.113.7", ["connect", "203.0.113.7", "80"])):
        flow = one(flows(events, dst=dst), dst, events)
        assert isinstance(flow["process"], dict), flow
        assert flow["process"]["cmdline"][2:] == argv, flow


def test_a_ping_names_its_process(run_tapbox: RunTapbox, fakenet: FakeNet,
                                 tmp_path: Path) -> None:
    """client.py ping uses a raw socket (the sandbox's root has CAP_NET_RAW there): with one
    such socket in the sandbox, the ping is attributed to it."""
    log = tmp_path / "run.jsonl"
    proc = run_tapbox("--log", str(log), cmd=["sh", "-c", client("ping", "203.0.113.7")],
                      allow_file_text="192.0.2.10\n", timeout=SHORT)
    assert proc.returncode == 1, describe(proc)  # denied: unreachable
    events = read_log(log)
    ping = one(flows(events, proto="icmp", dst="203.0.113.7"), "ping", events)
    assert ping["verdict"] == "denied" and ping["dport"] == 0
    assert isinstance(ping["process"], dict), ping
    assert ping["process"]["cmdline"][1:] == [str(CLIENT), "ping", "203.0.113.7"], ping


def test_unknown_process_is_said_not_guessed(run_tapbox: RunTapbox, fakenet: FakeNet,
                                             tmp_path: Path) -> None:
    """A UDP datagram from a process that exits at once: its socket is gone before tapbox
    looks, so the process is "unknown" (with a note), never some other process."""
    log = tmp_path / "run.jsonl"
    fire = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            "s.sendto(b'x', ('192.0.2.10', 5353)); s.close()")
    # A companion process keeps the namespace busy so the run does not end first.
    proc = run_tapbox("--log", str(log),
                      cmd=["sh", "-c", f"{PY} -c \"{fire}\"; sleep 1"],
                      allow_file_text="192.0.2.10:5353\n", timeout=SHORT)
    assert proc.returncode == 0, describe(proc)
    events = read_log(log)
    flow = one(flows(events, proto="udp", dst="192.0.2.10"), "udp flow", events)
    if flow["process"] != "unknown":  # the scan won the race: then it must be right
        assert flow["process"]["cmdline"][:2] == [PY, "-c"], flow
    else:
        assert flow["process_note"], flow


def test_log_survives_the_command_killed_by_a_signal(run_tapbox: RunTapbox,
                                                     tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    script = f"{client('connect', '203.0.113.7', '80')}; kill -KILL $$"
    proc = run_tapbox("--log", str(log), cmd=["sh", "-c", script],
                      allow_file_text="api.example.test\n", timeout=SHORT)
    assert proc.returncode == 137, describe(proc)
    events = read_log(log)
    assert events[-1]["event"] == "exit" and events[-1]["status"] == 137
    one(flows(events, dst="203.0.113.7", verdict="denied"), "denied flow", events)
    # the summary is printed at exit, since something was denied
    assert "tapbox summary:" in proc.stderr and "203.0.113.7" in proc.stderr, describe(proc)
    rows = table_rows(proc.stderr)
    assert rows[("203.0.113.7", "DENIED")][-2:] == ["(no", "rule)"], describe(proc)


def test_log_is_written_as_events_happen(spawn_tapbox: SpawnTapbox, fakenet: FakeNet,
                                        tmp_path: Path) -> None:
    """While the command still runs, the log already holds what happened; killing tapbox
    itself (SIGKILL: no clean-up at all) loses none of it."""
    log = tmp_path / "run.jsonl"
    script = (f"{client('connect', '203.0.113.7', '80')}; "
              f"{client('hello', 'api.example.test', '80')}; echo ready; exec sleep 60")
    proc = spawn_tapbox("--log", str(log), cmd=["sh", "-c", script],
                        allow_file_text="api.example.test\n")
    lines = []
    while True:
        line = read_line(proc.stdout, SHORT)
        assert line is not None, "the command never got ready"
        lines.append(line)
        if line.strip() == "ready":
            break
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        events = read_log(log)
        if flows(events, dst="192.0.2.10"):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    events = read_log(log)
    assert events[0]["event"] == "start"
    assert not [e for e in events if e["event"] == "exit"]
    one(flows(events, dst="203.0.113.7", verdict="denied"), "denied flow", events)
    one(flows(events, dst="192.0.2.10", ending="closed"), "hello flow", events)
    one(dns(events, name="api.example.test", qtype="A"), "A query", events)


HOLD_SCRIPT = (
    "import socket, time\n"
    "s = socket.create_connection(('192.0.2.10', 80), timeout=5)\n"
    "s.sendall(b'ECHO\\nping')\n"
    "assert s.recv(4) == b'ping'\n"
    "print('holding', flush=True)\n"
    "time.sleep(60)\n"
)


def test_sigterm_to_tapbox_keeps_log_and_summary(spawn_tapbox: SpawnTapbox, fakenet: FakeNet,
                                                 tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    proc = spawn_tapbox("--log", str(log), "--summary", allow=["192.0.2.10:80"],
                        cmd=[PY, "-c", HOLD_SCRIPT])
    assert read_line(proc.stdout, SHORT) == "holding\n"
    proc.send_signal(signal.SIGTERM)  # passed on to the command, which dies of it
    status = proc.wait(timeout=SHORT)
    err = proc.stderr.read() if proc.stderr else ""
    assert status == 143, err
    events = read_log(log)
    assert events[-1]["event"] == "exit" and events[-1]["status"] == 143, events
    held = one(flows(events, dst="192.0.2.10", dport=80), "held flow", events)
    assert held["bytes_out"] == len(b"ECHO\nping") and held["bytes_in"] == 4
    assert held["process"]["cmdline"][:2] == [PY, "-c"], held
    assert "tapbox summary: 1 flow to 1 destination" in err, err


def test_bad_log_path_stops_before_the_command(run_tapbox: RunTapbox, tmp_path: Path) -> None:
    proc = run_tapbox("--log", str(tmp_path / "missing-dir" / "run.jsonl"),
                      cmd=["sh", "-c", "echo COMMAND-RAN"], allow_file_text="", timeout=SHORT)
    assert proc.returncode == 125, describe(proc)
    assert "--log" in proc.stderr and "COMMAND-RAN" not in proc.stdout


# ------------------------------------------------------------------------------------------------
# Audit mode


def test_audit_mode_lets_a_denied_flow_through_and_marks_it(
        run_tapbox: RunTapbox, fakenet: FakeNet, tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    script = "; ".join([
        client("hello", "denied.test", "80"),     # no rule for the name: would deny
        client("hello", "203.0.113.10", "80"),    # no rule for the address: would deny
        client("hello", "api.example.test", "80"),  # admitted
        client("hello", "loop.example.test", "80"),  # rebinding guard: still refused
        client("connect", "10.0.2.2", "80"),       # the sandbox's own network: never proxied
        "exit 0",
    ])
    proc = run_tapbox("--audit", "--log", str(log), cmd=["sh", "-c", script],
                      allow_file_text="api.example.test\n", timeout=SHORT)
    assert proc.returncode == 0, describe(proc)
    replies = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert replies[0].get("reply") == "hello from 203.0.113.7:80", describe(proc)
    assert replies[1].get("reply") == "hello from 203.0.113.10:80", describe(proc)
    assert replies[2].get("reply") == "hello from 192.0.2.10:80", describe(proc)
    assert "reply" not in replies[3] and "reply" not in replies[4], describe(proc)
    assert len(fakenet.connections("203.0.113.7", 80)) == 1
    assert fakenet.connections("127.0.0.1", 80) == []

    events = read_log(log)
    assert events[0]["mode"] == "audit"
    q = dns(events, name="denied.test", qtype="A")[0]
    assert q["verdict"] == "would-deny" and q["rule"] == "no rule"
    assert q["answers"] == ["203.0.113.7"]
    by_name = one(flows(events, dst="203.0.113.7"), "denied.test flow", events)
    assert by_name["verdict"] == "would-deny" and by_name["domain"] == "denied.test"
    assert by_name["rule"] == "no rule" and by_name["ending"] == "closed"
    assert by_name["bytes_in"] > 0
    by_ip = one(flows(events, dst="203.0.113.10"), "IP flow", events)
    assert by_ip["verdict"] == "would-deny" and by_ip["domain"] is None
    ok = one(flows(events, dst="192.0.2.10"), "allowed flow", events)
    assert ok["verdict"] == "allowed" and ok["rule"] == "api.example.test"
    loop = dns(events, name="loop.example.test", qtype="A")[0]
    assert loop["guarded"] == ["127.0.0.1"] and loop["answers"] == []
    own = one(flows(events, dst="10.0.2.2"), "sandbox-network flow", events)
    assert own["verdict"] == "denied"

    # the summary is on by default in audit mode and marks what would have been denied
    err = proc.stderr
    assert "tapbox summary:" in err, describe(proc)
    rows = table_rows(err)
    assert ("denied.test", "WOULD DENY") in rows and ("203.0.113.10", "WOULD DENY") in rows, err
    assert ("api.example.test", "allowed") in rows, err
    assert ("api.example.test", "WOULD DENY") not in rows, err
    assert rows[("10.0.2.2", "DENIED")][-2:] == ["(sandbox", "network)"], err
    assert "audit mode: nothing was blocked" in err, err


# ------------------------------------------------------------------------------------------------
# The summary and `tapbox log show`


def test_summary_flags(run_tapbox: RunTapbox, fakenet: FakeNet) -> None:
    ok_cmd = ["sh", "-c", client("hello", "api.example.test", "80")]
    plain = run_tapbox(cmd=ok_cmd, allow_file_text="api.example.test\n", timeout=SHORT)
    assert plain.returncode == 0 and "tapbox summary" not in plain.stderr, describe(plain)
    forced = run_tapbox("--summary", cmd=ok_cmd, allow_file_text="api.example.test\n",
                        timeout=SHORT)
    assert forced.returncode == 0, describe(forced)
    assert "tapbox summary: 1 flow to 1 destination" in forced.stderr, describe(forced)
    table = forced.stderr[forced.stderr.index("tapbox summary"):].splitlines()
    assert table[1].split() == ["VERDICT", "COUNT", "SENT", "RECV", "PORTS", "DESTINATION"]
    assert table[2].split() == ["allowed", "1", "6", "25", "tcp/80", "api.example.test"], table
    assert all(len(line) <= 80 for line in table), table
    denied_cmd = ["sh", "-c", client("connect", "203.0.113.7", "80")]
    quiet = run_tapbox("-q", cmd=denied_cmd, allow_file_text="api.example.test\n",
                       timeout=SHORT)
    assert quiet.returncode == 1, describe(quiet)
    assert quiet.stderr == "", describe(quiet)


def run_log_show(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "tapbox", "log", "show", *args], capture_output=True,
                          text=True, cwd=REPO_ROOT, env=tapbox_env(), timeout=SHORT)


def table_rows(text: str) -> dict[tuple[str, str], list[str]]:
    """(destination, verdict) -> [count, sent, recv, ports, rule or reason words...], from a
    summary table in `text` (a rule or reason on a line of its own joins its row)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("VERDICT"))
    rows: dict[tuple[str, str], list[str]] = {}
    last: list[str] = []
    for line in lines[start + 1:]:
        if not line.strip() or line.startswith(("#", "audit mode", "...")):
            break
        if line.startswith(" "):  # the rule or reason of the row above
            last += line.split()
            continue
        verdict = "WOULD DENY" if line.startswith("WOULD DENY") else line.split()[0]
        words = line[len(verdict):].split()
        last = rows[(words[4], verdict)] = words[:4] + words[5:]
    return rows


def test_log_show_renders_and_filters(run_tapbox: RunTapbox, fakenet: FakeNet,
                                      tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    proc = scripted_run(run_tapbox, log, "-q")
    assert proc.returncode == 0, describe(proc)
    assert "tapbox summary" not in proc.stderr

    full = run_log_show(str(log))
    assert full.returncode == 0, describe(full)
    assert "exit status 0" in full.stdout and "enforce mode" in full.stdout, full.stdout
    table = full.stdout[full.stdout.index("tapbox summary"):]
    assert all(len(line) <= 80 for line in table.splitlines()), full.stdout
    rows = table_rows(full.stdout)
    assert set(rows) == {("api.example.test", "allowed"), ("203.0.113.7", "DENIED"),
                         ("denied.test", "DENIED"), ("192.0.2.10", "allowed"),
                         ("203.0.113.10", "allowed")}, full.stdout
    assert rows[("api.example.test", "allowed")][:4] == ["1", "6", "25", "tcp/80"], full.stdout
    assert rows[("203.0.113.7", "DENIED")] == ["1", "0", "0", "tcp/80", "(no", "rule)"]
    assert rows[("denied.test", "DENIED")][:4] == ["2", "-", "-", "dns"]  # A and AAAA
    assert rows[("192.0.2.10", "allowed")][::3][:2] == ["2", "tcp/9,udp/5353"], full.stdout
    rules = " ".join(rows[("192.0.2.10", "allowed")][4:])
    assert rules in ("(rules 192.0.2.10:9, 192.0.2.10:5353)",
                     "(rules 192.0.2.10:5353, 192.0.2.10:9)"), full.stdout

    denied = run_log_show(str(log), "--denied")
    assert denied.returncode == 0, describe(denied)
    assert set(table_rows(denied.stdout)) == {("203.0.113.7", "DENIED"),
                                              ("denied.test", "DENIED")}, denied.stdout

    domain = run_log_show(str(log), "--domain", "example.test", "--flows")
    assert domain.returncode == 0, describe(domain)
    assert set(table_rows(domain.stdout)) == {("api.example.test", "allowed")}, domain.stdout
    flow_lines = [line for line in domain.stdout.splitlines() if line.startswith("#")]
    assert len(flow_lines) == 1 and "ALLOWED closed" in flow_lines[0], domain.stdout
    assert " python" in flow_lines[0], domain.stdout

    missing = run_log_show(str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 1 and "cannot read" in missing.stderr


def test_a_command_named_log_runs_after_double_dash(tmp_path: Path) -> None:
    """`tapbox log ...` reads a log; `tapbox -- log ...` runs a command named log."""
    proc = subprocess.run([PY, "-m", "tapbox", "--", "log", "show", str(tmp_path / "x")],
                          capture_output=True, text=True, cwd=REPO_ROOT, env=tapbox_env(),
                          timeout=SHORT)
    assert proc.returncode == 127, describe(proc)  # run in the sandbox: no such command
    assert "tapbox: log" in proc.stderr, describe(proc)
    sub = run_log_show(str(tmp_path / "x"))
    assert sub.returncode == 1 and "cannot read" in sub.stderr, describe(sub)
