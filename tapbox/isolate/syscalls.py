"""System-call policies as data: actions, rules, groups, the three named policies, a builder.

How this works
--------------
A `Policy` is a default `Action` and a tuple of `Rule`s (a system call by name, an action,
argument comparisons, a one-line reason). Nothing here touches the kernel: tapbox.isolate.seccomp
compiles a policy with libseccomp, and the supervisor (tapbox.isolate.supervisor) asks
`Policy.decide()` what a call it was notified of deserves. Names are libseccomp's (the same on
every architecture; a name an architecture lacks is skipped there by libseccomp).

Two shapes of policy:
- a *deny list* (default action Allow): everything runs except the listed calls. The default
  policy is one; pid 1 of the sandbox loads it, so it covers pid 1 as well as the command.
- an *allow list* (default action kill or an errno): only the listed calls run. `strict` is one;
  pid 1 could not reap under it, so the command's own process loads it just before exec
  (tapbox.isolate.reaper), and pid 1 keeps only the terminal guard.

`PolicyBuilder` writes either shape in the spirit of Sandbox2's PolicyBuilder::

    policy = (PolicyBuilder()                    # an allow list: anything else kills
              .allow("@read_write", "@memory", "@time", "@exit", "@signals")
              .allow("getrandom")
              .deny("socket", errno=errno.EACCES)
              .build())

Groups (`GROUPS`, written "@name") bundle the calls one capability needs. Each call names a
system call or a group; a later call about the same system call replaces what an earlier one
said. Rules marked `kept` (the terminal guard: TIOCSTI/TIOCLINUX) stay whatever is allowed.

Why each call of the default deny list is there: `DEFAULT_DENY` below, one reason per line, and
docs/isolation.md "System calls".
"""

from __future__ import annotations

import errno as errno_mod
import os
from collections.abc import Iterable, Sequence
from typing import Literal, NamedTuple, Self

# <linux/seccomp.h> action values
ACT_KILL_PROCESS = 0x80000000
ACT_ERRNO = 0x00050000
ACT_NOTIFY = 0x7FC00000
ACT_LOG = 0x7FFC0000
ACT_ALLOW = 0x7FFF0000

Mode = Literal["default", "strict", "off"]
MODES: tuple[Mode, ...] = ("default", "strict", "off")

# ----- actions -----------------------------------------------------------------------------------
# Small immutable tuples (NamedTuple: this module is imported on every start, and a dataclass
# costs ~10 times more to define). Each action carries its kind, so two actions compare equal
# only when they are the same action.


class Allow(NamedTuple):
    kind: str = "allow"

    def value(self) -> int:
        return ACT_ALLOW

    def describe(self) -> str:
        return "allow"


class Errno(NamedTuple):
    errno: int
    kind: str = "errno"

    def value(self) -> int:
        return ACT_ERRNO | (self.errno & 0xFFFF)

    def describe(self) -> str:
        return f"fail with {errno_mod.errorcode.get(self.errno, str(self.errno))}"


class KillProcess(NamedTuple):
    kind: str = "kill-process"

    def value(self) -> int:
        return ACT_KILL_PROCESS

    def describe(self) -> str:
        return "kill the process"


class Log(NamedTuple):
    """Allow, and have the kernel log the call (audit)."""

    kind: str = "log"

    def value(self) -> int:
        return ACT_LOG

    def describe(self) -> str:
        return "allow and log"


Action = Allow | Errno | KillProcess | Log
EPERM = Errno(errno_mod.EPERM)
ENOSYS = Errno(errno_mod.ENOSYS)  # "not here": a fallback answer (libc, mount tools), not named
KILL = KillProcess()

_SEVERITY = {"allow": 0, "log": 1, "errno": 2, "kill-process": 3}


def severity(action: Action) -> int:
    """How much an action refuses: allow < log < errno < kill (the kernel's precedence)."""
    return _SEVERITY[action.kind]


def is_violation(action: Action) -> bool:
    """Whether a call refused this way is a violation to name: an errno or a kill, except
    ENOSYS, which asks the program to fall back (clone3 -> clone, fsopen -> mount)."""
    return action.kind == "kill-process" or (action.kind == "errno" and action != ENOSYS)


# ----- rules -------------------------------------------------------------------------------------

_CMP_TEXT = {1: "!=", 2: "<", 3: "<=", 4: "==", 5: ">=", 6: ">"}
CMP_NE, CMP_LT, CMP_LE, CMP_EQ, CMP_GE, CMP_GT, CMP_MASKED_EQ = 1, 2, 3, 4, 5, 6, 7  # scmp_compare


