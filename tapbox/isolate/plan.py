"""The sandbox's filesystem set-up as data: an ordered list of operations, read in one file.

How this works (bubblewrap's setup-op list): `build()` turns a SandboxConfig into a `Plan`, a
tuple of small frozen operations, in the parent, before the fork; the child then executes them
in order (tapbox.isolate.mounts.apply), after it has entered its namespaces and made every mount
private. Nothing here touches the system, so a plan can be printed (`Plan.describe()`) and
tested without namespaces. Adding a kind of mount means adding an operation here and its
executor in mounts.py; the order of the list is the order of the mounts.

Today's view: the host's filesystem as it is, plus
- a fresh sysfs on /sys, so /sys/class/net lists the sandbox's links, not the host's (best
  effort: the old submounts such as /sys/fs/cgroup are carried over; any failure keeps the old);
- with a network, a private resolv.conf (naming tapbox's DNS, 10.0.2.3) bind-mounted over
  /etc/resolv.conf (or over the file it links to), inside only.
"""

from __future__ import annotations

from dataclasses import dataclass

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


Op = FreshSysfs | BindFile


@dataclass(frozen=True)
class Plan:
    ops: tuple[Op, ...]

    def describe(self) -> list[str]:
        """One line per operation, in the order the child executes them."""
        return [op.describe() for op in self.ops]


def build(config: SandboxConfig, resolv_path: str | None) -> Plan:
    """The operations for `config`; `resolv_path` is the private resolv.conf (network only)."""
    ops: list[Op] = [FreshSysfs()]
    if config.network:
        assert resolv_path is not None
        ops.append(BindFile(resolv_path, RESOLV_CONF, "a private resolv.conf", "run tapbox -n"))
    return Plan(tuple(ops))
