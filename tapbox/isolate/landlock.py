"""Landlock as a second layer under the mount plan: what the plan makes read-only, Landlock
makes read-only too, so a mistake in a mount does not become a write (--landlock).

How this works
--------------
The rules are derived from the plan's operations as data (tapbox.isolate.plan), never written
by hand: `READINGS` says, for each kind of operation, which path it leaves writable or read-only
(a `Claim`): a writable or read-only bind its destination, a tmpfs, a device, an overlay
writable, a hidden path or a tmpfs made read-only read-only, a new root read-only. An operation
this module has no reading for makes the whole layer step aside (with a note): Landlock rules
that do not match the view would break the command, and the mounts still enforce everything. A
test checks that every operation of the plan has a reading.

Landlock grants; it cannot take away. A ruleset "handles" the write rights (write a file,
truncate, create, remove, rename across directories) and then allows them only beneath the
paths given a rule. So from the claims:
- the root's own state comes first: writable unless an operation claims "/" read-only (the
  host view today; the project view of the isolation work makes it read-only);
- a writable path below a read-only one gets a rule with every write right;
- a read-only path below a writable one cannot be expressed (a rule on its directory would
  cover its siblings, and none on the directory would forbid creating files beside it): it is
  left to its mount, and reported;
- /dev and /proc stay writable (devices such as /dev/null and the terminal, /proc/self/...).
With a writable root and nothing expressible below it there is nothing to add, and no ruleset
is loaded: a Landlock domain also forbids mounting, which a tapbox nested inside needs.

Pid 1 loads the ruleset after its mounts and no_new_privs, just before the seccomp filter; the
command inherits it. Where the kernel lacks Landlock (ENOSYS, EOPNOTSUPP: disabled at boot),
nothing changes but a note under -v. The rights handled follow the kernel's ABI version
(REFER from 2, TRUNCATE from 3). The kernel interface (<linux/landlock.h>) is reached through
syscall(2): its numbers are the same on every architecture.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from tapbox.isolate import plan as plan_mod

SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1

# LANDLOCK_ACCESS_FS_*
WRITE_FILE = 1 << 1
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
_WRITES_V1 = (WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_CHAR | MAKE_DIR | MAKE_REG
              | MAKE_SOCK | MAKE_FIFO | MAKE_BLOCK | MAKE_SYM)
_FILE_RIGHTS = WRITE_FILE | TRUNCATE  # the write rights a rule on a non-directory may carry

ALWAYS_WRITABLE = ("/dev", "/proc")


class Claim(NamedTuple):
    """What an operation leaves at `path`: writable, or read-only."""

    path: str
    writable: bool


def _claim(attr: str, writable: bool) -> Callable[[Any], tuple[Claim, ...]]:
    return lambda op: (Claim(getattr(op, attr), writable),)


def _none(op: Any) -> tuple[Claim, ...]:
    return ()


# One reading per kind of operation (see the module doc), by the operation's class name: the
# claims it makes. The names of the project view's operations (the isolation work's rootfs) are
# here too, so that its plan is read as soon as it exists.
READINGS: dict[str, Callable[[Any], tuple[Claim, ...]]] = {
    "FreshSysfs": lambda op: (Claim(op.path, False),) if getattr(op, "read_only", False) else (),
    "BindFile": _none,  # the private resolv.conf: inherits its directory
    "FreshProc": _claim("path", True),
    "ReadOnlyFile": _claim("path", False),
    "Pin": _none,  # the same files, only harder to move
    "NewRoot": lambda op: (Claim("/", False),),
    "Bind": lambda op: (Claim(op.dest, bool(op.writable)),),
    "Symlink": _none,
    "Tmpfs": _claim("path", True),
    "Device": _claim("path", True),
    "Devpts": _claim("path", True),
    "HomeOverlay": _claim("path", True),
    "KeptLayer": _none,  # staging only: not in the sandbox's view
    "KeptOverlay": _claim("path", True),  # copy-on-write: writable, into the kept layer
    "Hide": _claim("path", False),
    "ReadOnly": _claim("path", False),
    "PivotRoot": _none,
}


class Rules(NamedTuple):
    """What Landlock can enforce of a plan."""

    writable: tuple[str, ...]  # paths granted every write right (below a read-only root)
    root_writable: bool
    left_to_mounts: tuple[str, ...]  # read-only paths below writable ones: not expressible
    unknown: str | None = None  # an operation without a reading: the layer steps aside

    @property
    def enforces_anything(self) -> bool:
        return self.unknown is None and not self.root_writable


def rules_for(plan: plan_mod.Plan) -> Rules:
    """The Landlock rules a plan's view calls for."""
    claims: list[Claim] = []
    for op in plan.ops:
        reading = READINGS.get(type(op).__name__)
        if reading is None:
            return Rules((), True, (), type(op).__name__)
        claims.extend(reading(op))
    root_writable = True
    by_path: dict[str, bool] = {}
    for claim in claims:  # later operations win, as later mounts cover earlier ones
        path = os.path.normpath(claim.path)
        if path == "/":
            root_writable = claim.writable
        else:
            by_path[path] = claim.writable
    for path in ALWAYS_WRITABLE:
        by_path.setdefault(path, True)
    writable: list[str] = []
    left: list[str] = []
    for path in sorted(by_path, key=lambda p: (p.count("/"), p)):
        inherited = _inherited(path, by_path, root_writable)
        if by_path[path] and not inherited:
            writable.append(path)
        elif not by_path[path] and inherited:
            left.append(path)
    return Rules(tuple(writable), root_writable, tuple(left))