class ArgCmp(NamedTuple):
    """A test on argument `arg` (0-5) of the system call (enum scmp_compare in `op`)."""

    arg: int
    op: int
    value: int
    mask: int = 0  # MASKED_EQ only

    @classmethod
    def masked_eq(cls, arg: int, mask: int, value: int) -> ArgCmp:
        return cls(arg, CMP_MASKED_EQ, value, mask)

    @classmethod
    def eq(cls, arg: int, value: int) -> ArgCmp:
        return cls(arg, CMP_EQ, value)

    def matches(self, args: Sequence[int]) -> bool:
        a = args[self.arg] & 0xFFFFFFFFFFFFFFFF
        if self.op == CMP_MASKED_EQ:
            return a & self.mask == self.value
        v = self.value & 0xFFFFFFFFFFFFFFFF
        return {CMP_NE: a != v, CMP_LT: a < v, CMP_LE: a <= v, CMP_EQ: a == v,
                CMP_GE: a >= v, CMP_GT: a > v}[self.op]

    def describe(self) -> str:
        if self.op == CMP_MASKED_EQ:
            return f"(arg{self.arg} & {self.mask:#x}) == {self.value:#x}"
        return f"arg{self.arg} {_CMP_TEXT[self.op]} {self.value:#x}"


class Rule(NamedTuple):
    syscall: str
    action: Action
    args: tuple[ArgCmp, ...] = ()
    why: str = ""
    kept: bool = False  # the builder never removes it (the terminal guard)

    def matches(self, syscall: str, args: Sequence[int]) -> bool:
        return syscall == self.syscall and all(cmp.matches(args) for cmp in self.args)

    def describe(self) -> str:
        cond = " and ".join(a.describe() for a in self.args)
        where = f" if {cond}" if cond else ""
        why = f"  # {self.why}" if self.why else ""
        return f"{self.syscall}{where}: {self.action.describe()}{why}"


class Policy(NamedTuple):
    default: Action
    rules: tuple[Rule, ...]
    name: str = "custom"

    def describe(self) -> list[str]:
        return [f"default: {self.default.describe()}", *(r.describe() for r in self.rules)]

    @property
    def is_allow_list(self) -> bool:
        """Refuses what it does not name: pid 1 cannot live under it (see the module doc)."""
        return self.default.kind not in ("allow", "log")

    def decide(self, syscall: str, args: Sequence[int]) -> Action:
        """What the policy does with this call: the most severe matching rule's action (the
        kernel's precedence), else the default."""
        found: Action | None = None
        for rule in self.rules:
            if rule.matches(syscall, args) and (found is None
                                                or severity(rule.action) > severity(found)):
                found = rule.action
        return self.default if found is None else found


# ----- the terminal guard and the default deny list -----------------------------------------------

TIOCSTI = 0x5412  # <asm-generic/ioctls.h>, the same on every architecture Linux runs on
TIOCLINUX = 0x541C
TCGETS, TIOCGWINSZ, FIONREAD, FIONCLEX, FIOCLEX = 0x5401, 0x5413, 0x541B, 0x5450, 0x5451
IOCTL_CMD_MASK = 0xFFFFFFFF  # the kernel reads ioctl's cmd as an unsigned int


def _ioctl(request: int, action: Action, why: str = "", kept: bool = False) -> Rule:
    # Compared on the low 32 bits, as the kernel reads it: a 64-bit equality would miss
    # TIOCSTI with high bits set (Flatpak's CVE-2019-10063).
    return Rule("ioctl", action, (ArgCmp.masked_eq(1, IOCTL_CMD_MASK, request),), why, kept)


TERMINAL_GUARD: tuple[Rule, ...] = (
    _ioctl(TIOCSTI, EPERM, "TIOCSTI: typing into the terminal", kept=True),
    _ioctl(TIOCLINUX, EPERM, "TIOCLINUX: console paste into the terminal", kept=True),
)

