"""Hostile input from inside the sandbox: raw frames its root can write to tap0.

The sandboxed command owns CAP_NET_RAW in its own network namespace, so it is not limited to
what its kernel would send: tests/sandbox_tools/hostile.py writes hand-made Ethernet frames
(spoofed sources, frames for another MAC, ARP and NDP lies, IPv4 options, fragment tricks,
IPv6 extension-header chains, malformed headers), one scenario at a time, and reports which
frames came back for each. The properties checked:

- nothing admits a flow the allowlist does not: the fake servers record no connection or
  datagram at a denied destination (nor at the allowed ones a spoofed frame aimed at);
- a SYN that the stack does parse (behind IPv4 options or IPv6 extension headers) is still
  decided on its destination, and refused with a reset when denied;
- nothing breaks the engine: an ordinary ``client.py hello`` afterwards, in the same sandbox,
  works, tapbox exits with the command's own status, and prints no traceback.
"""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from types import ModuleType
from typing import Any

from conftest import CLIENT, TESTS_DIR, RunTapbox, parse_client_json
from fakenet import FakeNet
from scapy.layers.inet import TCP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop
from scapy.layers.l2 import Ether

from netstack import events as ev
from netstack.iface import Interface, InterfaceConfig
from netstack.wire import ipv6

HOSTILE = TESTS_DIR / "sandbox_tools" / "hostile.py"
GATEWAY_MAC = "52:55:00:00:02:02"
EXIT = 7  # the tool's exit status: tapbox must pass it on
TIMEOUT = 120.0

ALLOW4 = ["192.0.2.10:80", "192.0.2.10:5353", "192.0.2.20", "192.0.2.21", "198.51.100.20"]
ALLOW6 = ["[2001:db8::10]:80", "[2001:db8::10]:5353"]


def run_hostile(run_tapbox: RunTapbox, family: str, hello: str, allow: list[str],
                *tapbox_args: str) -> tuple[dict[str, Any], dict[str, list[str]], str]:
    proc = run_tapbox(*tapbox_args, cmd=[sys.executable, str(HOSTILE), family, "--client",
                                         str(CLIENT), "--hello", hello, "--exit", str(EXIT)],
                      allow=allow, timeout=TIMEOUT)
    described = f"exit status {proc.returncode}\nstdout:\n{proc.stdout[-6000:]}\n" \
                f"stderr:\n{proc.stderr[-3000:]}"
    result = parse_client_json(proc.stdout)
    assert result is not None, described
    assert proc.returncode == EXIT, described
    assert "Traceback" not in proc.stderr, described
    replies = {sc["name"]: sc["replies"] for sc in result["scenarios"]}
    unsent = {sc["name"]: sc["send_errors"] for sc in result["scenarios"] if sc["send_errors"]}
    assert not unsent, f"frames the tool could not send: {unsent}"
    print(f"\n{family} scenarios and replies:\n" + "\n".join(f"  {k}: {v}"
                                                           for k, v in replies.items()))
    return result, replies, described


def timeline(result: dict[str, Any]) -> str:
    return "\n".join(f"  {sc['start']:.3f} {sc['name']}" for sc in result["scenarios"])


def reached(fakenet: FakeNet) -> Counter[tuple[str, int, str]]:
    return Counter((c.local_addr, c.local_port, c.command) for c in fakenet.connections())


def no_syn_ack(replies: dict[str, list[str]], names: list[str]) -> None:
    accepted = {n: replies[n] for n in names if any(r.startswith("tcp:SA") for r in replies[n])}
    assert not accepted, f"accepted (SYN-ACK) where nothing may be: {accepted}"


