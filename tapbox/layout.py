"""The sandbox's address plan, defined once for the tapbox package.

slirp4netns' well-known layout, so users' habits carry over: the sandbox is 10.0.2.100/24 on
tap0, its gateway 10.0.2.2 and its DNS server 10.0.2.3 are both tapbox's user-space stack; with
IPv6, fd00::100/64, gateway fd00::2, DNS fd00::3. The stack (netstack/, which may import nothing of
tapbox) is given these by tapbox.net.engine.sandbox_interface; its own defaults only serve its
tests.
"""

from __future__ import annotations

TAP_NAME = "tap0"
SANDBOX_NETWORK = "10.0.2.0/24"  # the sandbox's link; nothing in it is reachable but tapbox
SANDBOX_NETWORK6 = "fd00::/64"
TAP_ADDRESS = "10.0.2.100"
TAP_PREFIXLEN = 24
GATEWAY_ADDRESS = "10.0.2.2"
DNS_ADDRESS = "10.0.2.3"
TAP_ADDRESS6 = "fd00::100"
TAP_PREFIXLEN6 = 64
GATEWAY_ADDRESS6 = "fd00::2"
DNS_ADDRESS6 = "fd00::3"
DEFAULT_MTU = 65520  # as slirp4netns and pasta use
