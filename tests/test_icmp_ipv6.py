"""ICMP through tapbox (echo to the gateway and, where the host allows, to allowed addresses;
TTL-expired probes) and IPv6 (NDP, ICMPv6 echo, TCP and UDP, AAAA only when IPv6 is on)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RunClient, RunTapbox, client_cmd, parse_client_json
from fakenet import FakeNet

PING_RANGE = Path("/proc/sys/net/ipv4/ping_group_range")


@pytest.fixture
def host_ping_sockets() -> Iterator[None]:
    """Let every group use unprivileged ICMP sockets in the test netns (as many distros do)."""
    old = PING_RANGE.read_text()
    PING_RANGE.write_text("0 2147483647")
    yield
    PING_RANGE.write_text(old)


@pytest.fixture
def no_host_ping_sockets() -> Iterator[None]:
    old = PING_RANGE.read_text()
    PING_RANGE.write_text("1 0")  # the kernel default: nobody
    yield
    PING_RANGE.write_text(old)


def test_ping_the_gateway_is_answered_by_the_stack(run_client: RunClient) -> None:
    run = run_client("ping", "10.0.2.2")
    assert run.expect_result()["result"] == "reply", run.describe()


def test_ping_to_an_allowed_address_goes_through(run_client: RunClient,
                                                  host_ping_sockets: None) -> None:
    run = run_client("ping", "192.0.2.10", allow=["192.0.2.10"])
    result = run.expect_result()
    assert result["result"] == "reply" and result["from"] == "192.0.2.10", run.describe()


def test_ping_without_host_ping_sockets_is_a_clear_unreachable(
        run_client: RunClient, no_host_ping_sockets: None) -> None:
    run = run_client("ping", "192.0.2.10", allow=["192.0.2.10"])
    result = run.expect_result()
    assert (result["result"], result["type"], result["code"]) == ("unreachable", 3, 13)
    assert result["seconds"] < 1.0


def test_ping_to_a_denied_address_is_refused(run_client: RunClient,
                                              host_ping_sockets: None) -> None:
    run = run_client("ping", "203.0.113.7", allow=["192.0.2.10"])
    result = run.expect_result()
    assert (result["result"], result["code"]) == ("unreachable", 13), run.describe()
    assert "denied icmp 203.0.113.7" in run.stderr


def test_ping_needs_a_rule_without_ports(run_client: RunClient, host_ping_sockets: None) -> None:
    # A rule restricted to ports admits TCP/UDP to those ports only, never ICMP.
    run = run_client("ping", "192.0.2.10", allow=["192.0.2.10:80"])
    assert run.expect_result()["result"] == "unreachable", run.describe()


def test_ttl_1_probe_gets_time_exceeded_from_the_gateway(run_client: RunClient,
                                                         fakenet: FakeNet) -> None:
    run = run_client("ttl1", "192.0.2.10", "5353", allow=["192.0.2.10"])
    result = run.expect_result()
    assert (result["type"], result["code"], result["from"]) == (11, 0, "10.0.2.2")
    assert not fakenet.datagrams("192.0.2.10", 5353), "a TTL-1 probe must not be forwarded"


# ----- IPv6 -----------------------------------------------------------------------------------

V6 = ("--ipv6", "on")


def test_ipv6_tcp_to_an_allowed_address(run_client: RunClient, fakenet: FakeNet) -> None:
    run = run_client("hello", "2001:db8::10", "80", allow=["[2001:db8::10]:80"], tapbox_args=V6)
    assert run.expect_result().get("reply", "").startswith("hello from [2001:db8::10]:80"), \
        run.describe()
    assert fakenet.connections("2001:db8::10", 80)


def test_ipv6_tcp_to_a_denied_address_is_refused(run_client: RunClient) -> None:
    run = run_client("connect", "2001:db8::10", "80", allow=["[2001:db8::53]:53"],
                     tapbox_args=V6)
    result = run.expect_result()
    assert result["result"] == "refused" and result["seconds"] < 1.0
    assert "denied tcp [2001:db8::10]:80" in run.stderr


def test_ipv6_udp_echo(run_client: RunClient) -> None:
    run = run_client("udp", "2001:db8::10", "5353", allow=["[2001:db8::10]:5353"],
                     tapbox_args=V6)
    assert run.expect_result()["result"] == "echo", run.describe()


def test_ipv6_ping_the_gateway(run_client: RunClient) -> None:
    run = run_client("ping", "fd00::2", tapbox_args=V6)
    assert run.expect_result()["result"] == "reply", run.describe()


def test_aaaa_answers_and_name_rule_over_ipv6(run_tapbox: RunTapbox, fakenet: FakeNet) -> None:
    # The name rule admits the AAAA address DNS returned, as it does for A records.
    script = " && ".join([
        " ".join(client_cmd("resolve", "api.example.test", "--type", "AAAA")),
        " ".join(client_cmd("hello", "2001:db8::10", "80")),
    ])
    proc = run_tapbox(*V6, cmd=["sh", "-c", script], allow=["api.example.test:80"])
    assert proc.returncode == 0, proc.stderr
    lines = [parse_client_json(line) for line in proc.stdout.splitlines()]
    assert lines[0] == {"addresses": ["2001:db8::10"]} or \
        (lines[0] or {}).get("addresses") == ["2001:db8::10"], proc.stdout
    assert (lines[1] or {}).get("reply", "").startswith("hello from [2001:db8::10]")


def test_no_aaaa_answers_when_ipv6_is_off(run_client: RunClient) -> None:
    run = run_client("resolve", "api.example.test", "--type", "AAAA",
                     allow=["api.example.test"], tapbox_args=("--ipv6", "off"))
    assert not run.get("addresses"), run.describe()