def test_raw_ipv4_abuse_admits_nothing_and_breaks_nothing(run_tapbox: RunTapbox,
                                                          fakenet: FakeNet) -> None:
    result, replies, described = run_hostile(run_tapbox, "ipv4", "192.0.2.10:80", ALLOW4, "-v")
    seen = reached(fakenet)
    context = f"{described}\nconnections: {seen}\nscenarios:\n{timeline(result)}\n" + \
        "\n".join(f"  conn at {c.at:.3f} {c.local_addr}:{c.local_port} {c.command!r}"
                  for c in fakenet.connections())

    # The control: a raw SYN with the sandbox's own source is answered and proxied.
    assert "tcp:SA" in replies["control-syn-allowed"], context
    # Spoofed sources, another MAC, broken checksums: silence, and no flow anywhere.
    silent = [n for n in replies if n.startswith(("spoof-", "udp-spoof-"))] + \
        ["wrong-dst-mac", "bad-ip-checksum", "bad-tcp-checksum", "malformed"]
    assert {n: replies[n] for n in silent if replies[n]} == {}, context
    # No handshake, no flow: a segment for no connection draws a reset (RFC 9293 §3.10.7.1).
    assert replies["ack-without-handshake"] == ["tcp:R"], context
    # A SYN behind IPv4 options is decided on its destination: refused when denied.
    for name in ("ipopt-rr-denied", "ipopt-rr-denied-port", "ipopt-lsrr-to-denied",
                 "flags-SF-denied", "flags-SU-denied", "flags-SEC-denied"):
        assert "tcp:RA" in replies[name], f"{name} was not refused\n{context}"
    no_syn_ack(replies, [n for n in replies if n.startswith(("flags-", "frag-"))] +
               ["ipopt-rr-denied", "ipopt-rr-denied-port", "ipopt-lsrr-to-denied",
                "ipopt-garbage-length-denied"])
    # UDP: the allowed datagram is echoed, the denied one refused with ICMP unreachable.
    assert replies["udp-control-allowed"] == ["udp"], context
    assert any(r.startswith("icmp:3/") for r in replies["udp-ipopt-denied"]), context
    # ARP: lies are not believed; the gateway and DNS addresses still resolve to the gateway.
    assert all(r.endswith(GATEWAY_MAC) for r in replies["arp-lies"]), context
    assert sorted(replies["arp-ask-gateway"]) == [f"arp-reply:10.0.2.2:{GATEWAY_MAC}",
                                                  f"arp-reply:10.0.2.3:{GATEWAY_MAC}"], context

    # What the servers saw: the control, the hello, and at most the source-routed SYN to an
    # allowed destination (decided and proxied on its header's destination, 192.0.2.20).
    assert seen[("192.0.2.10", 80, "")] == 1, context
    assert seen[("192.0.2.10", 80, "HELLO")] == 1, context
    assert seen[("192.0.2.20", 80, "")] <= 1, context
    extra = set(seen) - {("192.0.2.10", 80, ""), ("192.0.2.10", 80, "HELLO"),
                         ("192.0.2.20", 80, "")}
    assert not extra, f"reached what nothing may reach: {extra}\n{context}"
    for addr in ("203.0.113.7", "203.0.113.10", "192.0.2.21", "198.51.100.20"):
        assert fakenet.connections(addr) == [], context
    assert [d.size for d in fakenet.datagrams()] == [111], \
        f"datagrams: {fakenet.datagrams()}\n{context}"

    # The engine still works, for an ordinary program, in the same sandbox.
    hello = result["hello"]
    assert hello["status"] == 0 and hello["reply"] == "hello from 192.0.2.10:80", hello
    assert "denied tcp 203.0.113.7:80" in described
    assert "denied tcp 192.0.2.10:443" in described
    # -v reports the drops by reason at exit (in words): spoofed sources and fragments
    # among them.
    drops = [line for line in described.splitlines() if "frames dropped:" in line]
    assert drops and "IPv4 packets from an address that is not the sandbox's" in drops[0] \
        and "IPv4 fragments" in drops[0], described
    assert "internal error" not in drops[0], described


