"""What the caller asks of a sandbox: the command and how the sandbox looks from inside."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tapbox.layout import DEFAULT_MTU, DNS_ADDRESS
from tapbox.options import FilesystemOptions

if TYPE_CHECKING:  # the filter is built in the child: the parent need not import seccomp
    from tapbox.isolate.layerdir import LayerDir
    from tapbox.isolate.seccomp import Policy


@dataclass
class SandboxConfig:
    """What to run and how the sandbox looks from inside.

    `argv` is the command pid 2 execs; None: pid 2 is the calling Python program itself,
    continuing inside the sandbox (`Sandbox.fork()` returns there, as os.fork() does).
    """

    argv: list[str] | None
    network: bool = True  # False = `-n`: only lo, no TAP (no engine), no resolv.conf
    mtu: int = DEFAULT_MTU
    root: bool = False  # --root: uid/gid 0 inside (fakeroot), else the caller's uid/gid numbers
    resolv_conf: str = f"nameserver {DNS_ADDRESS}\n"
    ipv6: bool = False  # also fd00::100/64 on tap0, default route via fd00::2
    vnet_hdr: bool = True  # IFF_VNET_HDR with checksum offload (the engine must expect it)
    syscalls: Policy | None = None  # CMD's seccomp filter; None: isolate.seccomp.DEFAULT_POLICY
    notify: bool = True  # name refused system calls (a listener for tapbox's supervisor)
    nest: bool = True  # False: --no-nest, no user namespaces inside (isolate.namespaces)
    landlock: bool = False  # Landlock rules mirroring the plan's read-only parts (isolate.landlock)
    # Resource limits of the command's process and its children: (RLIMIT_*, value) pairs.
    rlimits: tuple[tuple[int, int], ...] = ()
    # Files the sandbox must not write (tapbox's own records: --log, --pcap, --learn): read-only
    # inside, and their directories cannot be renamed (isolate.plan).
    read_only_files: tuple[str, ...] = ()
    # What the command sees of the host's files (the view and the --write/--read/--hide/--tmpfs
    # paths): tapbox.isolate.plan and rootfs. The default is the project view.
    filesystem: FilesystemOptions = field(default_factory=FilesystemOptions)
    # The copy-on-write view (filesystem.view "overlay"): the layer directory its writes go to.
    layer: LayerDir | None = None
    # The command's environment: tapbox's own, changed as tapbox.isolate.environment says.
    setenv: tuple[str, ...] = ()  # "VAR=VALUE"
    unsetenv: tuple[str, ...] = ()
    clearenv: bool = False
    # The command's process, as subprocess.Popen sets it up: descriptors dup'ed onto its stdin,
    # stdout and stderr (None: tapbox's own), descriptors it keeps besides those (`pass_fds`),
    # its working directory (None: tapbox's; the project view makes it the writable one) and
    # the environment the above changes start from (None: tapbox's own).
    stdio: tuple[int | None, int | None, int | None] = (None, None, None)
    pass_fds: tuple[int, ...] = ()
    cwd: str | None = None
    env: Mapping[str, str] | None = None
