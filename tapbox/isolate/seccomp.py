"""System-call filtering with libseccomp (the system's libseccomp.so.2, through ctypes).

How this works
--------------
A policy is data: a default `Action` and a tuple of `Rule`s (a syscall by name, an action, and
argument comparisons). `compile_filter()` turns it into a libseccomp filter context: syscall
names are resolved by libseccomp for every architecture in the filter (never a table of numbers
here), and libseccomp emits the BPF. Pid 1 of the sandbox builds and loads it (`Filter.load()`)
as the last step of its set-up, after no_new_privs, so nothing of tapbox's own set-up runs under
it, and a failure is one line and exit 125 before the command exists. The command inherits it
across fork and exec, and so does everything it starts; pid 1 is under it too, so a command that
may ptrace pid 1 (uid 0 inside) gains nothing by it. (A future policy that forbids what pid 1
itself needs - fork, wait, kill - would be loaded in the command's process instead, before exec.)

Architectures: a filter only checks the architectures it was built for, and kills a process
that makes a system call through another ABI (libseccomp's default "bad arch" action). So the
native architecture's compat ABIs (x86 and x32 on x86_64, arm on aarch64) are added: a 32-bit
program in the sandbox runs under the same rules instead of being killed, and `int 0x80` is no
way around them.

Today's policy (`DEFAULT_POLICY`): allow everything except terminal injection. TIOCSTI pushes
characters into a terminal's input queue, so a sandboxed program on the user's terminal could
type a command that the user's shell runs after tapbox exits, outside every namespace; TIOCLINUX
(virtual consoles) can do the same through its paste selection. Both fail with EPERM. The
comparison is on the low 32 bits of the request (SCMP_CMP_MASKED_EQ with mask 0xffffffff): the
kernel truncates ioctl's `cmd` to 32 bits, so a 64-bit equality test would miss TIOCSTI with high
bits set (Flatpak's CVE-2019-10063). Job control (TIOCSPGRP), window size (TIOCGWINSZ,
TIOCSWINSZ) and every other ioctl stay allowed.

libseccomp >= 2.4 is required: older versions generated wrong 64-bit argument comparisons
(CVE-2019-9893). If libseccomp is missing or refuses the filter, the command does not run.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
from typing import NamedTuple

from tapbox.errors import SetupError

LIBRARY = "libseccomp.so.2"
MIN_VERSION = (2, 4, 0)
INSTALL_HINT = "install libseccomp (Debian/Ubuntu: apt install libseccomp2)"

# <linux/seccomp.h> / <seccomp.h> action values
_ACT_KILL_PROCESS = 0x80000000
_ACT_ERRNO = 0x00050000
_ACT_LOG = 0x7FFC0000
_ACT_ALLOW = 0x7FFF0000

# ioctl requests (<asm-generic/ioctls.h>; the same on every architecture Linux runs on)
TIOCSTI = 0x5412
TIOCLINUX = 0x541C
IOCTL_CMD_MASK = 0xFFFFFFFF  # the kernel's `unsigned int cmd`

# The compat ABIs a native architecture can also run (names as libseccomp spells them).
COMPAT_ARCHES: dict[str, tuple[str, ...]] = {
    "x86_64": ("x86", "x32"),
    "aarch64": ("arm",),
}


# ----- the policy, as data ----------------------------------------------------------------------


# Actions, rules and policies are small immutable tuples (NamedTuple: this module is imported on
# every start, and a dataclass costs ~10 times more to define). Each action carries its kind, so
# that two actions compare equal only when they are the same action.


class Allow(NamedTuple):
    kind: str = "allow"

    def value(self) -> int:
        return _ACT_ALLOW

    def describe(self) -> str:
        return "allow"


class Errno(NamedTuple):
    errno: int
    kind: str = "errno"

    def value(self) -> int:
        return _ACT_ERRNO | (self.errno & 0xFFFF)

    def describe(self) -> str:
        return f"fail with {errno.errorcode.get(self.errno, str(self.errno))}"


class KillProcess(NamedTuple):
    kind: str = "kill-process"

    def value(self) -> int:
        return _ACT_KILL_PROCESS

    def describe(self) -> str:
        return "kill the process"


class Log(NamedTuple):
    """Allow, and have the kernel log the call (audit)."""

    kind: str = "log"

    def value(self) -> int:
        return _ACT_LOG

    def describe(self) -> str:
        return "allow and log"


Action = Allow | Errno | KillProcess | Log


class Cmp(enum.IntEnum):
    """enum scmp_compare."""

    NE = 1
    LT = 2
    LE = 3
    EQ = 4
    GE = 5
    GT = 6
    MASKED_EQ = 7  # (arg & mask) == value


_CMP_TEXT = {Cmp.NE: "!=", Cmp.LT: "<", Cmp.LE: "<=", Cmp.EQ: "==", Cmp.GE: ">=", Cmp.GT: ">"}


class ArgCmp(NamedTuple):
    """A test on argument `arg` (0-5) of the system call."""

    arg: int
    op: Cmp
    value: int
    mask: int = 0  # MASKED_EQ only

    @classmethod
    def masked_eq(cls, arg: int, mask: int, value: int) -> ArgCmp:
        return cls(arg, Cmp.MASKED_EQ, value, mask)

    def describe(self) -> str:
        if self.op is Cmp.MASKED_EQ:
            return f"(arg{self.arg} & {self.mask:#x}) == {self.value:#x}"
        return f"arg{self.arg} {_CMP_TEXT[self.op]} {self.value:#x}"


class Rule(NamedTuple):
    syscall: str
    action: Action
    args: tuple[ArgCmp, ...] = ()
    why: str = ""

    def describe(self) -> str:
        cond = " and ".join(a.describe() for a in self.args)
        where = f" if {cond}" if cond else ""
        why = f"  # {self.why}" if self.why else ""
        return f"{self.syscall}{where}: {self.action.describe()}{why}"


class Policy(NamedTuple):
    default: Action
    rules: tuple[Rule, ...]

    def describe(self) -> list[str]:
        return [f"default: {self.default.describe()}", *(r.describe() for r in self.rules)]


def _ioctl_request(request: int, why: str) -> Rule:
    return Rule("ioctl", Errno(errno.EPERM), (ArgCmp.masked_eq(1, IOCTL_CMD_MASK, request),), why)


TERMINAL_INJECTION: tuple[Rule, ...] = (
    _ioctl_request(TIOCSTI, "TIOCSTI: typing into the terminal"),
    _ioctl_request(TIOCLINUX, "TIOCLINUX: console paste into the terminal"),
)
DEFAULT_POLICY = Policy(Allow(), TERMINAL_INJECTION)


# ----- libseccomp through ctypes ------------------------------------------------------------------


class _ArgCmp(ctypes.Structure):
    """struct scmp_arg_cmp."""

    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


class _Version(ctypes.Structure):
    """struct scmp_version."""

    _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]


class Libseccomp:
    """The libseccomp functions tapbox uses, with their C prototypes."""

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL(LIBRARY, use_errno=True)
        except OSError as e:
            raise SetupError(
                f"tapbox: cannot load {LIBRARY} ({e}): {INSTALL_HINT}; tapbox does not run a "
                "command without its seccomp filter"
            ) from None
        try:
            lib.seccomp_version.restype = ctypes.POINTER(_Version)
            lib.seccomp_version.argtypes = []
            lib.seccomp_init.restype = ctypes.c_void_p
            lib.seccomp_init.argtypes = [ctypes.c_uint32]
            lib.seccomp_release.restype = None
            lib.seccomp_release.argtypes = [ctypes.c_void_p]
            lib.seccomp_arch_native.restype = ctypes.c_uint32
            lib.seccomp_arch_native.argtypes = []
            lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
            lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
            lib.seccomp_arch_add.restype = ctypes.c_int
            lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
            lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
            lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
            lib.seccomp_rule_add_array.restype = ctypes.c_int
            lib.seccomp_rule_add_array.argtypes = [
                ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                ctypes.POINTER(_ArgCmp),
            ]
            lib.seccomp_load.restype = ctypes.c_int
            lib.seccomp_load.argtypes = [ctypes.c_void_p]
            lib.seccomp_export_pfc.restype = ctypes.c_int
            lib.seccomp_export_pfc.argtypes = [ctypes.c_void_p, ctypes.c_int]
        except AttributeError as e:  # seccomp_version() appeared in 2.3
            raise SetupError(
                f"tapbox: {LIBRARY} lacks {e.name or 'a function tapbox needs'}: it is older than "
                f"{'.'.join(map(str, MIN_VERSION))}: upgrade it ({INSTALL_HINT})"
            ) from None
        self.lib = lib
        v = lib.seccomp_version().contents
        self.version = (v.major, v.minor, v.micro)
        if self.version < MIN_VERSION:
            raise SetupError(
                f"tapbox: {LIBRARY} is version {'.'.join(map(str, self.version))}, older than "
                f"{'.'.join(map(str, MIN_VERSION))} (wrong 64-bit argument comparisons, "
                f"CVE-2019-9893): upgrade it ({INSTALL_HINT})"
            )

    def arch_token(self, name: str) -> int:
        return int(self.lib.seccomp_arch_resolve_name(name.encode()))

    def syscall_number(self, name: str) -> int | None:
        """The native number of a syscall (or libseccomp's pseudo-number), None if unknown."""
        nr = int(self.lib.seccomp_syscall_resolve_name(name.encode()))
        return None if nr == -1 else nr  # __NR_SCMP_ERROR


class Filter:
    """A compiled filter (a libseccomp context), to be loaded once, just before exec."""

    def __init__(self, lib: Libseccomp, ctx: int, policy: Policy, arches: tuple[str, ...]) -> None:
        self._lib = lib
        self._ctx: int | None = ctx
        self.policy = policy
        self.arches = arches

    def load(self) -> int:
        """Install the filter on the calling thread (and what it execs): 0 or an errno."""
        assert self._ctx is not None
        rc = int(self._lib.lib.seccomp_load(self._ctx))
        return -rc if rc < 0 else 0

    def export_pfc(self, fd: int) -> None:
        """Write the filter as libseccomp's pseudo-C to fd (for debugging and tests)."""
        assert self._ctx is not None
        self._lib.lib.seccomp_export_pfc(self._ctx, fd)

    def release(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            self._lib.lib.seccomp_release(ctx)


def compile_filter(policy: Policy, lib: Libseccomp | None = None) -> Filter:
    """Build the libseccomp context for `policy`; SetupError (one line) if it cannot be built."""
    lib = lib or Libseccomp()
    ctx = lib.lib.seccomp_init(policy.default.value())
    if not ctx:
        raise SetupError("tapbox: seccomp_init failed (out of memory?): try again")
    try:
        arches = _add_compat_arches(lib, ctx)
        for rule in policy.rules:
            _add_rule(lib, ctx, rule)
    except BaseException:
        lib.lib.seccomp_release(ctx)
        raise
    return Filter(lib, ctx, policy, arches)


def _add_compat_arches(lib: Libseccomp, ctx: int) -> tuple[str, ...]:
    native = int(lib.lib.seccomp_arch_native())
    added: list[str] = []
    for name, compat in COMPAT_ARCHES.items():
        if lib.arch_token(name) != native:
            continue
        for other in compat:
            token = lib.arch_token(other)
            if token == 0:
                continue  # this libseccomp does not know the ABI
            rc = int(lib.lib.seccomp_arch_add(ctx, token))
            if rc not in (0, -errno.EEXIST):
                raise SetupError(
                    f"tapbox: seccomp: cannot add the {other} ABI to the filter: "
                    f"{os.strerror(-rc)}: {INSTALL_HINT} (a newer libseccomp2)"
                )
            added.append(other)
    return tuple(added)


def _add_rule(lib: Libseccomp, ctx: int, rule: Rule) -> None:
    nr = lib.syscall_number(rule.syscall)
    if nr is None:
        raise SetupError(
            f"tapbox: seccomp: libseccomp does not know the system call {rule.syscall!r}: "
            f"upgrade it ({INSTALL_HINT})"
        )
    cmps = (_ArgCmp * max(1, len(rule.args)))()
    for i, cmp in enumerate(rule.args):
        a, b = (cmp.mask, cmp.value) if cmp.op is Cmp.MASKED_EQ else (cmp.value, 0)
        cmps[i] = _ArgCmp(cmp.arg, int(cmp.op), a, b)
    rc = int(lib.lib.seccomp_rule_add_array(ctx, rule.action.value(), nr, len(rule.args), cmps))
    if rc < 0:
        raise SetupError(
            f"tapbox: seccomp: libseccomp refused the rule '{rule.describe()}': "
            f"{os.strerror(-rc)}: {INSTALL_HINT} (a newer libseccomp2)"
        )