# <linux/personality.h>
ADDR_NO_RANDOMIZE = 0x0040000
MMAP_PAGE_ZERO = 0x0100000
ADDR_COMPAT_LAYOUT = 0x0200000
READ_IMPLIES_EXEC = 0x0400000
ADDR_LIMIT_32BIT = 0x0800000
ADDR_LIMIT_3GB = 0x8000000
PER_LINUX32 = 0x0008
PERSONALITY_QUERY = 0xFFFFFFFF
_WEAKENING = {
    ADDR_NO_RANDOMIZE: "ADDR_NO_RANDOMIZE turns ASLR off",
    MMAP_PAGE_ZERO: "MMAP_PAGE_ZERO maps page 0 (null-pointer exploits)",
    ADDR_COMPAT_LAYOUT: "ADDR_COMPAT_LAYOUT: the legacy, less random memory layout",
    READ_IMPLIES_EXEC: "READ_IMPLIES_EXEC makes readable memory executable",
    ADDR_LIMIT_32BIT: "ADDR_LIMIT_32BIT: a small address space, little randomness",
    ADDR_LIMIT_3GB: "ADDR_LIMIT_3GB: a small address space, little randomness",
}


def _personality_rules() -> tuple[Rule, ...]:
    """personality(2): refuse what weakens ASLR or NX and every execution domain but Linux's,
    allow the query (0xffffffff) and harmless flags (UNAME26...).

    libseccomp cannot say "not this value" nor test one argument twice in a rule, and the
    kernel reads the argument as 32 bits. So: with bit 31 clear, a forbidden bit set refuses;
    with bit 31 set, any other bit clear refuses - which leaves exactly the query.
    """
    top = 1 << 31
    rules = [Rule("personality", EPERM, (ArgCmp.masked_eq(0, top | bit, bit),), why)
             for bit, why in _WEAKENING.items()]
    for bit in (0x01, 0x02, 0x04, 0x10, 0x20, 0x40, 0x80):  # the domain byte: 0 or PER_LINUX32
        rules.append(Rule("personality", EPERM, (ArgCmp.masked_eq(0, top | bit, bit),),
                          "an execution domain other than Linux's"))
    for b in range(31):
        rules.append(Rule("personality", EPERM, (ArgCmp.masked_eq(0, top | 1 << b, top),),
                          "bit 31 set: only the query 0xffffffff"))
    return tuple(rules)


def _deny(names: str, why: str, action: Action = EPERM) -> tuple[Rule, ...]:
    return tuple(Rule(name, action, (), why) for name in names.split())


# What a sandboxed program has no business doing, or what has a history of kernel escapes.
# Left allowed on purpose (docs/isolation.md): ptrace, process_vm_readv/writev and pidfd_getfd
# (debuggers; the kernel's ptrace checks apply), unshare, clone, setns, mount, umount2,
# pivot_root, open_tree, move_mount, mount_setattr (nested sandboxes; tapbox drops CAP_SYS_ADMIN
# in the sandbox's own namespaces, so they act only inside new ones), NUMA calls, kcmp.
DEFAULT_DENY: tuple[Rule, ...] = (
    *_deny("keyctl add_key request_key",
           "kernel keyrings: not namespaced, a history of escapes (CVE-2016-0728)"),
    *_deny("bpf", "eBPF: verifier bugs are a common route to kernel code execution"),
    *_deny("perf_event_open", "perf events: a long list of kernel bugs, and side channels"),
    *_deny("userfaultfd", "userfaultfd: makes kernel races reliably exploitable"),
    *_deny("kexec_load kexec_file_load init_module finit_module delete_module",
           "loading kernels or modules"),
    *_deny("open_by_handle_at", "opening files by handle, around every path check "
           "(Docker's 'shocker' escape)"),
    *_deny("io_uring_setup io_uring_enter io_uring_register",
           "io_uring: many escapes, and it does I/O that no filter sees (--syscall-allow "
           "@io_uring to allow)"),
    *_deny("fsopen fsconfig fsmount fspick",
           "the filesystem-context mount API (CVE-2022-0185); ENOSYS, so mount tools fall "
           "back to mount(2)", ENOSYS),
    *_deny("syslog", "reading the kernel log (addresses that help exploits)"),
    *_deny("acct quotactl swapon swapoff reboot iopl ioperm",
           "host administration (privileged outside anyway; reboot would end the sandbox's init)"),
    *_deny("uselib modify_ldt vm86 vm86old",
           "obsolete interfaces with a history of bugs (a.out loader, 16-bit segments)"),
    *_personality_rules(),
)

DEFAULT_POLICY = Policy(Allow(), TERMINAL_GUARD + DEFAULT_DENY, "default")
OFF_POLICY = Policy(Allow(), TERMINAL_GUARD, "off")
GUARD_POLICY = Policy(Allow(), TERMINAL_GUARD, "terminal guard")


# ----- groups ------------------------------------------------------------------------------------