def _inherited(path: str, by_path: dict[str, bool], root_writable: bool) -> bool:
    parent = os.path.dirname(path)
    while parent != "/":
        if parent in by_path:
            return by_path[parent]
        parent = os.path.dirname(parent)
    return root_writable


class _Libc:
    def __init__(self) -> None:
        self.lib = ctypes.CDLL(None, use_errno=True)
        self.lib.syscall.restype = ctypes.c_long

    def call(self, nr: int, *args: Any) -> int:
        rc = int(self.lib.syscall(ctypes.c_long(nr), *args))
        return rc if rc >= 0 else -ctypes.get_errno()


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]  # the ABI 1 size: enough here


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def abi_version(libc: _Libc | None = None) -> int:
    """The kernel's Landlock ABI version; 0 where it has none (or it is disabled)."""
    libc = libc or _Libc()
    rc = libc.call(SYS_CREATE_RULESET, None, ctypes.c_size_t(0),
                   ctypes.c_uint32(CREATE_RULESET_VERSION))
    return max(rc, 0)


def handled_rights(abi: int) -> int:
    return _WRITES_V1 | (REFER if abi >= 2 else 0) | (TRUNCATE if abi >= 3 else 0)


def enforce(plan: plan_mod.Plan, abi: int | None = None) -> str:
    """Load the rules for `plan` on the calling thread (no_new_privs must be set); returns one
    line on what was done, for -v. Raises OSError only if the kernel has Landlock and refuses
    a rule (the command then does not run)."""
    rules = rules_for(plan)
    if rules.unknown is not None:
        return (f"landlock: not used: the view has an operation it cannot read "
                f"({rules.unknown}); the mounts alone enforce it")
    if not rules.enforces_anything:
        left = f" ({', '.join(rules.left_to_mounts)} read-only by their mounts only)" \
            if rules.left_to_mounts else ""
        return f"landlock: nothing to add: the view is writable but for single files{left}"
    libc = _Libc()
    abi = abi_version(libc) if abi is None else abi
    if abi < 1:
        return "landlock: not supported by this kernel: the mounts alone enforce the view"
    handled = handled_rights(abi)
    attr = _RulesetAttr(handled)
    ruleset = libc.call(SYS_CREATE_RULESET, ctypes.byref(attr),
                        ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(-ruleset, f"landlock_create_ruleset: {os.strerror(-ruleset)}")
    try:
        for path in rules.writable:
            _allow_beneath(libc, ruleset, path, handled)
        rc = libc.call(SYS_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0))
        if rc < 0:
            raise OSError(-rc, f"landlock_restrict_self: {os.strerror(-rc)}")
    finally:
        os.close(ruleset)
    left = f"; {', '.join(rules.left_to_mounts)} read-only by their mounts only" \
        if rules.left_to_mounts else ""
    return (f"landlock (ABI {abi}): read-only everywhere but {', '.join(rules.writable)}{left}")


def _allow_beneath(libc: _Libc, ruleset: int, path: str, handled: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # nothing there to write to
    try:
        is_dir = os.path.isdir(f"/proc/self/fd/{fd}")
        attr = _PathBeneath(handled if is_dir else handled & _FILE_RIGHTS, fd)
        rc = libc.call(SYS_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(RULE_PATH_BENEATH),
                       ctypes.byref(attr), ctypes.c_uint32(0))
        if rc < 0:
            raise OSError(-rc, f"landlock_add_rule {path}: {os.strerror(-rc)}")
    finally:
        os.close(fd)
