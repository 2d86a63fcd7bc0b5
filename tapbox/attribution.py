"""Per-process attribution: which sandboxed process opened a flow, found through /proc.

How this works
--------------
The sandbox is a network namespace of its own, so its sockets are listed in the
/proc/<pid>/net/{tcp,tcp6,udp,udp6} tables of any process inside it (the sandbox child, CMD,
first of all). A new flow is known to the engine by its ports: the sandbox's source port and the
destination address and port. One line of those tables matches them, and names the socket's
inode. The process is then the one with a file descriptor ``socket:[inode]``: every process
whose /proc/<pid>/ns/net is the sandbox's namespace is a candidate, and its /proc/<pid>/fd links
are read.

This runs in a worker thread (trio.to_thread), never in the engine's task: flows that start
while a scan runs are queued and answered together by the next scan, so a burst of connections
costs one pass over /proc, not one each. Each flow has a time budget (`budget` seconds from its
start); a scan stops looking once the budget of every flow it serves is spent.

Denied flows are answered (RST / ICMP unreachable) only once their attribution is settled or its
budget is spent: the refusal makes the kernel drop the socket from its tables, and the process
usually closes it at once, so afterwards it can no longer be found.

Pings: a ping socket shows the echo identifier as its local port, so it is matched like UDP; a
raw socket (ping(8) as root) has no identifier and is named only when it is the sandbox's one
raw ICMP socket.

Pids: the sandbox has its own PID namespace, so a process has two pids: the one tapbox finds
in /proc (the host's view) and the one it has inside (what `$$`, `ps` and the program's own logs
show; the command is pid 2 under tapbox's init). Flows name the process by its pid inside,
read from the NSpid line of /proc/<pid>/status.

Limits (best effort): a process that has already closed the socket (or exited) when the scan
runs is "unknown", never guessed; a socket held by several processes (inherited across fork)
names the lowest pid and lists the others in `shared_with`; processes tapbox may not inspect
(another uid) are skipped. DNS queries to tapbox's resolver are not attributed.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio

from netstack.events import Flow
from tapbox.flows import FlowRecord, ProcessInfo

DEFAULT_BUDGET = 0.5  # seconds from a flow's start until its process is given up on
MAX_CMDLINE_BYTES = 4096
MAX_CMDLINE_ARGS = 64

UNKNOWN_GONE = "the socket was already closed when tapbox looked"
UNKNOWN_NO_HOLDER = "no sandboxed process tapbox can inspect holds the socket"
UNKNOWN_BUDGET = "not found within the time budget"
UNKNOWN_STOPPED = "tapbox stopped before it was found"
UNKNOWN_FAILED = "attribution failed"


def _unknown(note: str) -> ProcessInfo:
    return ProcessInfo(None, note=note)


# ----- reading /proc (synchronous: called in a worker thread) -------------------------------


def _hex_ip(text: str) -> str | None:
    """An address from a /proc/net table: 32-bit words printed in host byte order."""
    try:
        if len(text) == 8:
            return socket.inet_ntop(socket.AF_INET, struct.pack("=I", int(text, 16)))
        if len(text) == 32:
            raw = b"".join(struct.pack("=I", int(text[i:i + 8], 16)) for i in range(0, 32, 8))
            if raw[:12] == b"\0" * 10 + b"\xff\xff":  # IPv4-mapped
                return socket.inet_ntop(socket.AF_INET, raw[12:])
            return socket.inet_ntop(socket.AF_INET6, raw)
    except (ValueError, OSError):
        return None
    return None


def _same_ip(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return socket.inet_pton(socket.AF_INET6, a) == socket.inet_pton(socket.AF_INET6, b)
    except OSError:
        return False


@dataclass(frozen=True)
class SocketEntry:
    local_port: int
    remote: str | None
    remote_port: int
    inode: int


def parse_net_table(text: str) -> list[SocketEntry]:
    """The sockets of one /proc/<pid>/net/{tcp,tcp6,udp,udp6} table (header skipped)."""
    out = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        try:
            _local_ip, local_port = fields[1].split(":")
            remote_ip, remote_port = fields[2].split(":")
            inode = int(fields[9])
            entry = SocketEntry(int(local_port, 16), _hex_ip(remote_ip), int(remote_port, 16),
                                inode)
        except ValueError:
            continue
        if inode:  # 0: TIME-WAIT and the like, held by no process
            out.append(entry)
    return out


def match_socket(entries: Iterable[SocketEntry], flow: Flow) -> int | None:
    """The inode of the sandbox socket that sent `flow`, if it is in the table.

    For "icmp" flows (pings), `flow.sport` is the echo identifier, which a ping socket
    (/proc/net/icmp) shows as its local port; raw sockets (/proc/net/raw) carry no identifier
    and are not matched.
    """
    unconnected = None
    for e in entries:
        if e.local_port != flow.sport:
            continue
        if e.remote_port == flow.dport and e.remote is not None and \
                _same_ip(e.remote, flow.via or flow.dst):
            return e.inode
        if flow.proto != "tcp" and e.remote_port == 0 and unconnected is None:
            unconnected = e.inode  # sendto() from an unconnected (UDP or ping) socket
    return unconnected


def match_raw(entries: Iterable[SocketEntry], flow: Flow) -> int | None:
    """A ping sent from a raw socket: /proc/net/raw{,6} shows the protocol (1 ICMP, 58 ICMPv6)
    as the local port and no identifier, so the socket is named only when it is the one raw
    ICMP socket that could have sent to `flow.dst`; with several, nothing is guessed."""
    written = flow.via or flow.dst  # the address as the sandbox's socket has it
    proto = 58 if ":" in written else 1
    found = {e.inode for e in entries if e.local_port == proto
             and (e.remote in (None, "0.0.0.0", "::") or _same_ip(str(e.remote), written))}
    return found.pop() if len(found) == 1 else None


def _read(path: str, limit: int = 1 << 22) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError:
        return None


def namespace_of(pid: int) -> str | None:
    """The network namespace link of a process ("net:[4026532...]"), None if unreadable."""
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def _nspids(pid: int | str) -> list[int]:
    """The NSpid line of /proc/<pid>/status: the pid in each PID namespace, outermost first."""
    data = _read(f"/proc/{pid}/status")
    for line in (data or b"").splitlines():
        if line.startswith(b"NSpid:"):
            try:
                return [int(field) for field in line.split()[1:]]
            except ValueError:
                return []
    return []


_OWN_DEPTH: list[int] = []  # how many PID namespaces deep tapbox itself is, as /proc shows


def pid_inside(pid: int) -> int:
    """The pid a process of the sandbox has inside it (one PID namespace below tapbox's);
    `pid` itself when it is not in a deeper namespace."""
    if not _OWN_DEPTH:
        _OWN_DEPTH.append(len(_nspids("self")) or 1)
    nspids = _nspids(pid)
    depth = _OWN_DEPTH[0]
    return nspids[depth] if len(nspids) > depth and nspids[depth - 1] == pid else pid


def process_info(pid: int) -> ProcessInfo | None:
    """pid (inside the sandbox), comm and cmdline of a process found as `pid` in /proc; None
    if it is gone."""
    comm = _read(f"/proc/{pid}/comm")
    raw = _read(f"/proc/{pid}/cmdline", MAX_CMDLINE_BYTES)
    if comm is None or raw is None:
        return None
    args = raw.split(b"\0")
    if args and args[-1] == b"":
        args.pop()
    cmdline = tuple(a.decode("utf-8", "replace") for a in args[:MAX_CMDLINE_ARGS])
    return ProcessInfo(pid_inside(pid), comm.decode("utf-8", "replace").strip(), cmdline)


class Scanner:
    """The /proc side, kept apart from trio so it can be tested on its own."""

    def __init__(self, sandbox_pid: int, netns: str) -> None:
        self.sandbox_pid = sandbox_pid
        self.netns = netns

    def members(self, deadline: float) -> list[int]:
        """Processes in the sandbox's network namespace, the sandbox child first."""
        found = []
        for entry in os.scandir("/proc"):
            if time.monotonic() > deadline:
                break
            name = entry.name
            if name.isdigit() and namespace_of(int(name)) == self.netns:
                found.append(int(name))
        found.sort(key=lambda pid: (pid != self.sandbox_pid, pid))
        return found

    def tables(self, members: list[int], protos: set[str]) -> dict[str, list[SocketEntry]]:
        """proto -> the sandbox's sockets of that protocol (v4 and v6 tables together)."""
        if "icmp" in protos:
            protos = protos | {"raw"}  # ping(8) as root uses a raw socket, not a ping socket
        for pid in members:
            out: dict[str, list[SocketEntry]] = {}
            for proto in protos:
                entries: list[SocketEntry] = []
                for table in (proto, proto + "6"):
                    data = _read(f"/proc/{pid}/net/{table}")
                    if data is not None:
                        entries.extend(parse_net_table(data.decode("ascii", "replace")))
                out[proto] = entries
            # An exited process (zombie) has no namespace left: its tables read as empty.
            if any(out.values()) or namespace_of(pid) == self.netns:
                return out
        return {proto: [] for proto in protos}

    def holders(self, members: list[int], inodes: set[int],
                deadline: float) -> tuple[dict[int, list[int]], bool]:
        """inode -> pids holding it; and whether the scan was complete (not cut by time)."""
        wanted = {f"socket:[{inode}]": inode for inode in inodes}
        found: dict[int, list[int]] = {}
        for pid in members:
            if time.monotonic() > deadline:
                return found, False
            base = f"/proc/{pid}/fd"
            try:
                fds = os.listdir(base)
            except OSError:
                continue
            for fd in fds:
                try:
                    link = os.readlink(f"{base}/{fd}")
                except OSError:
                    continue
                inode = wanted.get(link)
                if inode is not None and pid not in found.setdefault(inode, []):
                    found[inode].append(pid)
        return found, True

    def attribute(self, flows: list[tuple[Flow, float]]) -> list[ProcessInfo]:
        """One pass over /proc for several flows, each with its own deadline (monotonic)."""
        deadline = max(d for _, d in flows)
        members = self.members(deadline)
        tables = self.tables(members, {flow.proto for flow, _ in flows})
        inodes = [match_socket(tables.get(flow.proto, ()), flow)
                  or (match_raw(tables.get("raw", ()), flow) if flow.proto == "icmp" else None)
                  for flow, _ in flows]
        holders, complete = self.holders(members, {i for i in inodes if i}, deadline)
        out = []
        for inode in inodes:
            if inode is None:
                out.append(_unknown(UNKNOWN_GONE))
                continue
            pids = sorted(holders.get(inode, ()))
            info = None
            for pid in pids:
                info = process_info(pid)
                if info is not None:
                    others = tuple(pid_inside(p) for p in pids if p != pid)
                    info = ProcessInfo(info.pid, info.comm, info.cmdline, others)
                    break
            if info is None:
                info = _unknown(UNKNOWN_NO_HOLDER if complete else UNKNOWN_BUDGET)
            out.append(info)
        return out


# ----- the trio side ---------------------------------------------------------------------------


class Attributor:
    """Attributes flows in the background; `settled()` lets a refusal wait for it."""

    def __init__(self, sandbox_pid: int, on_done: Callable[[FlowRecord], None],
                 budget: float = DEFAULT_BUDGET) -> None:
        netns = namespace_of(sandbox_pid)
        self.scanner = Scanner(sandbox_pid, netns) if netns else None
        self.on_done = on_done
        self.budget = budget
        self._queue: list[tuple[FlowRecord, float, trio.Event]] = []
        self._waiting: dict[int, tuple[trio.Event, float]] = {}
        self._wakeup = trio.Event()
        self._running = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve attribution requests until cancelled."""
        self._running = True
        task_status.started()
        try:
            # Start the worker thread now (trio keeps idle ones a while): a first flow would
            # otherwise pay for the thread's creation out of its budget.
            await trio.to_thread.run_sync(lambda: None)
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                batch, self._queue = self._queue, []
                if batch:
                    await self._serve(batch)
        finally:
            self._running = False
            for record, _, done in self._queue:
                self._finish(record, _unknown(UNKNOWN_STOPPED), done)
            self._queue = []

    def start(self, record: FlowRecord) -> None:
        """Begin attributing a new flow (returns at once)."""
        if self.scanner is None or not self._running:
            record.process = _unknown(UNKNOWN_FAILED)
            return
        record.attributing = True
        done = trio.Event()
        deadline = trio.current_time() + self.budget
        self._waiting[id(record)] = (done, deadline)
        self._queue.append((record, time.monotonic() + self.budget, done))
        self._wakeup.set()

    async def settled(self, record: FlowRecord) -> None:
        """Wait until the flow's process is known or its budget is spent."""
        waiting = self._waiting.get(id(record))
        if waiting is not None:
            with trio.move_on_at(waiting[1] + 0.05):
                await waiting[0].wait()

    async def _serve(self, batch: list[tuple[FlowRecord, float, trio.Event]]) -> None:
        assert self.scanner is not None
        flows = [(record.flow, deadline) for record, deadline, _ in batch]
        try:
            infos = await trio.to_thread.run_sync(
                self.scanner.attribute, flows, abandon_on_cancel=True
            )
        except trio.Cancelled:
            for record, _, done in batch:
                self._finish(record, _unknown(UNKNOWN_STOPPED), done)
            raise
        except Exception as exc:  # /proc is best effort: never take the engine down with it,
            # but say what broke instead of a bare "failed" (a silent failure hid a trio change)
            reason = f"{UNKNOWN_FAILED} ({type(exc).__name__}: {exc})"[:200]
            infos = [_unknown(reason)] * len(batch)
        for (record, _, done), info in zip(batch, infos, strict=True):
            self._finish(record, info, done)

    def _finish(self, record: FlowRecord, info: ProcessInfo, done: trio.Event) -> None:
        record.process = info
        record.attributing = False
        self._waiting.pop(id(record), None)
        done.set()
        self.on_done(record)
