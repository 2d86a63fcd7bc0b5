"""The sandbox's only link: tap0, opened inside its network namespace and configured there.

How this works: a TAP device belongs to the network namespace of the process that opens
/dev/net/tun, so the child opens it after unsharing its netns and creates tap0 with TUNSETIFF
(IFF_TAP | IFF_NO_PI, and IFF_VNET_HDR with TUNSETOFFLOAD(TUN_F_CSUM) so frames carry a
virtio-net header and checksums are left to the kernel: netstack.wire.vnet). The fd goes back to
tapbox over the control socket; the engine holds it, so the link dies with tapbox.
`configure_links` speaks rtnetlink itself (tapbox.rtnetlink: a few messages, no `ip` binary and
no netlink library to import on the sandbox's start-up path): lo up; tap0's MTU, 10.0.2.100/24,
up, default route via 10.0.2.2; with IPv6 also fd00::100/64 (no DAD: the address is ours alone)
and a default route via fd00::2 (tapbox.layout).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

from tapbox.errors import SetupError
from tapbox.isolate.diagnose import Host, eperm_failure, tun_missing, tun_permission_failure
from tapbox.layout import (
    GATEWAY_ADDRESS,
    GATEWAY_ADDRESS6,
    TAP_ADDRESS,
    TAP_ADDRESS6,
    TAP_NAME,
    TAP_PREFIXLEN,
    TAP_PREFIXLEN6,
)
from tapbox.rtnetlink import IFA_F_NODAD, Route

TUN_DEVICE = "/dev/net/tun"

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000  # every frame carries a virtio-net header (netstack.wire.vnet)
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
TUN_F_CSUM = 0x01  # we accept frames whose TCP/UDP checksum the kernel left for later
IFNAMSIZ = 16
_IFREQ = struct.Struct(f"{IFNAMSIZ}sH22x")  # struct ifreq: name, ifr_flags, union padding (40 B)


def open_tap(host: Host, vnet_hdr: bool) -> int:
    """Create tap0 in the current network namespace; its fd (non-blocking, close-on-exec)."""
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise SetupError(tun_missing(TUN_DEVICE, host)) from None
    except PermissionError:
        raise SetupError(tun_permission_failure(TUN_DEVICE)) from None
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.ENODEV):
            raise SetupError(
                f"tapbox: {TUN_DEVICE} exists but the tun driver is not loaded ({e.strerror}): "
                "load it (modprobe tun) or run tapbox -n"
            ) from None
        raise SetupError(
            f"tapbox: cannot open {TUN_DEVICE}: {e.strerror}: run tapbox -n to go without network"
        ) from None
    try:
        flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
        fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(TAP_NAME.encode(), flags))
        if vnet_hdr:
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM)
    except OSError as e:
        os.close(fd)
        if e.errno == errno.EPERM:
            raise SetupError(eperm_failure(f"creating {TAP_NAME}: {e.strerror}", host)) from None
        raise SetupError(
            f"tapbox: cannot create {TAP_NAME} on {TUN_DEVICE}: {e.strerror}: "
            "is this kernel built with CONFIG_TUN? Run tapbox -n to go without network"
        ) from None
    return fd


def configure_links(host: Host, network: bool, mtu: int, ipv6: bool) -> None:
    """lo up; with `network`, tap0 addressed and up with default routes (tapbox.layout)."""
    step = "bringing lo up"
    try:
        with Route() as route:
            route.set_link(1, up=True)  # lo is always ifindex 1 in a new netns
            if not network:
                return
            step = f"configuring {TAP_NAME}"
            index = socket.if_nametoindex(TAP_NAME)
            if not ipv6:
                _disable_ipv6(TAP_NAME)
            route.set_link(index, mtu=mtu)
            route.add_address(index, TAP_ADDRESS, TAP_PREFIXLEN)
            route.set_link(index, up=True)
            step = f"adding the default route via {GATEWAY_ADDRESS}"
            route.add_default_route(GATEWAY_ADDRESS, index)
            if ipv6:
                step = f"configuring IPv6 on {TAP_NAME} (use --ipv6 off if IPv6 is disabled)"
                route.add_address(index, TAP_ADDRESS6, TAP_PREFIXLEN6, IFA_F_NODAD)
                route.add_default_route(GATEWAY_ADDRESS6, index)
    except OSError as e:
        code = e.errno or 0
        if code == errno.EPERM:
            raise SetupError(eperm_failure(f"{step}: {e.strerror}", host)) from None
        if code == errno.EINVAL and step.startswith("configuring"):
            raise SetupError(
                f"tapbox: {step}: {os.strerror(code)}: is the MTU {mtu} valid "
                "(68..65521 for a TAP)?"
            ) from None
        raise SetupError(f"tapbox: {step} failed: {e.strerror or e}") from None


def _disable_ipv6(link: str) -> None:
    """No IPv6 on `link` when the sandbox has none: no link-local address, and none of the
    multicast listener reports (RFC 3810 §6) and router solicitations (RFC 4861 §6.3.7) the
    kernel would otherwise send to the engine as the link comes up. A kernel without IPv6 has
    nothing to disable."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{link}/disable_ipv6", "w") as knob:
            knob.write("1")
    except FileNotFoundError:
        pass