def test_raw_ipv6_extension_header_abuse_admits_nothing_and_breaks_nothing(
        run_tapbox: RunTapbox, fakenet: FakeNet) -> None:
    result, replies, described = run_hostile(run_tapbox, "ipv6", "[2001:db8::10]:80", ALLOW6,
                                             "--ipv6", "on")
    seen = reached(fakenet)
    context = f"{described}\nconnections: {seen}\nscenarios:\n{timeline(result)}"

    assert "tcp:SA" in replies["v6-control-syn-allowed"], context
    silent = [n for n in replies if "spoof" in n] + ["v6-wrong-dst-mac", "v6-broken-chains"]
    assert {n: replies[n] for n in silent if replies[n]} == {}, context
    # Behind hop-by-hop, destination options and routing headers, a SYN is still decided on
    # its destination: refused when denied.
    for name in ("v6-hbh-dest-routing-denied", "v6-hbh-dest-denied-port",
                 "v6-rh0-to-denied-naming-allowed"):
        assert "tcp:RA" in replies[name], f"{name} was not refused\n{context}"
    no_syn_ack(replies, [n for n in replies if "denied" in n or "frag" in n or "long" in n])
    assert any(r.startswith("icmp6:1/") for r in replies["v6-udp-chain-denied"]), context
    assert all(r.endswith(GATEWAY_MAC) for r in replies["v6-ndp-lies"]), context
    assert replies["v6-ndp-ask-gateway"] == [f"na:fd00::2:{GATEWAY_MAC}"], context

    # Nothing reached the denied server (its TCP DNS listener records every connection).
    assert fakenet.connections("2001:db8::53") == [], context
    assert fakenet.dns_queries(server="2001:db8::53") == [], context
    assert seen[("2001:db8::10", 80, "HELLO")] == 1, context
    # The control, and at most the routing-header SYN whose header destination is allowed.
    assert 1 <= seen[("2001:db8::10", 80, "")] <= 2, context
    assert set(seen) <= {("2001:db8::10", 80, ""), ("2001:db8::10", 80, "HELLO")}, context
    assert fakenet.datagrams() == [], f"a spoofed or denied datagram arrived\n{context}"

    hello = result["hello"]
    assert hello["status"] == 0 and hello["reply"] == "hello from [2001:db8::10]:80", hello
    assert "denied tcp [2001:db8::53]:53" in described


def test_ipv6_chain_of_max_extensions_headers_is_followed() -> None:
    """netstack/wire/ipv6.py: "a chain longer than MAX_EXTENSIONS ends in a drop" — so a chain
    of exactly MAX_EXTENSIONS headers is followed to its TCP SYN; a longer one is dropped."""
    me = "02:00:00:00:00:01"

    def syn_behind(n: int, sport: int) -> bytes:
        pkt = IPv6(src="fd00::100", dst="2001:db8::10") / IPv6ExtHdrHopByHop()
        for _ in range(n - 1):
            pkt = pkt / IPv6ExtHdrDestOpt()
        return bytes(Ether(src=me, dst=GATEWAY_MAC) / pkt / TCP(sport=sport, dport=80,
                                                                 flags="S"))

    stack = Interface(InterfaceConfig(ipv6=True))
    for n in range(1, ipv6.MAX_EXTENSIONS + 1):
        stack.receive(syn_behind(n, 40000 + n), 1.0)
        events = stack.take_events()
        assert [type(e) for e in events] == [ev.TcpConnectRequest], \
            f"a SYN behind {n} extension headers: drops {dict(stack.drops)}"
    stack.receive(syn_behind(ipv6.MAX_EXTENSIONS + 1, 40100), 1.0)
    assert stack.take_events() == []
    assert stack.drops["ipv6-too-many-extensions"] == 1, dict(stack.drops)



def load_tool(name: str) -> ModuleType:
    path = TESTS_DIR / "sandbox_tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"sandbox_tools_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_hostile_frames_never_reach_an_internal_error_in_the_stack() -> None:
    """Interface.receive turns any exception into an "internal-error-*" drop, which nothing
    outside tapbox can see: feed every hostile frame straight into a stack and look."""
    hostile = load_tool("hostile")
    me = "02:00:00:00:00:01"
    stack = Interface(InterfaceConfig(ipv6=True))
    count = 0
    for build, first in ((hostile.ipv4_scenarios, 41000), (hostile.ipv6_scenarios, 42000)):
        for scenario in build(me, hostile.Ports(first)):
            for frame in scenario.frames:
                stack.receive(bytes(frame), 1.0 + count * 0.001)
                count += 1
            for event in stack.take_events():  # accept every flow: the deeper paths run too
                if isinstance(event, ev.TcpConnectRequest):
                    stack.tcp_accept(event.flow, 2.0)
            stack.take_frames()
            stack.poll(3.0)
    internal = {k: v for k, v in stack.drops.items() if k.startswith("internal-error")}
    assert internal == {}, f"internal errors in the stack: {internal}"
    assert stack.stats["frames-in"] == count
