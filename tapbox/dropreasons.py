"""Why the stack dropped a frame, in words a user can read (the -v line at exit).

netstack counts dropped frames under short internal names (`icmpv6-foreign-source`,
`ipv4-bad-checksum`, ...): they stay as they are in the --log exit event, for tools. `describe()`
turns one into words: the names that need explaining have an entry in `WORDS`; any other is
read as "<protocol>-<what went wrong>" (`tcp-bad-offset` -> "TCP segments: bad offset"), so a
reason added to the stack later still reads sensibly.
"""

from __future__ import annotations

from collections.abc import Mapping

WORDS = {
    "vnet-gso-unsupported": "oversized frames needing segmentation offload (not offered)",
    "eth-not-for-us": "Ethernet frames addressed to another machine",
    "eth-unknown-type": "frames of a protocol other than IPv4, IPv6 and ARP",
    "ipv6-disabled": "IPv6 packets (IPv6 is off)",
    "arp-not-request": "ARP packets other than requests",
    "arp-foreign-sender": "ARP requests from an address that is not the sandbox's",
    "arp-not-ours": "ARP requests for another address than the gateway's",
    "ipv4-foreign-source": "IPv4 packets from an address that is not the sandbox's",
    "ipv4-fragment": "IPv4 fragments (not reassembled)",
    "ipv4-bad-destination": "IPv4 packets to a broadcast, multicast or invalid address",
    "ipv4-unknown-protocol": "IPv4 packets of a protocol other than TCP, UDP and ICMP",
    "ttl-expired": "IPv4 packets whose TTL ran out (answered with time exceeded)",
    "ipv6-foreign-source": "IPv6 packets from an address that is not the sandbox's",
    "ipv6-bad-destination": "IPv6 packets to a multicast, link-local, loopback or "
                            "unspecified address",
    "ipv6-unknown-protocol": "IPv6 packets of a protocol other than TCP, UDP and ICMPv6",
    "ipv6-fragment": "IPv6 fragments (not reassembled)",
    "ipv6-too-many-extensions": "IPv6 packets with too many extension headers",
    "hop-limit-expired": "IPv6 packets whose hop limit ran out (answered with time exceeded)",
    "icmpv6-foreign-source": "ICMPv6 messages from an address that is not the sandbox's "
                             "(such as duplicate address detection probes)",
    "icmpv6-echo-not-routable": "IPv6 pings to addresses tapbox does not route",
    "icmpv6-ignored": "ICMPv6 messages tapbox does not act on (listener reports, "
                      "advertisements, errors)",
    "ndp-invalid": "invalid neighbour discovery messages",
    "ndp-not-ours": "neighbour solicitations for another address",
    "icmp-not-echo-request": "ICMP messages other than echo requests",
    "udp-port-zero": "UDP datagrams to or from port 0",
    "tcp-port-zero": "TCP segments to or from port 0",
    "tcp-before-accept": "TCP segments for a connection not yet accepted",
    "tcp-rst-no-connection": "TCP resets for no known connection",
    "tcp-no-connection": "TCP segments for no known connection",
    "tcp-syn-duplicate": "repeated TCP SYNs for a connection being decided",
    "tcp-time-wait-evicted": "closed TCP connections forgotten early to make room",
    "tcp-too-many-connections": "TCP connections beyond the connection table's size",
    "tcp-syn-evicted": "pending TCP connections evicted to make room",
    "tap-queue-full": "frames to the sandbox (its receive queue was full)",
}

_PROTOCOLS = {
    "vnet": "frames with a bad virtio-net header",
    "eth": "Ethernet frames",
    "arp": "ARP packets",
    "ipv4": "IPv4 packets",
    "ipv6": "IPv6 packets",
    "icmp": "ICMP messages",
    "icmpv6": "ICMPv6 messages",
    "ndp": "neighbour discovery messages",
    "tcp": "TCP segments",
    "udp": "UDP datagrams",
}


def describe(reason: str) -> str:
    """A dropped frame's reason in words."""
    words = WORDS.get(reason)
    if words is not None:
        return words
    if reason.startswith("internal-error"):
        return f"frames that hit an internal error in tapbox ({reason}: a bug, please report)"
    protocol, _, what = reason.partition("-")
    name = _PROTOCOLS.get(protocol)
    if name is None or not what:
        return reason.replace("-", " ")
    return f"{name}: {what.replace('-', ' ')}"


def summarize(counts: Mapping[str, int]) -> str:
    """All drops in one line: "3 frames dropped: 2 IPv4 packets: bad checksum; 1 ..."."""
    total = sum(counts.values())
    parts = [f"{count} {describe(reason)}" for reason, count in
             sorted(counts.items(), key=lambda item: (-item[1], item[0]))]
    return f"{total} frame{'s' * (total != 1)} dropped: " + "; ".join(parts)
