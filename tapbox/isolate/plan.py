"""The sandbox's filesystem set-up as data: an ordered list of operations, read in one file.

How this works (bubblewrap's setup-op list): `build()` turns a SandboxConfig into a `Plan`, a
tuple of small frozen operations, in the parent, before the fork; pid 1 of the sandbox then
executes them in order (tapbox.isolate.mounts.apply), inside its own user, mount and PID
namespaces, where every mount is already private. Nothing here changes the system, so a plan can
be printed (`Plan.describe()`, shown by -v) and tested without namespaces. Adding a kind of mount
means adding an operation here and its executor in mounts.py; the order of the list is the
order of the mounts, and a later mount on a path covers what an earlier one put there.

Every path in an operation is absolute and free of symlinks (resolved on the host before the
fork): `source` is a path of the host's tree, `path`/`dest` a path of the sandbox's. In the
"host" view both trees are the same. In the "project" view (tapbox.isolate.rootfs builds its
operations) `NewRoot` starts an empty tree and `PivotRoot` makes it the root: in between the
executor finds the host's tree under /oldroot and builds the new one under /newroot.

The two views, in the order of their operations:

- project (the default): NewRoot; each top-level directory of the host bound read-only (and
  recursively: with the mounts below it), each top-level symlink recreated; a minimal /dev
  (device nodes bound from the host, a new devpts instance, a private /dev/shm); a fresh
  /proc and a read-only fresh /sys; empty tmpfs on /tmp, /run and $XDG_RUNTIME_DIR; $HOME as
  an overlay whose upper layer is a throwaway tmpfs; the working directory bound writable;
  the secrets hidden; the --write/--read/--hide/--tmpfs paths in order; the private
  resolv.conf; the record files read-only; tapbox's own tmpfs mounts (the new root, /dev, the
  hidden directories) made read-only; PivotRoot.
- overlay (the copy-on-write view): as project, but each top-level directory is an overlay
  whose upper layer is kept on disk (KeptLayer, KeptOverlay; where something is mounted
  inside a directory, one overlay per directory below it), the home and the working
  directory included (their own overlays where they lie in a directory the view replaces,
  such as /tmp), and the layers' own directory hidden. docs/overlay.md.
- host: the host's filesystem as it is, plus a fresh sysfs (best effort: /sys/class/net then
  lists the sandbox's links), the private resolv.conf, a fresh /proc, the path options, the
  record files read-only.

The private resolv.conf (naming tapbox's DNS, 10.0.2.3) is bound over /etc/resolv.conf or
the file it links to, inside only. tapbox's record files (--log, --pcap, --learn) are bound
read-only over themselves (writes, truncation, chmod: EROFS; unlink, rename: EBUSY; a hard
link: EXDEV), and then every directory above them is bound over itself ("pinned"): a mount
point cannot be renamed or removed, so the command cannot move the directory away and put a
forged file at the same path. The files first, then the directories deepest first: each copy
made by pinning carries the read-only mounts below it, so every way down to the file, even
from a working directory opened before the pinning, ends on a read-only mount. tapbox itself
writes these files through descriptors it opened before the sandbox existed, outside its mount
namespace. Where the sandbox does not see the file itself (it is under the private /tmp, or a
copy-on-write copy of it), there is nothing to protect.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import NamedTuple

from tapbox.errors import SetupError
from tapbox.isolate.config import SandboxConfig

RESOLV_CONF = "/etc/resolv.conf"


class NewRoot(NamedTuple):
    """Start building an empty root (a tmpfs); the host's tree stays reachable meanwhile."""

    def describe(self) -> str:
        return "new root: an empty tmpfs, filled by the operations below"


class Bind(NamedTuple):
    """Bind the host's `source` (with the mounts below it) at `dest`, writable or read-only."""

    source: str
    dest: str
    writable: bool
    directory: bool = True  # False: a file (or another non-directory) bound over a file
    purpose: str = ""

    def describe(self) -> str:
        where = self.source if self.dest == self.source else f"{self.source} -> {self.dest}"
        return f"{'bind' if self.writable else 'ro-bind'} {where}" + _purpose(self.purpose)


class Symlink(NamedTuple):
    """A symlink at `path` pointing to `target` (a top-level link such as /bin -> usr/bin)."""

    target: str
    path: str

    def describe(self) -> str:
        return f"symlink {self.path} -> {self.target}"


