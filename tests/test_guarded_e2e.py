"""End to end: guarded destinations in the fake internet (issue 8, item 5).

The test namespace is the host: its own addresses are 192.0.2.1 and 2001:db8::2, and it runs a
service on every address (port 8081) and one on its loopback (127.0.0.1:80). The fake internet
has a metadata server on 169.254.169.254:80. None of them may be reached through a name rule, a
broad rule, audit mode or an IPv6 form of their address; a rule naming them does reach them.
"""

from __future__ import annotations

import json
import sys

import pytest
from conftest import TESTS_DIR, RunClient, RunTapbox
from fakenet import FakeNet

SYNPROBE = TESTS_DIR / "sandbox_tools" / "synprobe.py"


def refused(run: object) -> None:
    result = run.expect_result()  # type: ignore[attr-defined]
    assert result.get("result") != "ok" and "reply" not in result, \
        run.describe()  # type: ignore[attr-defined]


@pytest.mark.parametrize("rules", [["0.0.0.0/0"], ["192.0.2.0/24"], ["192.0.2.1/32:1-7999"]])
def test_a_rule_not_naming_the_host_s_own_address_does_not_reach_it(
        run_client: RunClient, fakenet: FakeNet, rules: list[str]) -> None:
    # (the last rule does name it, but not on port 8081: refused for that reason alone)
    refused(run_client("hello", "192.0.2.1", "8081", allow=rules))
    assert fakenet.connections(port=8081) == []


def test_a_name_resolving_to_the_host_s_own_address_does_not_reach_it(
        run_client: RunClient, fakenet: FakeNet) -> None:
    run = run_client("hello", "self.example.test", "8081", allow=["self.example.test"])
    refused(run)
    assert fakenet.connections(port=8081) == []
    assert "192.0.2.1 not admitted (rebinding guard" in run.stderr, run.describe()


def test_audit_mode_does_not_open_the_host_s_own_services(
        run_client: RunClient, fakenet: FakeNet) -> None:
    run = run_client("hello", "192.0.2.1", "8081", tapbox_args=["--audit"])
    refused(run)
    assert fakenet.connections(port=8081) == []
    # ...while a destination that is not guarded is let through in audit mode
    run = run_client("hello", "203.0.113.7", "80", tapbox_args=["--audit"])
    assert run.expect_result().get("reply") == "hello from 203.0.113.7:80", run.describe()


def test_a_rule_naming_the_host_s_own_address_reaches_it(run_client: RunClient,
                                                          fakenet: FakeNet) -> None:
    run = run_client("hello", "192.0.2.1", "8081", allow=["192.0.2.1:8081"])
    assert run.expect_result().get("reply") == "hello from 192.0.2.1:8081", run.describe()


def test_a_broad_rule_does_not_reach_the_metadata_service(run_client: RunClient,
                                                          fakenet: FakeNet) -> None:
    refused(run_client("hello", "169.254.169.254", "80", allow=["0.0.0.0/0", "::/0"]))
    assert fakenet.connections("169.254.169.254") == []
    run = run_client("hello", "192.0.2.10", "80", allow=["0.0.0.0/0", "::/0"])
    assert run.expect_result().get("reply") == "hello from 192.0.2.10:80", run.describe()
    run = run_client("hello", "169.254.169.254", "80", allow=["0.0.0.0/0", "169.254.169.254:80"])
    assert run.expect_result().get("reply") == "hello from 169.254.169.254:80", run.describe()


def test_ipv4_addresses_in_ipv6_forms_are_judged_and_logged_as_ipv4(
        run_tapbox: RunTapbox, fakenet: FakeNet) -> None:
    """Raw SYNs (the sandbox's root writes them to tap0) to IPv6 forms of IPv4 addresses."""
    targets = {
        "[::ffff:127.0.0.1]:80": "dropped",  # the host's loopback, even with a rule for it
        "[64:ff9b::7f00:1]:80": "dropped",
        "[::ffff:10.0.2.2]:53": "dropped",  # the gateway, even with 10.0.0.0/8
        "[::ffff:192.0.2.1]:8081": "refused",  # the host's own: no rule inside its range
        "[::ffff:192.0.2.10]:80": "accepted",  # an allowed address, reached over IPv4
    }
    proc = run_tapbox("--ipv6", "on", "-v",
                      cmd=[sys.executable, str(SYNPROBE), *targets],
                      allow=["127.0.0.1", "10.0.0.0/8", "192.0.2.10", "0.0.0.0/0"], timeout=60)
    described = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, described
    replies = json.loads(proc.stdout.strip().splitlines()[-1])
    seen = {t: ("accepted" if "tcp:SA" in r else "refused" if any(x.startswith("tcp:R")
                                                                    for x in r) else "dropped")
            for t, r in replies.items()}
    assert seen == targets, described
    assert fakenet.connections("127.0.0.1") == [] and fakenet.connections(port=8081) == []
    assert len(fakenet.connections("192.0.2.10", 80)) == 1
    # Logs name the IPv4 address, never the IPv6 form it was written in.
    assert "allowed tcp 192.0.2.10:80 (rule 192.0.2.10)" in proc.stderr, described
    assert "denied tcp 192.0.2.1:8081 (guarded address (the host's own address)" in \
        proc.stderr, described
    assert "::ffff:" not in proc.stderr, described
