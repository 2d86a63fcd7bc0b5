"""System-call filtering with libseccomp (the system's libseccomp.so.2, through ctypes).

How this works
--------------
A policy is data (tapbox.isolate.syscalls: a default action and rules by system-call name).
`compile_filter()` turns it into a libseccomp filter context: names are resolved by libseccomp
for every architecture in the filter (never a table of numbers here), and libseccomp emits the
BPF. `install()` loads it on the calling thread, which passes it on across fork and exec.

Naming violations: with `notify=True` every refusing action (an errno, a kill) becomes
SECCOMP_RET_USER_NOTIF, and loading returns a listener fd. The process that makes a refused
call then waits until the supervisor (tapbox.isolate.supervisor, outside the sandbox) reads the
notification - who, which call - and answers with the policy's errno, or kills the process. The
kernel allows one listener in a task's chain of filters: inside another sandbox that holds one
(a nested tapbox), loading with a listener fails, and `install()` loads the same policy with
plain actions instead (refused as before, just not named).

Which process loads which policy (tapbox.isolate.child and reaper): a deny list (the default,
`off`) is loaded by pid 1 of the sandbox as the last step of its set-up, so that pid 1 is
under it too and a command that may ptrace pid 1 (uid 0 inside) gains nothing by it. An allow
list (`strict`) would stop pid 1 from reaping, so pid 1 loads only the terminal guard and the
command's own process loads the allow list just before exec (which it then allows only through
a descriptor of the command: execveat on that fd).

Architectures: a filter only checks the architectures it was built for, and kills a process
that makes a system call through another ABI (libseccomp's default "bad arch" action). So the
native architecture's compat ABIs (x86 and x32 on x86_64, arm on aarch64) are added: a 32-bit
program in the sandbox runs under the same rules instead of being killed, and `int 0x80` is no
way around them.

Names libseccomp does not know: an allow rule for one is left out (the call stays refused,
the stricter choice); any other rule naming one is a SetupError (a deny list that cannot deny
is not loaded). libseccomp >= 2.4 is required: older versions generated wrong 64-bit argument
comparisons (CVE-2019-9893). If libseccomp is missing or refuses the filter, the command does
not run.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import NamedTuple

from tapbox.errors import SetupError
from tapbox.isolate.syscalls import (
    ACT_NOTIFY,
    DEFAULT_POLICY,
    GUARD_POLICY,
    TERMINAL_GUARD,
    Action,
    Allow,
    ArgCmp,
    Errno,
    KillProcess,
    Log,
    Policy,
    Rule,
    is_violation,
)

__all__ = ["DEFAULT_POLICY", "GUARD_POLICY", "TERMINAL_GUARD", "Action", "Allow", "ArgCmp",
           "Errno", "Filter", "Installed", "KillProcess", "Libseccomp", "Log", "Policy", "Rule",
           "compile_filter", "install"]

LIBRARY = "libseccomp.so.2"
MIN_VERSION = (2, 4, 0)
INSTALL_HINT = "install libseccomp (Debian/Ubuntu: apt install libseccomp2)"
_FLTATR_API_SYSRAWRC = 9  # enum scmp_filter_attr: return the kernel's errno, not ECANCELED

# The compat ABIs a native architecture can also run (names as libseccomp spells them).
COMPAT_ARCHES: dict[str, tuple[str, ...]] = {
    "x86_64": ("x86", "x32"),
    "aarch64": ("arm",),
}


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


class SeccompData(ctypes.Structure):
    """struct seccomp_data."""

    _fields_ = [("nr", ctypes.c_int), ("arch", ctypes.c_uint32),
                ("instruction_pointer", ctypes.c_uint64), ("args", ctypes.c_uint64 * 6)]


class Notif(ctypes.Structure):
    """struct seccomp_notif: a refused call waiting for the supervisor's answer."""

    _fields_ = [("id", ctypes.c_uint64), ("pid", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("data", SeccompData)]


class NotifResp(ctypes.Structure):
    """struct seccomp_notif_resp: `error` is a negative errno."""

    _fields_ = [("id", ctypes.c_uint64), ("val", ctypes.c_int64), ("error", ctypes.c_int32),
                ("flags", ctypes.c_uint32)]


_PROTOTYPES: dict[str, tuple[object, list[object]]] = {
    "seccomp_version": (ctypes.POINTER(_Version), []),
    "seccomp_init": (ctypes.c_void_p, [ctypes.c_uint32]),
    "seccomp_release": (None, [ctypes.c_void_p]),
    "seccomp_attr_set": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]),
    "seccomp_arch_native": (ctypes.c_uint32, []),
    "seccomp_arch_resolve_name": (ctypes.c_uint32, [ctypes.c_char_p]),
    "seccomp_arch_add": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_uint32]),
    "seccomp_syscall_resolve_name": (ctypes.c_int, [ctypes.c_char_p]),
    "seccomp_syscall_resolve_num_arch": (ctypes.c_void_p, [ctypes.c_uint32, ctypes.c_int]),
    "seccomp_rule_add_array": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                              ctypes.c_uint, ctypes.POINTER(_ArgCmp)]),
    "seccomp_load": (ctypes.c_int, [ctypes.c_void_p]),
    "seccomp_export_pfc": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]),
}
# The user-notification calls appeared in libseccomp 2.5: without them violations are refused
# but not named.
_NOTIFY_PROTOTYPES: dict[str, tuple[object, list[object]]] = {
    "seccomp_notify_fd": (ctypes.c_int, [ctypes.c_void_p]),
    "seccomp_notify_alloc": (ctypes.c_int, [ctypes.POINTER(ctypes.POINTER(Notif)),
                                            ctypes.POINTER(ctypes.POINTER(NotifResp))]),
    "seccomp_notify_free": (None, [ctypes.POINTER(Notif), ctypes.POINTER(NotifResp)]),
    "seccomp_notify_receive": (ctypes.c_int, [ctypes.c_int, ctypes.POINTER(Notif)]),
    "seccomp_notify_respond": (ctypes.c_int, [ctypes.c_int, ctypes.POINTER(NotifResp)]),
    "seccomp_notify_id_valid": (ctypes.c_int, [ctypes.c_int, ctypes.c_uint64]),
}


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
            for name, (restype, argtypes) in _PROTOTYPES.items():
                func = getattr(lib, name)
                func.restype = restype
                func.argtypes = argtypes
        except AttributeError as e:  # seccomp_version() appeared in 2.3
            raise SetupError(
                f"tapbox: {LIBRARY} lacks {e.name or 'a function tapbox needs'}: it is older than "
                f"{'.'.join(map(str, MIN_VERSION))}: upgrade it ({INSTALL_HINT})"
            ) from None
        self.can_notify = True
        for name, (restype, argtypes) in _NOTIFY_PROTOTYPES.items():
            func = getattr(lib, name, None)
            if func is None:
                self.can_notify = False
                continue
            func.restype = restype
            func.argtypes = argtypes
        self.lib = lib
        v = lib.seccomp_version().contents
        self.version = (v.major, v.minor, v.micro)
        if self.version < MIN_VERSION:
            raise SetupError(
                f"tapbox: {LIBRARY} is version {'.'.join(map(str, self.version))}, older than "
                f"{'.'.join(map(str, MIN_VERSION))} (wrong 64-bit argument comparisons, "
                f"CVE-2019-9893): upgrade it ({INSTALL_HINT})"
            )
        self._libc = ctypes.CDLL(None)
        self._libc.free.argtypes = [ctypes.c_void_p]
        self._libc.free.restype = None

    def arch_token(self, name: str) -> int:
        return int(self.lib.seccomp_arch_resolve_name(name.encode()))

    def syscall_number(self, name: str) -> int | None:
        """The native number of a syscall (or libseccomp's pseudo-number), None if unknown."""
        nr = int(self.lib.seccomp_syscall_resolve_name(name.encode()))
        return None if nr == -1 else nr  # __NR_SCMP_ERROR

    def syscall_name(self, arch: int, nr: int) -> str | None:
        """The name of system call `nr` of architecture `arch` (an AUDIT_ARCH value, which is
        libseccomp's token), None if libseccomp does not know it."""
        ptr = self.lib.seccomp_syscall_resolve_num_arch(arch, nr)
        if not ptr:
            return None
        try:
            return ctypes.string_at(ptr).decode("ascii", "replace")
        finally:
            self._libc.free(ptr)