class Tmpfs(NamedTuple):
    """An empty tmpfs on `path` with the permissions `mode`."""

    path: str
    mode: int
    purpose: str = ""

    def describe(self) -> str:
        return f"tmpfs {self.path} (mode {self.mode:04o}" + \
            (f"; {self.purpose})" if self.purpose else ")")


class Device(NamedTuple):
    """The host's device node `path` bound at the same path (/dev/null, /dev/tty...)."""

    path: str

    def describe(self) -> str:
        return f"device {self.path}"


class Devpts(NamedTuple):
    """A new devpts instance on `path`: the sandbox's own pseudo-terminals."""

    path: str = "/dev/pts"

    def describe(self) -> str:
        return f"devpts {self.path} (a new instance; /dev/ptmx links to it)"


class HomeOverlay(NamedTuple):
    """An overlay on `path` (the home directory, or one directory of it): reads come from the
    host's directory, writes go to upper layer number `layer` on a tmpfs of tapbox's, which
    tapbox counts at exit and discards."""

    path: str
    layer: int = 0

    def describe(self) -> str:
        return f"overlay {self.path} (copy-on-write: writes go to a layer discarded at exit)"


class KeptLayer(NamedTuple):
    """Bind the kept layer's directory `source` (tapbox.isolate.layerdir: upper/N, work/N) at
    a fixed place of tapbox's staging tree, so no path of the user's goes into an overlay's
    options. Never in the sandbox's view (the view hides it)."""

    source: str

    def describe(self) -> str:
        return f"layer {self.source} (where every write goes; hidden from the sandbox)"


class KeptOverlay(NamedTuple):
    """An overlay on `path` whose upper layer is number `layer` of the kept layer (the
    copy-on-write view): reads come from the host's directory, writes are kept for review."""

    path: str
    layer: int = 0

    def describe(self) -> str:
        return f"overlay {self.path} (copy-on-write: writes go to kept layer {self.layer})"


class Hide(NamedTuple):
    """Make `path` empty and inaccessible: a directory gets an empty tmpfs of `mode` (0000, or
    0111 when something is exposed inside it), anything else the empty file `source` (mode
    0000; in the project view one on the tmpfs NewRoot builds on). Both end read-only."""

    path: str
    directory: bool
    mode: int = 0
    source: str = ""  # the empty file bound over a non-directory ("": the new root's own)
    purpose: str = ""

    def describe(self) -> str:
        what = f"an empty directory, mode {self.mode:04o}" if self.directory else "an empty file"
        return f"hide {self.path} ({what}" + (f"; {self.purpose})" if self.purpose else ")")


class FreshSysfs(NamedTuple):
    """A sysfs of the sandbox's network namespace on `path`, keeping the old submounts.

    In the host view, best effort (the old /sys stays if it fails); read-only, it falls back
    to the host's /sys bound read-only."""

    path: str = "/sys"
    read_only: bool = False

    def describe(self) -> str:
        if self.read_only:
            return f"sysfs {self.path} (read-only; the host's, read-only, if refused)"
        return f"sysfs {self.path} (best effort; submounts carried over)"


class BindFile(NamedTuple):
    """Bind-mount the file `source` over the existing file `dest`."""

    source: str
    dest: str
    purpose: str  # what the file is, for messages: "a private resolv.conf"
    otherwise: str  # the alternative offered when `dest` is missing: "run tapbox -n"

    def describe(self) -> str:
        return f"bind {self.source} -> {self.dest} ({self.purpose})"


class FreshProc(NamedTuple):
    """A proc of the sandbox's PID namespace on `path` (mounted by pid 1 inside)."""

    path: str = "/proc"

    def describe(self) -> str:
        return f"proc {self.path} (the sandbox's PID namespace)"


class ReadOnlyFile(NamedTuple):
    """Bind the regular file `path` read-only over itself; it must still be (dev, ino).
    `layered`: the sandbox sees it through a copy-on-write overlay (the overlay view), which
    shows the same inode number on a device of its own: the host's file is bound there."""

    path: str
    dev: int
    ino: int
    layered: bool = False

    def describe(self) -> str:
        return f"read-only {self.path}"


class Pin(NamedTuple):
    """Bind the directory `path` over itself (with its submounts): no rename, no removal."""

    path: str

    def describe(self) -> str:
        return f"pin {self.path} (cannot be renamed or removed)"


class ReadOnly(NamedTuple):
    """Make the tmpfs tapbox mounted on `path` read-only, now that everything is mounted on
    it (the mounts on it keep their own flags)."""

    path: str
    purpose: str = ""

    def describe(self) -> str:
        return f"read-only {self.path}" + _purpose(self.purpose)


