"""End to end: what the sandbox can provoke never kills the engine (issue 8, item 4).

- A DNS answer larger than one UDP datagram may be (asked with a 65535-byte EDNS buffer) is
  cut with TC set, never framed into an oversize packet; the same answer comes whole over TCP.
- Running out of file descriptors while opening host sockets ends those flows (a reset, an
  ICMP unreachable), logged with their ending; the engine goes on serving.
- If the engine dies anyway, tapbox exits 125 with one line naming it, and the command dies.
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import trio
from conftest import REPO_ROOT, RunTapbox, build_tapbox_argv, kill_group, tapbox_env
from fakenet import FakeNet
from netstack_helpers import ip_frame
from scapy.layers.inet import TCP
from scapy.layers.l2 import Ether

from tapbox.allowlist import Allowlist, IPAddress
from tapbox.audit import Audit
from tapbox.net.dns import DnsForwarder
from tapbox.net.engine import Engine, EngineError
from tapbox.policy import Decision, Policy
from tapbox.runner import _engine_failure

# Asks 10.0.2.3 for huge.example.test AAAA over UDP with a 65535-byte EDNS buffer, then over TCP.
DNS_PROBE = textwrap.dedent("""
    import json, socket, dns.flags, dns.message, dns.query
    q = dns.message.make_query("huge.example.test", "AAAA", use_edns=0, payload=65535)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(10)
    s.sendto(q.to_wire(), ("10.0.2.3", 53))
    wire = s.recv(65535)
    r = dns.message.from_wire(wire)
    t = dns.query.tcp(q, "10.0.2.3", timeout=10)
    print(json.dumps({"udp_size": len(wire), "udp_tc": bool(r.flags & dns.flags.TC),
                      "tcp_records": sum(len(rrset) for rrset in t.answer),
                      "tcp_tc": bool(t.flags & dns.flags.TC)}))
""")


def test_dns_answer_larger_than_a_datagram_is_truncated(run_tapbox: RunTapbox,
                                                        fakenet: FakeNet) -> None:
    proc = run_tapbox("--ipv6", "on", cmd=[sys.executable, "-c", DNS_PROBE],
                      allow=["huge.example.test"], timeout=60)
    described = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, described
    assert "Traceback" not in proc.stderr, described
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # The link (MTU 65520) takes at most 65492 bytes of UDP payload; the answer is 65,510.
    assert result["udp_tc"] is True and result["udp_size"] <= 65492, result
    assert result["tcp_records"] == 2338 and result["tcp_tc"] is False, result


def test_dns_answer_is_cut_to_a_small_mtu(run_tapbox: RunTapbox, fakenet: FakeNet) -> None:
    probe = DNS_PROBE.replace('"huge.example.test", "AAAA"', '"bigv4.example.test", "A"')
    proc = run_tapbox("--mtu", "576", cmd=[sys.executable, "-c", probe],
                      allow=["bigv4.example.test"], timeout=60)
    described = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, described
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["udp_tc"] is True and result["udp_size"] <= 576 - 28, result
    assert result["tcp_records"] == 60 and result["tcp_tc"] is False, result


# Opens TCP connections to an allowed server and keeps them open until tapbox runs out of file
# descriptors and refuses some; a datagram then; closes everything; then both work again.
FD_PROBE = textwrap.dedent("""
    import json, socket, time
    out = {"connected": 0, "refused": 0, "errors": []}
    held = []
    for _ in range(30):
        s = socket.socket()
        s.settimeout(5)
        try:
            s.connect(("192.0.2.10", 80))
        except ConnectionRefusedError:
            out["refused"] += 1
            s.close()
            if out["refused"] >= 3:
                break
            continue
        except OSError as exc:
            out["errors"].append(repr(exc))
            s.close()
            break
        out["connected"] += 1
        held.append(s)

    def udp():
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.settimeout(3)
        u.connect(("192.0.2.10", 5353))
        try:
            u.send(b"ping")
            return "echo" if u.recv(100) == b"ping" else "other"
        except ConnectionRefusedError:
            return "refused"
        except OSError as exc:
            return repr(exc)
        finally:
            u.close()

    out["udp_while_full"] = udp()
    for s in held:
        s.close()
    out["hello_after"] = None
    for _ in range(50):  # tapbox closes its host sockets once the server has closed too
        time.sleep(0.1)
        try:
            with socket.create_connection(("192.0.2.10", 80), timeout=5) as s:
                s.sendall(b"HELLO\\n")
                out["hello_after"] = s.recv(100).decode().strip()
                break
        except ConnectionRefusedError:
            continue
    out["udp_after"] = udp()
    print(json.dumps(out))