# <fcntl.h> (the same on x86, arm, riscv...; flags are compared for read-only opens)
O_ACCMODE, O_CREAT, O_TRUNC, O_APPEND = 0o3, 0o100, 0o1000, 0o2000
AT_EMPTY_PATH = 0x1000
CLONE_THREAD = 0x00010000
_CLONE_FLAGS_ARG = 1 if os.uname().machine.startswith("s390") else 0

Entry = str | Rule  # a system call allowed as it is, or allowed under a condition


def _names(text: str) -> tuple[str, ...]:
    return tuple(text.split())


def _read_only_open(syscall: str, flags_arg: int) -> Rule:
    mask = O_ACCMODE | O_CREAT | O_TRUNC | O_APPEND
    return Rule(syscall, Allow(), (ArgCmp.masked_eq(flags_arg, mask, 0),), "read-only open")


GROUPS: dict[str, tuple[Entry, ...]] = {
    "read_write": (*_names(
        "read write readv writev pread64 pwrite64 preadv pwritev preadv2 pwritev2 lseek _llseek "
        "close close_range dup dup2 dup3 fcntl fcntl64 fstat fstat64 fstatfs fstatfs64 "
        "sendfile sendfile64 splice tee"),
        Rule("newfstatat", Allow(), (ArgCmp.masked_eq(3, AT_EMPTY_PATH, AT_EMPTY_PATH),),
             "fstat through newfstatat"),
        Rule("statx", Allow(), (ArgCmp.masked_eq(2, AT_EMPTY_PATH, AT_EMPTY_PATH),),
             "fstat through statx"),
        *(_ioctl(req, Allow(), "terminal and descriptor queries")
          for req in (TCGETS, TIOCGWINSZ, FIONREAD, FIOCLEX, FIONCLEX))),
    "memory": _names("brk mmap mmap2 munmap mprotect mremap madvise msync mincore mlock mlock2 "
                     "munlock membarrier"),
    "time": _names("clock_gettime clock_gettime64 clock_getres clock_getres_time64 "
                   "gettimeofday time nanosleep clock_nanosleep clock_nanosleep_time64"),
    "exit": _names("exit exit_group"),
    "signals": _names("rt_sigaction rt_sigprocmask rt_sigreturn sigreturn sigaltstack "
                      "rt_sigpending rt_sigsuspend rt_sigtimedwait rt_sigtimedwait_time64 "
                      "kill tgkill tkill restart_syscall alarm getitimer setitimer"),
    "threads": (*_names(
        "futex futex_time64 futex_waitv set_robust_list get_robust_list set_tid_address rseq "
        "gettid sched_yield sched_getaffinity"),
        Rule("clone", Allow(), (ArgCmp.masked_eq(_CLONE_FLAGS_ARG, CLONE_THREAD, CLONE_THREAD),),
             "threads, not processes"),
        # clone3's flags sit in memory no filter can read: ENOSYS makes libc use clone.
        Rule("clone3", ENOSYS, (), "clone3's flags cannot be checked: libc falls back to clone")),
    "process_info": (*_names(
        "getpid getppid getuid geteuid getgid getegid getgroups getresuid getresgid getpgrp "
        "getpgid getsid uname getrlimit ugetrlimit getrusage sysinfo getcpu getcwd times "
        "arch_prctl"),
        Rule("prlimit64", Allow(), (ArgCmp.eq(2, 0),), "reading limits, not setting them")),
    "poll": _names("poll ppoll ppoll_time64 select _newselect pselect6 pselect6_time64 "
                   "epoll_create epoll_create1 epoll_ctl epoll_wait epoll_pwait epoll_pwait2 "
                   "eventfd eventfd2 pipe pipe2"),
    "random": _names("getrandom"),
    "files_read": (*(_read_only_open(name, arg) for name, arg in
                     (("open", 1), ("openat", 2))),
                   *_names("stat stat64 lstat lstat64 newfstatat fstatat64 statx access "
                           "faccessat faccessat2 readlink readlinkat getdents getdents64 statfs "
                           "statfs64 chdir fchdir")),
    "exec": _names("execve execveat"),
    "fork": _names("fork vfork clone clone3 wait4 waitid"),
    "sockets": _names("socket socketpair connect bind listen accept accept4 sendto recvfrom "
                      "sendmsg recvmsg sendmmsg recvmmsg shutdown getsockname getpeername "
                      "setsockopt getsockopt"),
    "io_uring": _names("io_uring_setup io_uring_enter io_uring_register"),
}

