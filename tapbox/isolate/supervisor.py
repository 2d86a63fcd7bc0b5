"""The seccomp supervisor: names every refused system call, and answers it as the policy says.

How this works
--------------
A filter loaded with notification (tapbox.isolate.seccomp) does not refuse a call by itself: the
calling thread waits while the kernel queues a notification on the filter's listener fd (pid,
system-call number, architecture, arguments). `Supervisor` runs in tapbox, outside the sandbox,
in a thread of its own (a blocking read must never stall the engine's event loop): it polls its
listener fds, receives each notification, asks the policy what the call deserves
(`Policy.decide`) and answers: the policy's errno, or - for a kill - SIGKILL to the process and
then an answer that nobody will read. It never lets a call through (SECCOMP_USER_NOTIF_FLAG_
CONTINUE is not used: the rules that allow are in the filter itself).

Before answering it records who made the call: the pid the notification names is the thread's
id as tapbox sees it (tapbox's PID namespace is an ancestor of the sandbox's); /proc gives its
pid inside the sandbox (the last NSpid), its name and its command line. Everything read there is
the sandbox's to choose: it is kept as data and escaped wherever it is printed. The process
cannot go away and its id be reused while it waits for the answer; the notification's id is
checked again after /proc was read (SECCOMP_IOCTL_NOTIF_ID_VALID) all the same.

Each violation is passed to `on_violation` (from this thread: the caller makes it safe) and kept
in `violations`, at most MAX_KEPT of them (`count` counts all), for the Python API.

When every process under a filter is gone the kernel reports POLLHUP on its listener, and the
listener is closed. `stop()` ends the thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from tapbox.isolate.seccomp import Libseccomp, Notif, NotifResp
from tapbox.isolate.syscalls import Policy

MAX_KEPT = 1000
CMDLINE_LIMIT = 4096  # bytes of /proc/PID/cmdline read per violation

# AUDIT_ARCH_* (<linux/audit.h>): the names violations are reported with
_ARCH_NAMES = {0xC000003E: "x86_64", 0x40000003: "x86", 0xC00000B7: "aarch64",
               0x40000028: "arm", 0xC00000F3: "riscv64", 0x80000016: "s390x",
               0xC0000015: "ppc64le"}
_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000
_SCMP_ARCH_X32 = 0x4000003E


class Violation(NamedTuple):
    """A system call the policy refused: who made it, which, and what happened to it."""

    time: float
    pid: int | None  # inside the sandbox (None: the process was gone before it was looked up)
    host_pid: int
    comm: str
    cmdline: tuple[str, ...]
    syscall: str  # libseccomp's name, or "syscall N" for a number it does not know
    arch: str
    action: str  # "EPERM", "ENOSYS"... or "killed"
    policy: str  # the policy's name: "default", "strict", "custom"...

    def describe(self) -> str:
        """'keyctl by pid 7 (python3): refused with EPERM (--syscalls default)' - unescaped."""
        who = f"pid {self.pid} ({self.comm})" if self.pid is not None else "a process"
        what = "killed it" if self.action == "killed" else f"refused with {self.action}"
        return f"system call {self.syscall} by {who}: {what} (--syscalls {self.policy})"


class Supervisor:
    def __init__(self, on_violation: Callable[[Violation], None] | None = None,
                 lib: Libseccomp | None = None) -> None:
        self.lib = lib or Libseccomp()
        self.on_violation = on_violation
        self.violations: list[Violation] = []
        self.count = 0
        self._listeners: dict[int, Policy] = {}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._req = ctypes.POINTER(Notif)()
        self._resp = ctypes.POINTER(NotifResp)()
        if self.lib.lib.seccomp_notify_alloc(ctypes.byref(self._req), ctypes.byref(self._resp)):
            raise OSError(errno.ENOMEM, "seccomp_notify_alloc failed")

    # ----- the caller's side ------------------------------------------------------------------

    def add(self, listener: int, policy: Policy) -> None:
        """Supervise one more listener (the supervisor owns and closes it)."""
        with self._lock:
            self._listeners[listener] = policy
        self._wake()

    def start(self) -> Supervisor:
        self._thread = threading.Thread(target=self._run, name="tapbox-seccomp", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the thread and close every listener (calls still waiting then fail ENOSYS)."""
        if self._stopping:
            return
        self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            for fd in self._listeners:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._listeners.clear()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.lib.lib.seccomp_notify_free(self._req, self._resp)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # ----- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            with self._lock:
                listeners = dict(self._listeners)
            for fd in listeners:
                poller.register(fd, select.POLLIN)
            try:
                events = poller.poll()
            except InterruptedError:
                continue
            for fd, mask in events:
                if fd == self._wake_r:
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 4096)
                elif mask & select.POLLIN:
                    try:
                        self._serve(fd, listeners[fd])
                    except Exception:  # noqa: BLE001 - answered (refused) already; go on
                        pass
                elif mask & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    self._drop(fd)

    def _drop(self, fd: int) -> None:
        with self._lock:
            if self._listeners.pop(fd, None) is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _serve(self, fd: int, policy: Policy) -> None:
        lib = self.lib.lib
        req, resp = self._req.contents, self._resp.contents
        ctypes.memset(ctypes.addressof(req), 0, ctypes.sizeof(req))
        rc = lib.seccomp_notify_receive(fd, self._req)
        if rc < 0:  # ENOENT: the caller died (a fatal signal) before we read it
            return
        error = errno.EPERM  # whatever goes wrong below, the call is refused, never let through
        violation: Violation | None = None
        try:
            data = req.data
            name = self._syscall_name(data.arch, data.nr)
            action = policy.decide(name, list(data.args))
            pid, comm, cmdline = _who(req.pid)
            if lib.seccomp_notify_id_valid(fd, req.id) != 0:
                return  # gone meanwhile: nobody to answer, and /proc may be someone else's
            if action.kind == "kill-process":
                with contextlib.suppress(OSError):
                    os.kill(req.pid, signal.SIGKILL)  # the thread group, as seccomp's kill
                outcome = "killed"
            else:
                # An errno; anything else cannot have been notified (the filter allows it
                # itself): refuse all the same on a mismatch.
                error = action.errno if action.kind == "errno" else errno.EPERM
                outcome = errno.errorcode.get(error, str(error))
            violation = Violation(time.time(), pid, req.pid, comm, cmdline, name,
                                  _ARCH_NAMES.get(data.arch, f"{data.arch:#x}"), outcome,
                                  policy.name)
        finally:
            resp.id, resp.val, resp.error, resp.flags = req.id, 0, -error, 0
            lib.seccomp_notify_respond(fd, self._resp)  # fails harmlessly if it was killed
        if violation is not None:
            self._record(violation)

    def _syscall_name(self, arch: int, nr: int) -> str:
        token = arch
        if arch == _AUDIT_ARCH_X86_64 and nr & _X32_SYSCALL_BIT:
            token = _SCMP_ARCH_X32
        return self.lib.syscall_name(token, nr) or f"syscall {nr}"

    def _record(self, violation: Violation) -> None:
        self.count += 1
        if len(self.violations) < MAX_KEPT:
            self.violations.append(violation)
        if self.on_violation is not None:
            try:
                self.on_violation(violation)
            except Exception:  # noqa: BLE001 - reporting must never stop the supervising
                pass


def _who(tid: int) -> tuple[int | None, str, tuple[str, ...]]:
    """(pid inside the sandbox, name, command line) of the thread `tid`, as /proc says."""
    inner: int | None = None
    tgid = tid
    comm = "?"
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f.read(8192).splitlines():
                if line.startswith(b"Tgid:"):
                    tgid = int(line.split()[1])
                elif line.startswith(b"NSpid:"):
                    inner = int(line.split()[-1])
                elif line.startswith(b"Name:"):
                    comm = line[5:].strip().decode("utf-8", "replace")
    except (OSError, ValueError, IndexError):
        return None, "?", ()
    if tgid != tid:  # a thread: name the process, as ps does
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{tgid}/status", "rb") as f:
                for line in f.read(8192).splitlines():
                    if line.startswith(b"NSpid:"):
                        inner = int(line.split()[-1])
    cmdline: tuple[str, ...] = ()
    with contextlib.suppress(OSError):
        with open(f"/proc/{tgid}/cmdline", "rb") as f:
            raw = f.read(CMDLINE_LIMIT)
        cmdline = tuple(part.decode("utf-8", "surrogateescape")
                        for part in raw.rstrip(b"\0").split(b"\0") if raw)
    return inner, comm, cmdline