""")


def test_running_out_of_file_descriptors_ends_flows_not_the_engine(
        tmp_path: Path, fakenet: FakeNet) -> None:
    # -v rather than --log: attribution (on with --log) opens /proc files now and then, which
    # would make the moment descriptors run out less certain.
    argv = build_tapbox_argv(tmp_path, ["-v"], [sys.executable, "-c", FD_PROBE],
                             allow=["192.0.2.10"])
    # tapbox needs about 15 descriptors of its own: a limit of 40 runs out after ~25 flows.
    proc = subprocess.Popen(["prlimit", "--nofile=40:40", "--", *argv], cwd=REPO_ROOT,
                            env=tapbox_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=90)
    finally:
        kill_group(proc)
    described = f"exit {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    assert proc.returncode == 0, described
    assert "Traceback" not in err, described
    result = json.loads(out.strip().splitlines()[-1])
    assert result["connected"] >= 5 and result["refused"] >= 1, result
    assert result["udp_while_full"] == "refused", result
    assert result["hello_after"] == "hello from 192.0.2.10:80", result
    assert result["udp_after"] == "echo", result
    # Each flow that could not be opened is reported with how it ended.
    assert "tcp 192.0.2.10:80 ended: host error: Too many open files" in err, described
    assert "udp 192.0.2.10:5353 ended: host error: Too many open files" in err, described


def test_when_the_engine_dies_tapbox_exits_125_with_one_line_and_the_command_dies(
        run_tapbox: RunTapbox, fakenet: FakeNet) -> None:
    """The test-only fault seam makes the engine raise at the first frame; the command would
    sleep for five minutes (and hold tapbox's stdout open) if it were left running."""
    sleeper = ("import socket, time\n"
               "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', "
               "('192.0.2.10', 5353))\n"
               "time.sleep(300)\n")
    proc = run_tapbox(cmd=[sys.executable, "-c", sleeper], allow=["192.0.2.10"],
                      env={"TAPBOX_TEST_FAULTS": "fail_after=1"}, timeout=30)
    described = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 125, described
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, described
    assert lines[0].startswith("tapbox: the network engine failed"), described
    assert "injected" in lines[0], described


# ----- the same, one level down: an engine on a socketpair instead of a TAP device -----------


class _ExplodingPolicy(Policy):
    """Denies everything, and fails outright for port 666 (a stand-in for any bug)."""

    def decide(self, ip: str | IPAddress, port: int, now: float) -> Decision:
        if port == 666:
            raise RuntimeError("boom")
        return super().decide(ip, port, now)


def test_an_error_in_one_flow_ends_that_flow_not_the_engine() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    said = io.StringIO()
    policy = _ExplodingPolicy(Allowlist([]))
    engine = Engine(ours.fileno(), policy, DnsForwarder(policy, []), Audit(stream=said))

    def syn(dport: int) -> bytes:
        return ip_frame(TCP(sport=40000 + dport, dport=dport, flags="S", seq=1000))

    def answer() -> TCP:
        theirs.settimeout(5)
        return Ether(theirs.recv(65536))[TCP]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            for dport in (666, 80, 666):
                theirs.send(syn(dport))
                reply = await trio.to_thread.run_sync(answer)
                assert (reply.dport, str(reply.flags)) == (40000 + dport, "RA")
            nursery.cancel_scope.cancel()

    trio.run(main)
    ours.close()
    theirs.close()
    assert engine.internal_errors == {"RuntimeError": 2}
    assert said.getvalue().count("internal error in the network engine (RuntimeError)") == 1
    assert engine.drop_counts()["engine-internal-error-RuntimeError"] == 2


def test_the_failure_named_is_the_tap_device_s_when_there_is_one() -> None:
    group = ExceptionGroup("engine", [ValueError("x"),
                                      ExceptionGroup("inner", [EngineError("TAP closed")])])
    assert _engine_failure(group, EngineError) == "TAP closed"
    assert _engine_failure(ExceptionGroup("e", [KeyError("k")]), EngineError) == \
        "internal error: KeyError: 'k'"
