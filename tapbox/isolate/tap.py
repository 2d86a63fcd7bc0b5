"""The sandbox's only link: tap0, opened inside its network namespace and configured there.

How this works: a TAP device belongs to the network namespace of the process that opens
/dev/net/tun, so the child opens it after unsharing its netns and creates tap0 with TUNSETIFF
(IFF_TAP | IFF_NO_PI, and IFF_VNET_HDR with TUNSETOFFLOAD(TUN_F_CSUM) so frames carry a
virtio-net header and checksums are left to the kernel: netstack.wire.vnet). The fd goes back to
tapbox over the control socket; the engine holds it, so the link dies with tapbox.
`configure_links` uses pyroute2 (netlink, no `ip` binary): lo up; tap0's MTU, 10.0.2.100/24, up,
default route via 10.0.2.2; with IPv6 also fd00::100/64 (no DAD: the address is ours alone) and
a default route via fd00::2 (tapbox.layout).
"""

from __future__ import annotations

import errno
import fcntl
import os
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
_IFA_F_NODAD = 0x02  # the address is ours alone on this link: skip duplicate detection


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
    """lo up; with `network`, tap0 addressed and up with default routes."""
    try:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError
    except ImportError as e:
        raise SetupError(
            f"tapbox: cannot import pyroute2 ({e}): install it (pip install pyroute2)"
        ) from None
    step = "bringing lo up"
    try:
        with IPRoute() as ipr:
            ipr.link("set", index=1, state="up")  # lo is always ifindex 1 in a new netns
            if not network:
                return
            step = f"configuring {TAP_NAME}"
            (index,) = ipr.link_lookup(ifname=TAP_NAME)
            ipr.link("set", index=index, mtu=mtu)
            ipr.addr("add", index=index, address=TAP_ADDRESS, prefixlen=TAP_PREFIXLEN)
            ipr.link("set", index=index, state="up")
            step = f"adding the default route via {GATEWAY_ADDRESS}"
            ipr.route("add", dst="0.0.0.0/0", gateway=GATEWAY_ADDRESS)
            if ipv6:
                step = f"configuring IPv6 on {TAP_NAME} (use --ipv6 off if IPv6 is disabled)"
                ipr.addr("add", index=index, address=TAP_ADDRESS6, prefixlen=TAP_PREFIXLEN6,
                         flags=_IFA_F_NODAD)
                ipr.route("add", dst="::/0", gateway=GATEWAY_ADDRESS6, oif=index)
    except NetlinkError as e:
        if e.code == errno.EPERM:
            raise SetupError(eperm_failure(f"{step}: {e}", host)) from None
        if e.code == errno.EINVAL and step.startswith("configuring"):
            raise SetupError(
                f"tapbox: {step}: {os.strerror(e.code)}: is the MTU {mtu} valid "
                "(68..65521 for a TAP)?"
            ) from None
        raise SetupError(f"tapbox: {step} failed: {os.strerror(e.code)}") from None