# `strict`: compute on data already open, nothing else (for tapbox.call on untrusted input):
# no opening files, no sockets, no exec, no new processes.
STRICT_GROUPS = ("read_write", "memory", "time", "exit", "signals", "threads", "process_info",
                 "poll", "random")


def expand(names: Iterable[str]) -> list[Entry]:
    """System call names and "@group"s -> entries; ValueError names an unknown group."""
    out: list[Entry] = []
    for name in names:
        if name.startswith("@"):
            group = GROUPS.get(name[1:].replace("-", "_"))
            if group is None:
                raise ValueError(f"unknown system-call group {name!r} (known: "
                                 + ", ".join("@" + g for g in GROUPS) + ")")
            out.extend(group)
        elif not name or not all(c.isalnum() or c == "_" for c in name):
            raise ValueError(f"invalid system-call name {name!r}")
        else:
            out.append(name)
    return out


# ----- the builder -------------------------------------------------------------------------------


class PolicyBuilder:
    """Writes a Policy one statement at a time; a later statement about a system call replaces
    what an earlier one said about it (rules marked `kept` stay). Start from nothing (an allow
    list whose default is `default`, kill unless told) or from a policy (`from_policy`)."""

    def __init__(self, default: Action = KILL, name: str = "custom") -> None:
        self._default = default
        self._name = name
        self._rules: dict[str, list[Rule]] = {}
        self._kept: list[Rule] = []

    @classmethod
    def from_policy(cls, policy: Policy) -> PolicyBuilder:
        builder = cls(policy.default, policy.name)
        for rule in policy.rules:
            builder._add(rule, replace=False)
        return builder

    def allow(self, *names: str) -> Self:
        """Allow system calls ("read") and groups ("@memory"), as a group says."""
        for entry in expand(names):
            rule = entry if isinstance(entry, Rule) else Rule(entry, Allow())
            self._add(rule, replace=isinstance(entry, str))
        return self

    def allow_if(self, syscall: str, *args: ArgCmp, why: str = "") -> Self:
        """Allow one system call when its arguments pass every comparison (added to what
        else is allowed of it)."""
        return self._add(Rule(syscall, Allow(), tuple(args), why), replace=False)

    def deny(self, *names: str, errno: int = errno_mod.EPERM, why: str = "") -> Self:
        """Make system calls (or groups) fail with `errno` (EPERM unless told)."""
        return self._set(names, Errno(errno), why)

    def kill(self, *names: str, why: str = "") -> Self:
        """Kill the process that makes one of these system calls."""
        return self._set(names, KillProcess(), why)

    def add(self, rule: Rule) -> Self:
        """Add a rule as it is (alongside the others for its system call)."""
        return self._add(rule, replace=False)

    def build(self) -> Policy:
        """The policy. A rule whose action is the default changes nothing (and libseccomp
        refuses it): it is left out."""
        rules = [*self._kept]
        for group in self._rules.values():
            rules.extend(r for r in group if r.action != self._default)
        return Policy(self._default, tuple(_unconditional_wins(rules)), self._name)

    # ---

    def _set(self, names: Sequence[str], action: Action, why: str) -> Self:
        for entry in expand(names):
            syscall = entry.syscall if isinstance(entry, Rule) else entry
            self._add(Rule(syscall, action, (), why), replace=True)
        return self

    def _add(self, rule: Rule, replace: bool) -> Self:
        if rule.kept:
            if rule not in self._kept:
                self._kept.append(rule)
            return self
        if replace:
            self._rules[rule.syscall] = [rule]
        else:
            self._rules.setdefault(rule.syscall, []).append(rule)
        return self


def _unconditional_wins(rules: list[Rule]) -> list[Rule]:
    """Where a system call has an unconditional rule, its conditional rules (but kept ones)
    go: libseccomp would ignore them, and so must Policy.decide()."""
    plain = {r.syscall for r in rules if not r.args}
    return [r for r in rules if not r.args or r.kept or r.syscall not in plain]


def strict_policy() -> Policy:
    return PolicyBuilder(KILL, "strict").allow(*("@" + g for g in STRICT_GROUPS)).build()


def policy_for(mode: Mode, allow: Sequence[str] = ()) -> Policy:
    """The named policy for --syscalls MODE, widened by --syscall-allow NAMEs/@groups."""
    base = {"default": DEFAULT_POLICY, "off": OFF_POLICY}.get(mode) or strict_policy()
    if not allow:
        return base
    return PolicyBuilder.from_policy(base).allow(*allow).build()