class Filter:
    """A compiled filter (a libseccomp context), to be loaded once."""

    def __init__(self, lib: Libseccomp, ctx: int, policy: Policy, arches: tuple[str, ...],
                 notify: bool = False) -> None:
        self._lib = lib
        self._ctx: int | None = ctx
        self.policy = policy
        self.arches = arches
        self.notify = notify

    def load(self) -> int:
        """Install the filter on the calling thread (and what it execs): 0 or an errno."""
        assert self._ctx is not None
        rc = int(self._lib.lib.seccomp_load(self._ctx))
        return -rc if rc < 0 else 0

    def listener(self) -> int | None:
        """After load() of a notifying filter: the listener fd (close-on-exec)."""
        if not self.notify or self._ctx is None:
            return None
        fd = int(self._lib.lib.seccomp_notify_fd(self._ctx))
        return fd if fd >= 0 else None

    def export_pfc(self, fd: int) -> None:
        """Write the filter as libseccomp's pseudo-C to fd (for debugging and tests)."""
        assert self._ctx is not None
        self._lib.lib.seccomp_export_pfc(self._ctx, fd)

    def release(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            self._lib.lib.seccomp_release(ctx)


def compile_filter(policy: Policy, lib: Libseccomp | None = None, notify: bool = False,
                   extra: tuple[Rule, ...] = ()) -> Filter:
    """Build the libseccomp context for `policy` (plus `extra` rules, which the supervisor does
    not judge: they never refuse); SetupError (one line) if it cannot be built. With `notify`,
    refusing actions become user notifications (see the module doc)."""
    lib = lib or Libseccomp()
    notify = notify and lib.can_notify
    default = _kernel_action(policy.default, notify)
    ctx = lib.lib.seccomp_init(default)
    if not ctx:
        raise SetupError("tapbox: seccomp_init failed (out of memory?): try again")
    try:
        lib.lib.seccomp_attr_set(ctx, _FLTATR_API_SYSRAWRC, 1)
        arches = _add_compat_arches(lib, ctx)
        for rule in (*policy.rules, *extra):
            action = _kernel_action(rule.action, notify)
            if action != default:
                _add_rule(lib, ctx, rule, action)
    except BaseException:
        lib.lib.seccomp_release(ctx)
        raise
    return Filter(lib, ctx, policy, arches, notify)


def _kernel_action(action: Action, notify: bool) -> int:
    return ACT_NOTIFY if notify and is_violation(action) else action.value()


class Installed(NamedTuple):
    """A loaded filter: its listener fd when violations are named, else why they are not."""

    listener: int | None
    unnamed_because: str | None = None


def install(policy: Policy, lib: Libseccomp | None = None, notify: bool = True,
            extra: tuple[Rule, ...] = ()) -> Installed:
    """Load `policy` on the calling thread, naming violations when it can (one listener per
    chain of filters: inside a sandbox that already holds one, refused calls are not named).
    Returns an errno-free Installed or raises SetupError; no_new_privs must be set."""
    lib = lib or Libseccomp()
    why_unnamed = None if lib.can_notify else f"{LIBRARY} is older than 2.5"
    if notify and lib.can_notify:
        flt = compile_filter(policy, lib, True, extra)
        try:
            err = flt.load()
            if not err:
                return Installed(flt.listener())
        finally:
            flt.release()
        why_unnamed = ("another seccomp supervisor is in charge here (a sandbox around this "
                       f"one?): {os.strerror(err)}")
    flt = compile_filter(policy, lib, False, extra)
    try:
        err = flt.load()
    finally:
        flt.release()
    if err:
        raise SetupError(
            f"tapbox: cannot install the sandbox's seccomp filter: {os.strerror(err)}: the "
            "kernel needs CONFIG_SECCOMP_FILTER (and no seccomp profile above tapbox that "
            "forbids it)"
        )
    return Installed(None, why_unnamed if notify else None)


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


def _add_rule(lib: Libseccomp, ctx: int, rule: Rule, action: int) -> None:
    nr = lib.syscall_number(rule.syscall)
    if nr is None:
        if rule.action.kind == "allow":
            return  # unknown to libseccomp: the call stays refused, the stricter choice
        raise SetupError(
            f"tapbox: seccomp: libseccomp does not know the system call {rule.syscall!r}: "
            f"upgrade it ({INSTALL_HINT})"
        )
    cmps = (_ArgCmp * max(1, len(rule.args)))()
    for i, cmp in enumerate(rule.args):
        a, b = (cmp.mask, cmp.value) if cmp.op == 7 else (cmp.value, 0)  # MASKED_EQ
        cmps[i] = _ArgCmp(cmp.arg, int(cmp.op), a, b)
    rc = int(lib.lib.seccomp_rule_add_array(ctx, action, nr, len(rule.args), cmps))
    if rc < 0:
        raise SetupError(
            f"tapbox: seccomp: libseccomp refused the rule '{rule.describe()}': "
            f"{os.strerror(-rc)}: {INSTALL_HINT} (a newer libseccomp2)"
        )