class PivotRoot(NamedTuple):
    """Make the new root the sandbox's root, drop the host's tree, enter `cwd`."""

    cwd: str

    def describe(self) -> str:
        return f"pivot_root into the new root (the host's tree is gone); cd {self.cwd}"


Op = (NewRoot | Bind | Symlink | Tmpfs | Device | Devpts | HomeOverlay | KeptLayer
      | KeptOverlay | Hide | FreshSysfs | BindFile | FreshProc | ReadOnlyFile | Pin | ReadOnly
      | PivotRoot)
OPS = (NewRoot, Bind, Symlink, Tmpfs, Device, Devpts, HomeOverlay, KeptLayer, KeptOverlay, Hide,
       FreshSysfs, BindFile, FreshProc, ReadOnlyFile, Pin, ReadOnly, PivotRoot)


# The operations are NamedTuples (tapbox defines them on every start: a frozen dataclass costs
# about ten times more), compared as operations, not as tuples: Pin("/x") != Device("/x").
def _equal(self: tuple[object, ...], other: object) -> bool:
    if not isinstance(other, tuple):
        return NotImplemented
    return type(self) is type(other) and tuple.__eq__(self, other)


def _not_equal(self: tuple[object, ...], other: object) -> bool:
    equal = _equal(self, other)
    return equal if equal is NotImplemented else not equal


def _hash(self: tuple[object, ...]) -> int:
    return hash((type(self).__name__, tuple(self)))


for _op in OPS:
    _op.__eq__ = _equal  # type: ignore[assignment,method-assign]
    _op.__ne__ = _not_equal  # type: ignore[assignment,method-assign]
    _op.__hash__ = _hash  # type: ignore[assignment,method-assign]


class Plan(NamedTuple):
    ops: tuple[Op, ...]
    # One line each for the user, said before the command runs (the working directory that is
    # not made writable, and why).
    notices: tuple[str, ...] = ()
    # The sandbox's $XDG_RUNTIME_DIR (project view), for the command's environment.
    runtime_dir: str | None = None
    home: str | None = None  # the home directory made copy-on-write (or parts of it), if any
    # The directories of the copy-on-write home, by layer number: what the layers are counted
    # against at exit (tapbox.isolate.discarded).
    layers: tuple[str, ...] = ()
    # The copy-on-write view: the kept layers' numbers and the modes of their host
    # directories (tapbox.isolate.layerdir prepares upper/N with them).
    kept: tuple[tuple[int, int], ...] = ()

    def describe(self) -> list[str]:
        """One line per operation, in the order pid 1 executes them."""
        return [op.describe() for op in self.ops]


def build(config: SandboxConfig, resolv_path: str | None, empty_file: str = "",
          stat_path: Callable[[str], os.stat_result] = os.stat,
          facts: object | None = None, layer: object | None = None) -> Plan:
    """The operations for `config`; `resolv_path` is the private resolv.conf (network only),
    `empty_file` an empty file of mode 0000 to hide files with in the host view (the project
    view has its own, on the tmpfs its root is built on, that nothing ever unlinks: a nested
    tapbox can still mount over what it hid).

    `stat_path` identifies the record files, `facts` (a rootfs.HostFacts) describes the host
    for the project view (tests pass their own).
    """
    from tapbox.isolate import rootfs

    resolv = None
    if config.network:
        assert resolv_path is not None
        resolv = BindFile(resolv_path, os.path.realpath(RESOLV_CONF), "a private resolv.conf",
                          "run tapbox -n")
    records = _read_only_files(config.read_only_files, stat_path)
    if config.filesystem.view == "host":
        ops: list[Op] = [FreshSysfs()]
        if resolv is not None:
            ops.append(resolv)
        ops.append(FreshProc())
        layered, sealed = rootfs.path_ops(config.filesystem.paths, config.cwd or os.getcwd(),
                                          empty_file)
        ops.extend(layered)
        ops.extend(records)
        ops.extend(ReadOnly(path, "hidden") for path in sealed)
        return Plan(tuple(ops))
    host = facts if isinstance(facts, rootfs.HostFacts) else rootfs.HostFacts.collect(
        config.root, config.env, cwd=config.cwd, overlay=config.filesystem.view == "overlay")
    return rootfs.project_plan(config.filesystem, host, resolv, records, layer)


def _purpose(purpose: str) -> str:
    return f" ({purpose})" if purpose else ""


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
