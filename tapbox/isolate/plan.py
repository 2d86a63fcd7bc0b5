"""The sandbox's filesystem set-up as data: an ordered list of operations, read in one file.

How this works (bubblewrap's setup-op list): `build()` turns a SandboxConfig into a `Plan`, a
tuple of small frozen operations, in the parent, before the fork; pid 1 of the sandbox then
executes them in order (tapbox.isolate.mounts.apply), inside its own user, mount and PID
namespaces, where every mount is already private. Nothing here changes the system, so a plan can
be printed (`Plan.describe()`) and tested without namespaces. Adding a kind of mount means adding
an operation here and its executor in mounts.py; the order of the list is the order of the mounts.

Today's view: the host's filesystem as it is, plus
- a fresh sysfs on /sys, so /sys/class/net lists the sandbox's links, not the host's (best
  effort: the old submounts such as /sys/fs/cgroup are carried over; any failure keeps the old);
- with a network, a private resolv.conf (naming tapbox's DNS, 10.0.2.3) bind-mounted over
  /etc/resolv.conf (or over the file it links to), inside only;
- a fresh /proc for the sandbox's PID namespace: `ps` inside lists the sandbox's processes only;
- tapbox's record files (--log, --pcap, --learn) read-only: each is bound read-only over itself
  (writes, truncation, chmod: EROFS; unlink, rename: EBUSY; a hard link: EXDEV), and then every
  directory above it is bound over itself ("pinned"): a mount point cannot be renamed or removed,
  so the command cannot move the directory away and put a forged file at the same path. The
  files first, then the directories deepest first: each copy made by pinning carries the
  read-only mounts below it, so every way down to the file, even from a working directory
  opened before the pinning, ends on a read-only mount. tapbox itself writes these files
  through descriptors it opened before the sandbox existed, outside its mount namespace.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from tapbox.errors import SetupError
from tapbox.isolate.config import SandboxConfig

RESOLV_CONF = "/etc/resolv.conf"


@dataclass(frozen=True)
class FreshSysfs:
    """A sysfs of the sandbox's network namespace on `path`, keeping the old submounts."""

    path: str = "/sys"

    def describe(self) -> str:
        return f"sysfs {self.path} (best effort; submounts carried over)"


@dataclass(frozen=True)
class BindFile:
    """Bind-mount the file `source` over the existing file `dest` (a symlink is followed)."""

    source: str
    dest: str
    purpose: str  # what the file is, for messages: "a private resolv.conf"
    otherwise: str  # the alternative offered when `dest` is missing: "run tapbox -n"

    def describe(self) -> str:
        return f"bind {self.source} -> {self.dest} ({self.purpose})"


@dataclass(frozen=True)
class FreshProc:
    """A proc of the sandbox's PID namespace on `path` (mounted by pid 1 inside)."""

    path: str = "/proc"

    def describe(self) -> str:
        return f"proc {self.path} (the sandbox's PID namespace)"


@dataclass(frozen=True)
class ReadOnlyFile:
    """Bind the regular file `path` read-only over itself; it must still be (dev, ino)."""

    path: str
    dev: int
    ino: int

    def describe(self) -> str:
        return f"read-only {self.path}"


@dataclass(frozen=True)
class Pin:
    """Bind the directory `path` over itself (with its submounts): no rename, no removal."""

    path: str

    def describe(self) -> str:
        return f"pin {self.path} (cannot be renamed or removed)"


Op = FreshSysfs | BindFile | FreshProc | ReadOnlyFile | Pin


@dataclass(frozen=True)
class Plan:
    ops: tuple[Op, ...]

    def describe(self) -> list[str]:
        """One line per operation, in the order pid 1 executes them."""
        return [op.describe() for op in self.ops]


def build(config: SandboxConfig, resolv_path: str | None,
          stat_path: Callable[[str], os.stat_result] = os.stat) -> Plan:
    """The operations for `config`; `resolv_path` is the private resolv.conf (network only).

    `stat_path` identifies the record files (tests pass their own).
    """
    ops: list[Op] = [FreshSysfs()]
    if config.network:
        assert resolv_path is not None
        ops.append(BindFile(resolv_path, RESOLV_CONF, "a private resolv.conf", "run tapbox -n"))
    ops.append(FreshProc())
    ops.extend(_read_only_files(config.read_only_files, stat_path))
    return Plan(tuple(ops))


def _read_only_files(paths: tuple[str, ...],
                     stat_path: Callable[[str], os.stat_result]) -> list[Op]:
    files: list[Op] = []
    pins: set[str] = set()
    seen: set[str] = set()
    for given in paths:
        path = os.path.realpath(given)
        try:
            st = stat_path(path)
        except OSError as e:
            raise SetupError(
                f"tapbox: {given}: {e.strerror}: tapbox cannot make it read-only in the sandbox"
            ) from None
        if not stat.S_ISREG(st.st_mode) or path in seen:
            continue  # a terminal, a pipe, /dev/null: nothing to rewrite afterwards
        seen.add(path)
        files.append(ReadOnlyFile(path, st.st_dev, st.st_ino))
        parent = os.path.dirname(path)
        while parent != "/":
            pins.add(parent)
            parent = os.path.dirname(parent)
    ordered = sorted(pins, key=lambda p: (-p.count("/"), p))  # deepest first
    return [*files, *(Pin(p) for p in ordered)]
