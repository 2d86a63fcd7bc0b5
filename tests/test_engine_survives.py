"""End to end: what the sandbox can provoke never kills the engine (issue 8, item 4).

- A DNS answer larger than one UDP datagram may be (asked with a 65535-byte EDNS buffer) is
  cut with TC set, never framed into an oversize packet; the same answer comes whole over TCP.
- Running out of file descriptors while opening host sockets ends those flows (a reset, an
  ICMP unreachable), logged with their ending; the engine goes on serving.
- If the engine dies anyway, tapbox exits 125 with one line naming it, and the command dies.
"""

from __future__ import annotations

import json
import sys
import textwrap

from conftest import RunTapbox
from fakenet import FakeNet

# Asks 10.0.2.3 for huge.example.test TXT over UDP with a 65535-byte EDNS buffer, then over TCP.
DNS_PROBE = textwrap.dedent("""
    import json, socket, dns.flags, dns.message, dns.query
    q = dns.message.make_query("huge.example.test", "TXT", use_edns=0, payload=65535)
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
    proc = run_tapbox(cmd=[sys.executable, "-c", DNS_PROBE], allow=["huge.example.test"],
                      timeout=60)
    described = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, described
    assert "Traceback" not in proc.stderr, described
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # The link (MTU 65520) takes at most 65492 bytes of UDP payload; the answer is 65,519.
    assert result["udp_tc"] is True and result["udp_size"] <= 65492, result
    assert result["tcp_records"] == 244 and result["tcp_tc"] is False, result


def test_dns_answer_is_cut_to_a_small_mtu(run_tapbox: RunTapbox, fakenet: FakeNet) -> None:
    probe = DNS_PROBE.replace('"huge.example.test", "TXT"', '"big.example.test", "TXT"')
    proc = run_tapbox("--mtu", "576", cmd=[sys.executable, "-c", probe],
                      allow=["big.example.test"], timeout=60)
    described = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, described
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["udp_tc"] is True and result["udp_size"] <= 576 - 28, result
    assert result["tcp_records"] == 9 and result["tcp_tc"] is False, result
