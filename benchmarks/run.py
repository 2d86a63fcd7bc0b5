#!/usr/bin/env python3
"""tapbox vs. slirp4netns (and pasta): one command, one hermetic topology, one table.

    sudo python3 benchmarks/run.py            # full run (about 11 minutes on 2 cores)
    sudo python3 benchmarks/run.py --quick    # smoke check (about 1 minute)

Theory of operation
-------------------
1. The script re-executes itself under ``unshare --net --mount`` (``unshare --user
   --map-root-user --net --mount`` when not root). In that throwaway namespace it checks that
   ``lo`` is the only link, brings it up with the TEST-NET addresses 192.0.2.10 and 198.51.100.53,
   and adds a veth pair whose two ends both stay in the namespace (203.0.113.1/24 plus a default
   route into it: pasta insists on an "external" interface with a default route, and a veth whose
   peer is in the same namespace is one that leads nowhere). A resolv.conf naming the fake DNS
   server is bind-mounted over /etc/resolv.conf in this mount namespace only, so slirp4netns' and
   pasta's DNS forwarders reach the fake server too. Nothing can leave the machine: the namespace
   has no link to anything outside it.
2. ``servers.py`` (echo, request/response, hold, HTTP, authoritative DNS for ``bench.test``) and
   ``iperf3 -s`` listen on those addresses.
3. Each configuration (tapbox, slirp4netns and pasta at an MTU) runs ``agent.py`` as its
   sandboxed command and drives it over a pipe: iperf3 clients, ping-pong, connection rate, DNS
   queries and 1,000 held connections all run inside the sandbox, against the servers outside.
   The "host-side process" is the one that moves the frames: the tapbox Python process itself,
   or slirp4netns, or pasta; its CPU time (utime+stime in /proc/PID/stat, all threads) is read
   before and after each bulk transfer, and its VmRSS idle and with 1,000 connections open.
4. Rounds: every configuration gets a fresh sandbox in every round and the order of the
   configurations rotates between rounds, so slow drift on the machine hits all of them alike.
   Each figure is the median over the rounds. Start-up (``-- true`` and a small HTTP fetch) is
   measured separately, alternating tools, and is the median of its own repetitions.
5. Every step has a timeout; every process started is in a registry, dies with this script
   (PR_SET_PDEATHSIG) and is killed in a ``finally``; a failed measurement shows up in the table as
   ``failed: reason``, never as a number.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import functools
import json
import os
import platform
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
AGENT = HERE / "agent.py"
SERVERS = HERE / "servers.py"
NETNS_ENV = "TAPBOX_BENCH_IN_NETNS"

SERVER_IP = "192.0.2.10"
DNS_SERVER_IP = "198.51.100.53"
LO_ADDRESSES = (SERVER_IP, DNS_SERVER_IP)
UPLINK, UPLINK_PEER, UPLINK_NET = "bup0", "bup1", "203.0.113.1/24"
UPLINK_GW = "203.0.113.254"
ECHO_PORT, RR_PORT, HOLD_PORT, HTTP_PORT, IPERF_PORT = 7001, 7002, 7003, 8080, 5201
SANDBOX_DNS = "10.0.2.3"
BENCH_NAME = "bench.test"
HTTP_URL = f"http://{SERVER_IP}:{HTTP_PORT}/"
HTTP_BODY = b"hello, world\n"
PINGPONG_WARMUP = 20  # exchanges agent.py makes before it starts timing
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


class BenchError(Exception):
    """One measurement failed; the message becomes "failed: <message>" in the table."""


# ================================================================================================
# Parameters


@dataclass(frozen=True)
class Params:
    rounds: int
    bulk_seconds: int
    pingpong_count: int
    connrate_seconds: float
    dns_seconds: float
    hold_count: int
    startup_runs: int

    @staticmethod
    def for_mode(quick: bool) -> Params:
        if quick:
            return Params(rounds=1, bulk_seconds=1, pingpong_count=1000, connrate_seconds=1.0,
                          dns_seconds=1.0, hold_count=1000, startup_runs=3)
        return Params(rounds=5, bulk_seconds=3, pingpong_count=5000, connrate_seconds=3.0,
                      dns_seconds=3.0, hold_count=1000, startup_runs=11)


# ================================================================================================
# Processes: every one is registered, dies with us, and is killed on the way out.


def _set_pdeathsig() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Procs:
    """Registry of the processes the benchmark started."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("start_new_session", True)
        try:
            proc = subprocess.Popen(list(argv), preexec_fn=_set_pdeathsig, **kwargs)
        except OSError as exc:
            raise BenchError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 2.0) -> None:
        """SIGTERM the process group, then SIGKILL after grace seconds; always reaps."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        else:  # the leader is gone; anything left in its group goes too
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.procs)):
            self.stop(proc, grace=1.0)
        # Orphans re-parented to us (we are a child subreaper): kill and reap them too.
        me = os.getpid()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(entry.name), signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError as exc:
        raise BenchError(f"host-side process {pid} is gone") from exc
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError as exc:
        raise BenchError(f"host-side process {pid} is gone") from exc
    raise BenchError(f"no VmRSS for process {pid}")


class LineReader:
    """Lines from a pipe with a deadline (select + os.read, no threads)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.fd = stream.fileno()
        self.buffer = b""

    def readline(self, timeout: float, what: str) -> bytes:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{what}: no answer within {timeout:.0f} s")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    raise BenchError(f"{what}: the process exited")
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    def read_some(self, timeout: float, what: str) -> bytes:
        """What is buffered or arrives within timeout; b"" at end of file."""
        if self.buffer:
            data, self.buffer = self.buffer, b""
            return data
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            raise BenchError(f"{what}: nothing within {timeout:.0f} s")
        return os.read(self.fd, 65536)


# ================================================================================================
# The hermetic topology


def reexec_in_netns(argv: Sequence[str]) -> None:
    """Replace this process with itself inside a throwaway network + mount namespace."""
    if shutil.which("unshare") is None:
        sys.exit("benchmark: unshare(1) is needed (util-linux)")
    userns = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    env = dict(os.environ, **{NETNS_ENV: "1"})
    cmd = ["unshare", *userns, "--net", "--mount", "--propagation", "private",
           sys.executable, str(Path(__file__).resolve()), *argv]
    os.execvpe("unshare", cmd, env)


def _run(argv: Sequence[str], timeout: float = 10.0) -> None:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          check=False)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")


def _write_sysctl(path: str, value: str) -> None:
    with contextlib.suppress(OSError):
        Path("/proc/sys", path).write_text(value)


def set_up_topology(workdir: Path) -> list[str]:
    """lo + TEST-NET addresses, the dead-end uplink, sysctls, resolv.conf. Returns notes."""
    links = [line.split(":", 1)[0].strip()
             for line in Path("/proc/net/dev").read_text().splitlines()[2:]]
    if links != ["lo"]:
        raise BenchError(f"not in a fresh network namespace (links: {links}); refusing to run")
    notes: list[str] = []
    _run(["ip", "link", "set", "lo", "up"])
    for addr in LO_ADDRESSES:
        _run(["ip", "addr", "add", f"{addr}/32", "dev", "lo"])
    try:
        _run(["ip", "link", "add", UPLINK, "type", "veth", "peer", "name", UPLINK_PEER])
        for link in (UPLINK, UPLINK_PEER):
            _write_sysctl(f"net/ipv6/conf/{link}/disable_ipv6", "1")
            _run(["ip", "link", "set", link, "up"])
        _run(["ip", "addr", "add", UPLINK_NET, "dev", UPLINK])
        _run(["ip", "route", "add", "default", "via", UPLINK_GW, "dev", UPLINK])
    except BenchError as exc:
        notes.append(f"no dead-end uplink for pasta ({exc})")
    _write_sysctl("net/ipv4/ip_local_port_range", "1024 65000")
    _write_sysctl("net/ipv4/tcp_tw_reuse", "1")
    resolv = workdir / "resolv.conf"
    resolv.write_text(f"nameserver {DNS_SERVER_IP}\n")
    target = os.path.realpath("/etc/resolv.conf")
    try:
        if not os.path.exists(target):
            raise BenchError(f"{target} does not exist")
        _run(["mount", "--bind", str(resolv), target])
    except BenchError as exc:
        notes.append(f"resolv.conf not replaced, slirp4netns/pasta DNS will fail ({exc})")
    return notes


def raise_nofile() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _tcp_sockets() -> list[tuple[str, str]]:
    """(local "HEXIP:HEXPORT", state) of every IPv4 TCP socket in this netns."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return [(cols[1], cols[3]) for cols in (row.split() for row in rows)]


def wait_iperf_idle(timeout: float) -> None:
    """Until the iperf3 server has no connection left but TIME-WAIT ones (it runs one test at
    a time and says "busy" to a client that comes while the last test is still closing)."""
    local = f"{_hex_ip(SERVER_IP)}:{IPERF_PORT:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(addr == local and state not in ("0A", "06") for addr, state in _tcp_sockets()):
            return
        time.sleep(0.05)


def _hex_ip(ip: str) -> str:
    return f"{socket.htonl(int.from_bytes(socket.inet_aton(ip), 'big')):08X}"


def wait_listening(port: int, timeout: float) -> None:
    """Until something listens on SERVER_IP:port (read from /proc/net/tcp, no connection)."""
    want = f"{_hex_ip(SERVER_IP)}:{port:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (want, "0A") in _tcp_sockets():
            return
        time.sleep(0.02)
    raise BenchError(f"nothing listens on {SERVER_IP}:{port} after {timeout:.0f} s")


class Servers:
    def __init__(self, procs: Procs, workdir: Path) -> None:
        self.procs = procs
        self.workdir = workdir
        self.servers: subprocess.Popen[bytes] | None = None
        self.iperf: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.workdir / "servers.log", "wb") as log:
            self.servers = self.procs.popen([sys.executable, str(SERVERS)],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=log)
        assert self.servers.stdout is not None
        line = LineReader(self.servers.stdout).readline(15, "servers.py")
        if line.strip() != b"ready":
            raise BenchError(f"servers.py said {line!r}")
        self.ensure_iperf()

    def ensure_iperf(self, restart: bool = False) -> None:
        if self.iperf is not None and (restart or self.iperf.poll() is not None):
            self.procs.stop(self.iperf)
            self.iperf = None
        if self.iperf is None:
            with open(self.workdir / "iperf3-server.log", "ab") as log:
                self.iperf = self.procs.popen(["iperf3", "-s", "-B", SERVER_IP, "-p",
                                               str(IPERF_PORT)], stdout=log, stderr=log)
            wait_listening(IPERF_PORT, 10)


# ================================================================================================
# Sandboxes: the tools under test, each running agent.py


@dataclass(frozen=True)
class Config:
    tool: str  # "tapbox" | "slirp4netns" | "pasta" | "direct"
    mtu: int

    @property
    def column(self) -> str:
        if self.tool == "direct":
            return "direct"
        short = {"slirp4netns": "slirp"}.get(self.tool, self.tool)
        return f"{short} {self.mtu}"


class Sandbox:
    """A running agent.py, inside a sandbox of one tool (or directly in the benchmark netns)."""

    def __init__(self, config: Config, procs: Procs, env: Env) -> None:
        self.config = config
        self.procs = procs
        self.env = env
        self.agent: subprocess.Popen[bytes] | None = None
        self.helper: subprocess.Popen[bytes] | None = None  # slirp4netns / pasta
        self.reader: LineReader | None = None
        self.host_pid: int | None = None
        self.dead: str | None = None
        self.pipes: list[int] = []

    # ----- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the agent in the tool's sandbox; returns once it reaches the echo server."""
        # The children keep their own copies of the log's fd.
        with open(self.env.workdir / f"{self.config.tool}-{self.config.mtu}.log", "ab") as log:
            self._start(log)
        reply = self.call({"op": "wait_net", "host": SERVER_IP, "port": ECHO_PORT,
                           "timeout": 15}, timeout=25)
        if "error" in reply:
            raise BenchError(f"network not up: {reply['error']}")

    def _start(self, log: IO[bytes]) -> None:
        agent_cmd = [sys.executable, str(AGENT)]
        tool, mtu = self.config.tool, self.config.mtu
        if tool == "tapbox":
            argv = [*self.env.tapbox, "--allow", SERVER_IP, "--allow", BENCH_NAME,
                    "--dns-upstream", DNS_SERVER_IP, "--mtu", str(mtu), "--", *agent_cmd]
        elif tool == "direct":
            argv = agent_cmd
        else:
            argv = ["unshare", "--user", "--map-root-user", "--net", "--mount", *agent_cmd]
        self.agent = self.procs.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=log)
        assert self.agent.stdout is not None
        self.reader = LineReader(self.agent.stdout)
        hello = json.loads(self.reader.readline(30, f"{tool} start-up"))
        if "hello" not in hello:
            raise BenchError(f"agent said {hello!r}")
        if tool == "tapbox":
            self.host_pid = self.agent.pid
        elif tool == "slirp4netns":
            self.helper, exit_fd = start_slirp(self.procs, hello["hello"], mtu, log, timeout=15)
            self.pipes.append(exit_fd)
            self.host_pid = self.helper.pid
        elif tool == "pasta":
            self.helper = start_pasta(self.procs, hello["hello"], mtu, self.env.workdir, log)
            self.host_pid = self.helper.pid

    def stop(self) -> None:
        if self.agent is not None and self.agent.poll() is None and self.dead is None:
            with contextlib.suppress(BenchError):
                self.call({"op": "exit"}, timeout=5)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.agent.wait(timeout=5)
        for proc in (self.agent, self.helper):
            if proc is not None:
                self.procs.stop(proc)
        for fd in self.pipes:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pipes.clear()

    # ----- the agent protocol -------------------------------------------------------------

    def call(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        if self.dead is not None:
            raise BenchError(self.dead)
        assert self.agent is not None and self.agent.stdin is not None and self.reader
        what = f"{self.config.column}: {request['op']}"
        try:
            self.agent.stdin.write((json.dumps(request) + "\n").encode())
            self.agent.stdin.flush()
            line = self.reader.readline(timeout, what)
        except (BenchError, OSError) as exc:
            # No reply in time, or the agent is gone: the pipe can no longer be trusted.
            self.dead = f"sandbox unusable after {what} failed: {exc}"
            raise BenchError(str(exc)) from exc
        reply: dict[str, Any] = json.loads(line)
        return reply

    def checked(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        reply = self.call(request, timeout)
        if "error" in reply:
            raise BenchError(str(reply["error"]))
        return reply


def start_slirp(procs: Procs, pid: int, mtu: int, log: IO[bytes],
                timeout: float) -> tuple[subprocess.Popen[bytes], int]:
    """slirp4netns --configure for the netns of pid, once it reports ready; closing the
    returned fd (its --exit-fd) tells it to exit."""
    ready_r, ready_w = os.pipe()
    exit_r, exit_w = os.pipe()
    try:
        proc = procs.popen(["slirp4netns", "--configure", f"--mtu={mtu}",
                            "--disable-host-loopback", f"--ready-fd={ready_w}",
                            f"--exit-fd={exit_r}", str(pid), "tap0"],
                           pass_fds=(ready_w, exit_r), stdout=log, stderr=log)
        os.close(ready_w)
        ready_w = -1
        os.close(exit_r)
        exit_r = -1
        ready, _, _ = select.select([ready_r], [], [], timeout)
        if not ready or os.read(ready_r, 1) != b"1":
            procs.stop(proc)
            raise BenchError("slirp4netns did not become ready")
        keep, exit_w = exit_w, -1
        return proc, keep
    finally:
        for fd in (ready_r, ready_w, exit_r, exit_w):
            if fd >= 0:
                os.close(fd)


def pasta_args(mtu: int, logfile: Path) -> list[str]:
    """pasta options for the same layout as tapbox and slirp4netns, and nothing forwarded in.

    --dns-forward sends queries for 10.0.2.3 to the first resolv.conf nameserver (no -D: with
    -D 10.0.2.3 this pasta version forwards them to 10.0.2.3 on the host, which is nothing)."""
    return ["pasta", "-q", "--runas", "0:0", "-l", str(logfile), "--config-net", "-4",
            "-a", "10.0.2.100", "-n", "24", "-g", "10.0.2.2", "-I", "tap0", "-i", UPLINK,
            "-m", str(mtu), "-t", "none", "-u", "none", "-T", "none", "-U", "none",
            "--no-map-gw", "--dns-forward", SANDBOX_DNS]


def start_pasta(procs: Procs, pid: int, mtu: int, workdir: Path,
                log: IO[bytes]) -> subprocess.Popen[bytes]:
    # -f: stay in the foreground, so the process we measure is the one that moves the frames.
    argv = pasta_args(mtu, workdir / f"pasta-{mtu}-{pid}.log")
    return procs.popen([argv[0], "-f", *argv[1:], str(pid)], stdout=log, stderr=log)


@dataclass
class Env:
    workdir: Path
    tapbox: list[str]
    procs: Procs
    servers: Servers
    params: Params
    have_pasta: bool
    notes: list[str] = field(default_factory=list)
    quiet_wait: float = 0.0


# ================================================================================================
# Results


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    fmt: str
    better: str  # "higher" | "lower"


METRICS: tuple[Metric, ...] = (
    Metric("up1", "TCP sandbox->server, 1 conn (Gbit/s)", "{:.2f}", "higher"),
    Metric("up4", "TCP sandbox->server, 4 conns (Gbit/s)", "{:.2f}", "higher"),
    Metric("down1", "TCP server->sandbox, 1 conn (Gbit/s)", "{:.2f}", "higher"),
    Metric("down4", "TCP server->sandbox, 4 conns (Gbit/s)", "{:.2f}", "higher"),
    Metric("cpu_up1", "CPU s/GB, sandbox->server, 1 conn", "{:.2f}", "lower"),
    Metric("cpu_up4", "CPU s/GB, sandbox->server, 4 conns", "{:.2f}", "lower"),
    Metric("cpu_down1", "CPU s/GB, server->sandbox, 1 conn", "{:.2f}", "lower"),
    Metric("cpu_down4", "CPU s/GB, server->sandbox, 4 conns", "{:.2f}", "lower"),
    Metric("lat_p50", "1-byte ping-pong p50 (us)", "{:.0f}", "lower"),
    Metric("lat_p99", "1-byte ping-pong p99 (us)", "{:.0f}", "lower"),
    Metric("cpu_rtt", "host CPU per ping-pong round trip (us)", "{:.0f}", "lower"),
    Metric("connrate", "connections/s (1 KB req + 1 KB resp)", "{:.0f}", "higher"),
    Metric("cpu_conn", "host CPU per connection (us)", "{:.0f}", "lower"),
    Metric("dns_qps", "DNS queries/s (1 in flight)", "{:.0f}", "higher"),
    Metric("dns_p50", "DNS p50 latency (us)", "{:.0f}", "lower"),
    Metric("startup", "start-up `-- true` (ms)", "{:.0f}", "lower"),
    Metric("ttfb", "start to first byte of HTTP fetch (ms)", "{:.0f}", "lower"),
    Metric("rss_idle", "host-side RSS idle (MB)", "{:.1f}", "lower"),
    Metric("rss_1000", "host-side RSS, 1,000 conns open (MB)", "{:.1f}", "lower"),
)
BULK: tuple[tuple[str, list[str]], ...] = (
    ("up1", []), ("up4", ["-P", "4"]), ("down1", ["-R"]), ("down4", ["-R", "-P", "4"]))


@dataclass
class Cell:
    samples: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None


class Results:
    def __init__(self) -> None:
        self.cells: dict[tuple[str, str], Cell] = {}

    def cell(self, metric: str, column: str) -> Cell:
        return self.cells.setdefault((metric, column), Cell())

    def add(self, metric: str, column: str, value: float) -> None:
        self.cell(metric, column).samples.append(value)

    def fail(self, metric: str, column: str, reason: str) -> None:
        self.cell(metric, column).failures.append(reason)

    def median(self, metric: str, column: str) -> float | None:
        cell = self.cells.get((metric, column))
        return cell.median() if cell else None

    def to_json(self) -> dict[str, Any]:
        return {f"{m}|{c}": {"samples": cell.samples, "failures": cell.failures,
                             "median": cell.median()}
                for (m, c), cell in self.cells.items()}


def _as_bench_error(exc: Exception) -> BenchError:
    if isinstance(exc, BenchError):
        return exc
    return BenchError(f"{type(exc).__name__}: {exc}")


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        raise BenchError("no samples")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


# ================================================================================================
# Measurements inside one sandbox


def measure_session(sb: Sandbox, env: Env, results: Results, log: Callable[[str], None]) -> None:
    """Everything one fresh sandbox measures, in order; each failure is recorded, not raised."""
    p = env.params
    col = sb.config.column

    def attempt(keys: Sequence[str], fn: Callable[[], Sequence[float]]) -> None:
        try:
            values = fn()
        except Exception as exc:  # any failure is a table entry, not a crash
            exc = _as_bench_error(exc)
            for key in keys:
                results.fail(key, col, str(exc))
            log(f"    {'/'.join(keys)}: failed: {exc}")
            return
        for key, value in zip(keys, values, strict=True):
            results.add(key, col, value)
        shown = ", ".join(f"{k}={v:.3g}" for k, v in zip(keys, values, strict=True))
        log(f"    {shown}")

    host_pid = sb.host_pid
    if host_pid is not None:
        time.sleep(0.3)
        attempt(["rss_idle"], lambda: [proc_rss_mb(host_pid)])
        for key, extra in BULK:
            attempt([key, f"cpu_{key}"], functools.partial(bulk, sb, env, extra))
    if host_pid is None:
        attempt(["lat_p50", "lat_p99"], lambda: pingpong(sb, p.pingpong_count)[:2])
        attempt(["connrate"], lambda: connrate(sb, p.connrate_seconds)[:1])
    else:
        attempt(["lat_p50", "lat_p99", "cpu_rtt"], lambda: pingpong(sb, p.pingpong_count))
        attempt(["connrate", "cpu_conn"], lambda: connrate(sb, p.connrate_seconds))
    attempt(["dns_qps", "dns_p50"], lambda: dns_rate(sb, SANDBOX_DNS, p.dns_seconds))
    if host_pid is not None:
        attempt(["rss_1000"], lambda: held_rss(sb, p.hold_count, host_pid))


def bulk(sb: Sandbox, env: Env, extra: list[str]) -> list[float]:
    assert sb.host_pid is not None
    seconds = env.params.bulk_seconds
    env.servers.ensure_iperf()
    argv = ["iperf3", "-c", SERVER_IP, "-p", str(IPERF_PORT), "-t", str(seconds), "-J", *extra]
    for attempt in range(2):
        wait_iperf_idle(10)
        cpu0 = proc_cpu_seconds(sb.host_pid)
        reply = sb.checked({"op": "run", "argv": argv, "timeout": seconds + 30},
                           timeout=seconds + 45)
        cpu1 = proc_cpu_seconds(sb.host_pid)
        try:
            report = json.loads(reply["stdout"])
        except ValueError:
            report = {}
        if attempt == 0 and "busy" in str(report.get("error", "")):
            time.sleep(1.0)  # the previous test's connections are still closing: once more
            continue
        break
    if reply["rc"] != 0 or "error" in report:
        env.servers.ensure_iperf(restart=True)
        reason = report.get("error") or reply["stderr"].strip() or f"rc {reply['rc']}"
        raise BenchError(f"iperf3: {str(reason)[:200]}")
    received = report["end"]["sum_received"]
    if received["bytes"] <= 0 or received["seconds"] <= 0:
        raise BenchError("iperf3 moved no data")
    gbits = received["bytes"] * 8 / received["seconds"] / 1e9
    cpu_per_gb = (cpu1 - cpu0) / (received["bytes"] / 1e9)
    return [gbits, cpu_per_gb]


def _host_cpu(sb: Sandbox) -> float:
    return 0.0 if sb.host_pid is None else proc_cpu_seconds(sb.host_pid)


def pingpong(sb: Sandbox, count: int) -> list[float]:
    """[p50 us, p99 us, host-side CPU us per round trip]"""
    cpu0 = _host_cpu(sb)
    reply = sb.checked({"op": "pingpong", "host": SERVER_IP, "port": ECHO_PORT, "count": count,
                        "timeout": 60}, timeout=90)
    cpu1 = _host_cpu(sb)
    rtts = reply["rtts_us"]
    if len(rtts) < count // 2:
        raise BenchError(f"only {len(rtts)} of {count} round trips in 60 s")
    per_rtt = (cpu1 - cpu0) / (len(rtts) + PINGPONG_WARMUP) * 1e6
    return [percentile(rtts, 50), percentile(rtts, 99), per_rtt]


def connrate(sb: Sandbox, seconds: float) -> list[float]:
    """[connections/s, host-side CPU us per connection]"""
    cpu0 = _host_cpu(sb)
    reply = sb.checked({"op": "connrate", "host": SERVER_IP, "port": RR_PORT,
                        "duration": seconds, "size": 1024}, timeout=seconds + 60)
    cpu1 = _host_cpu(sb)
    if reply["errors"]:
        raise BenchError(f"{reply['errors']} connections failed ({reply['last_error']}) "
                         f"after {reply['count']} good ones")
    if not reply["count"]:
        raise BenchError("no connection completed")
    return [reply["count"] / reply["elapsed"], (cpu1 - cpu0) / reply["count"] * 1e6]


def dns_rate(sb: Sandbox, server: str, seconds: float) -> list[float]:
    reply = sb.checked({"op": "dns", "server": server, "name": BENCH_NAME,
                        "duration": seconds}, timeout=seconds + 60)
    if reply["errors"]:
        raise BenchError(f"{reply['errors']} queries failed ({reply['last_error']}) "
                         f"after {reply['count']} good ones")
    return [reply["count"] / reply["elapsed"], percentile(reply["latencies_us"], 50)]


def held_rss(sb: Sandbox, count: int, host_pid: int) -> list[float]:
    try:
        sb.checked({"op": "hold", "host": SERVER_IP, "port": HOLD_PORT, "count": count,
                    "timeout": 60}, timeout=90)
        time.sleep(0.3)
        return [proc_rss_mb(host_pid)]
    finally:
        if sb.dead is None:
            with contextlib.suppress(BenchError):
                sb.call({"op": "release"}, timeout=30)


# ================================================================================================
# Start-up: `TOOL -- true` and time to the first byte of an HTTP fetch


def _timed_popen(env: Env, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    with open(env.workdir / "startup-stderr.log", "wb") as err:  # the child keeps a copy
        return env.procs.popen(argv, stdout=subprocess.PIPE, stderr=err, **kwargs)


def time_tapbox(env: Env, cmd: list[str], first_byte: bool) -> float:
    argv = [*env.tapbox, "--allow", SERVER_IP, "--", *cmd]
    t0 = time.perf_counter()
    proc = _timed_popen(env, argv)
    try:
        return _finish_timed(env, proc, t0, first_byte, "tapbox")
    finally:
        env.procs.stop(proc)


def time_pasta(env: Env, cmd: list[str], first_byte: bool) -> float:
    argv = [*pasta_args(65520, env.workdir / "pasta-startup.log"), "--", *cmd]
    t0 = time.perf_counter()
    proc = _timed_popen(env, argv)
    try:
        return _finish_timed(env, proc, t0, first_byte, "pasta")
    finally:
        env.procs.stop(proc)


def time_slirp(env: Env, cmd: list[str], first_byte: bool) -> float:
    """The classic rootless set-up: unshare, slirp4netns --configure attached to it, exec CMD.

    sh prints an empty line once it runs (the namespaces exist), waits for slirp4netns to
    report ready, then execs CMD; slirp4netns exits when CMD is done (its exit-fd closes)."""
    script = 'echo; read _ && exec "$@"'
    t0 = time.perf_counter()
    proc = _timed_popen(env, ["unshare", "--user", "--map-root-user", "--net", "--mount",
                              "sh", "-c", script, "sh", *cmd], stdin=subprocess.PIPE)
    slirp: subprocess.Popen[bytes] | None = None
    exit_fd = -1
    try:
        assert proc.stdout is not None and proc.stdin is not None
        reader = LineReader(proc.stdout)
        reader.readline(10, "unshare")
        with open(env.workdir / "slirp-startup.log", "ab") as log:
            slirp, exit_fd = start_slirp(env.procs, proc.pid, 65520, log, timeout=10)
        proc.stdin.write(b"\n")
        proc.stdin.close()
        elapsed = _finish_timed(env, proc, t0, first_byte, "unshare+slirp4netns", reader)
        os.close(exit_fd)
        exit_fd = -1
        try:
            slirp.wait(timeout=10)
        except subprocess.TimeoutExpired as exc:
            raise BenchError("slirp4netns did not exit after its exit-fd closed") from exc
        return elapsed if first_byte else time.perf_counter() - t0
    finally:
        if exit_fd >= 0:
            os.close(exit_fd)
        if slirp is not None:
            env.procs.stop(slirp)
        env.procs.stop(proc)


def _finish_timed(env: Env, proc: subprocess.Popen[bytes], t0: float, first_byte: bool,
                  what: str, reader: LineReader | None = None) -> float:
    """Seconds from t0 to the first byte on stdout (first_byte) or to the exit of proc."""
    assert proc.stdout is not None
    reader = reader or LineReader(proc.stdout)
    elapsed: float | None = None
    body = b""
    deadline = time.monotonic() + 15
    if first_byte:
        body = reader.read_some(15, what)
        elapsed = time.perf_counter() - t0
    while True:  # the rest of stdout, up to EOF
        chunk = reader.read_some(max(0.01, deadline - time.monotonic()), what)
        if not chunk:
            break
        body += chunk
    try:
        proc.wait(timeout=max(0.01, deadline - time.monotonic()))
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{what} did not finish within 15 s") from exc
    if elapsed is None:
        elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        err = (env.workdir / "startup-stderr.log").read_bytes()
        tail = err.decode(errors="replace").strip().splitlines()[-1:]
        raise BenchError(f"{what} exited {proc.returncode}: {' '.join(tail)[:150]}")
    if first_byte and body != HTTP_BODY:
        raise BenchError(f"{what}: unexpected HTTP body {body[:60]!r}")
    return elapsed


def measure_startup(env: Env, results: Results, configs: Sequence[Config],
                    log: Callable[[str], None]) -> None:
    curl = ["curl", "-sS", "--max-time", "10", HTTP_URL]
    timers: dict[str, Callable[[Env, list[str], bool], float]] = {
        "tapbox": time_tapbox, "slirp4netns": time_slirp, "pasta": time_pasta}
    tools = [(c.column, timers[c.tool]) for c in configs if c.mtu == 65520 and c.tool in timers]
    if not tools:
        return
    for i in range(env.params.startup_runs):
        if env.quiet_wait > 0:
            wait_quiet(min(env.quiet_wait, 30.0), log)
        for column, fn in tools[i % len(tools):] + tools[:i % len(tools)]:
            for key, cmd, first in (("startup", ["true"], False), ("ttfb", curl, True)):
                try:
                    results.add(key, column, fn(env, cmd, first) * 1000)
                except Exception as exc:  # any failure is a table entry, not a crash
                    exc = _as_bench_error(exc)
                    results.fail(key, column, str(exc))
                    log(f"    {column} {key}: failed: {exc}")
    for column, _ in tools:
        log(f"  {column}: -- true {_fmt(results.median('startup', column), '{:.0f}')} ms, "
            f"first byte {_fmt(results.median('ttfb', column), '{:.0f}')} ms")


# ================================================================================================
# Profile (optional): py-spy on the tapbox process during bulk transfers and connections


def profile_tapbox(env: Env, outdir: Path, log: Callable[[str], None]) -> list[str]:
    """py-spy record of the tapbox process per workload; returns summary lines (markdown)."""
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        return ["profile skipped: py-spy not installed (pip install py-spy)"]
    outdir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    seconds = max(env.params.bulk_seconds, 3)
    workloads: list[tuple[str, dict[str, Any]]] = [
        (name, {"op": "run", "timeout": seconds + 30,
                "argv": ["iperf3", "-c", SERVER_IP, "-p", str(IPERF_PORT), "-t",
                         str(seconds), *extra]})
        for name, extra in BULK if name in ("up1", "down1")]
    workloads.append(("connrate", {"op": "connrate", "host": SERVER_IP, "port": RR_PORT,
                                   "duration": seconds, "size": 1024}))
    workloads.append(("pingpong", {"op": "pingpong", "host": SERVER_IP, "port": ECHO_PORT,
                                   "count": 100000, "timeout": seconds}))
    rate = 250
    for name, request in workloads:
        sb = Sandbox(Config("tapbox", 65520), env.procs, env)
        try:
            sb.start()
            assert sb.host_pid is not None
            env.servers.ensure_iperf()
            wait_iperf_idle(10)
            raw = outdir / f"{name}.txt"
            # Default (blocking) sampling: py-spy briefly stops the process for each sample,
            # which keeps stacks consistent; at 250 Hz that costs the engine a few percent.
            spy = env.procs.popen([pyspy, "record", "-r", str(rate), "-f", "raw", "-o",
                                   str(raw), "-p", str(sb.host_pid)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)  # py-spy attaches
            cpu0, t0 = proc_cpu_seconds(sb.host_pid), time.monotonic()
            sb.checked(request, timeout=seconds + 60)
            cpu1, t1 = proc_cpu_seconds(sb.host_pid), time.monotonic()
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
            try:
                _, err = spy.communicate(timeout=30)
            except subprocess.TimeoutExpired as exc:
                raise BenchError("py-spy did not finish") from exc
            if not raw.exists():
                raise BenchError(f"py-spy failed: {err.decode(errors='replace')[-200:]}")
            lines.extend(summarize_profile(name, raw, cpu1 - cpu0, t1 - t0))
        except Exception as exc:  # a failed profile is reported, not fatal
            lines.append(f"{name}: profile failed: {_as_bench_error(exc)}")
        finally:
            sb.stop()
        log(f"  profiled {name}")
    return lines


def summarize_profile(name: str, raw: Path, cpu: float, wall: float,
                      top: int = 15) -> list[str]:
    """The functions with the most samples (self and inclusive) in the engine's trio thread,
    plus the engine's CPU share from /proc. py-spy does not reliably tell a thread blocked in a
    system call from a running one here, so the samples of other threads are left out, and
    time the engine spends waiting in epoll shows up under `get_events`."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")
                  if not f.startswith(("process ", "thread "))]
        if not any(f.startswith("unrolled_run (") for f in frames):
            continue  # not the engine (trio) thread: e.g. the signal forwarder's sigwaitinfo
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
    out = [f"#### {name}: tapbox used {cpu:.2f} CPU s in {wall:.2f} s "
           f"({100 * cpu / max(wall, 1e-6):.0f}% of a core); {total} samples of the trio thread",
           "",
           "| self % | incl. % | function |", "| ---: | ---: | --- |"]
    for frame, count in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"| {100 * count / max(1, total):.1f} | "
                   f"{100 * inclusive[frame] / max(1, total):.1f} | `{frame}` |")
    out.append("")
    return out


# ================================================================================================
# Report


def _fmt(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _cell_text(results: Results, metric: Metric, column: str, planned: int) -> str:
    cell = results.cells.get((metric.key, column))
    if cell is None:
        return "-"
    if not cell.samples:
        reason = cell.failures[0] if cell.failures else "no data"
        return "failed: " + (reason if len(reason) <= 48 else reason[:45] + "...")
    text = metric.fmt.format(cell.median())
    if cell.failures or len(cell.samples) < planned:
        text += f" ({len(cell.samples)}/{planned} ok)"
    return text


def render_table(results: Results, columns: Sequence[str], ratios: Sequence[str],
                 params: Params) -> list[str]:
    head = ["metric (median)", *columns, *(f"tapbox/{c}" for c in ratios), "better"]
    rows = [head, ["---"] + ["---:"] * (len(head) - 2) + ["---"]]
    for metric in METRICS:
        planned = params.startup_runs if metric.key in ("startup", "ttfb") else params.rounds
        row = [metric.label]
        row += [_cell_text(results, metric, c, planned) for c in columns]
        ours = results.median(metric.key, "tapbox 65520")
        for peer in ratios:
            theirs = results.median(metric.key, peer)
            row.append("-" if ours is None or not theirs else f"{ours / theirs:.2f}x")
        row.append(metric.better)
        rows.append(row)
    return ["| " + " | ".join(r) + " |" for r in rows]


@dataclass(frozen=True)
class Target:
    text: str
    metric: str
    peer: str | None  # None: absolute bound
    bound: float
    at_least: bool
    goal: bool = False


def _issue13_targets() -> tuple[Target, ...]:
    """Issue 13's targets: every row at least as good as slirp4netns at MTU 65520 (start-up
    rows: at most 1.5x), download on one connection at least pasta's, memory as before this
    round (docs/performance.md, run of 2026-11-24: 31.5 MB idle, 49.8 MB with 1,000)."""
    out: list[Target] = []
    for m in METRICS:
        if m.key in ("startup", "ttfb"):
            out.append(Target(f"{m.key}: <= 1.5x slirp4netns", m.key, "slirp 65520", 1.5, False))
        else:
            sign = ">=" if m.better == "higher" else "<="
            out.append(Target(f"{m.key}: {sign} 1.0x slirp4netns at MTU 65520", m.key,
                              "slirp 65520", 1.0, m.better == "higher"))
    out.append(Target("down1: >= 1.0x pasta", "down1", "pasta 65520", 1.0, True))
    out.append(Target("host-side RSS idle <= 31.5 MB (as before)", "rss_idle", None, 31.5, False))
    out.append(Target("host-side RSS with 1,000 connections <= 49.8 MB (as before)", "rss_1000",
                      None, 49.8, False))
    return tuple(out)


TARGETS: tuple[Target, ...] = _issue13_targets()


def render_targets(results: Results) -> list[str]:
    out = []
    for target in TARGETS:
        ours = results.median(target.metric, "tapbox 65520")
        if target.peer is None:
            value, shown = ours, _fmt(ours, "{:.1f}")
        else:
            theirs = results.median(target.metric, target.peer)
            value = None if ours is None or not theirs else ours / theirs
            shown = _fmt(value, "{:.2f}x")
        if value is None:
            verdict = "n/a (no figure)"
        else:
            ok = value >= target.bound if target.at_least else value <= target.bound
            verdict = "PASS" if ok else ("missed (goal)" if target.goal else "FAIL")
        out.append(f"- {verdict}: {target.text} — measured {shown}")
    return out


def render_failures(results: Results) -> list[str]:
    out = []
    for (metric, column), cell in sorted(results.cells.items()):
        for reason in sorted(set(cell.failures)):
            out.append(f"- {metric} / {column}: failed {cell.failures.count(reason)}x: {reason}")
    return out


def machine_info(env: Env) -> list[str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"unavailable ({exc})"
        lines = [ln for ln in (out.stdout + out.stderr).splitlines()
                 if ln.strip() and "syslog" not in ln]
        return lines[0].strip() if lines else "unknown"

    slirp = first_line(["slirp4netns", "--version"])
    libslirp = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["slirp4netns", "--version"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
        libslirp = next((ln for ln in out.splitlines() if ln.startswith("libslirp")), "")
    pasta = (first_line(["dpkg-query", "-W", "-f", "${Package} ${Version}", "passt"])
             if env.have_pasta else
             "not measured" if shutil.which("pasta") else "not installed")
    git = first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    return [
        f"- date: {datetime.date.today().isoformat()}",
        f"- CPU: {cpu}, {os.cpu_count()} cores; kernel {platform.release()}; "
        f"Python {platform.python_version()}",
        f"- tapbox: {' '.join(env.tapbox)} (git {git})",
        f"- slirp4netns: {slirp} ({libslirp or 'libslirp ?'}); pasta: {pasta}; "
        f"{first_line(['iperf3', '--version'])}",
    ]


# ================================================================================================
# Main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="tapbox vs. slirp4netns/pasta, hermetic (a throwaway network namespace).")
    parser.add_argument("--quick", action="store_true",
                        help="smoke check: 1 round, 1 s transfers, 3 start-ups (about 1 minute)")
    parser.add_argument("--rounds", type=int, help="rounds per configuration (default 5)")
    parser.add_argument("--tools", default="tapbox,slirp4netns,pasta",
                        help="comma-separated tools to run (default: all installed)")
    parser.add_argument("--profile", metavar="DIR",
                        help="also run py-spy on tapbox during up/down/connrate/ping-pong and "
                             "write raw stacks and a summary to DIR")
    parser.add_argument("--json", metavar="FILE", help="write every sample to FILE")
    parser.add_argument("--quiet-wait", type=float, default=0.0, metavar="SECONDS",
                        help="before each session, wait up to SECONDS for other processes on "
                             "the machine to go quiet (< 0.3 cores); default 0: do not wait")
    parser.add_argument("--max-minutes", type=float, default=45.0,
                        help="stop (cleaning up) if the whole run takes longer (default 45)")
    parser.add_argument("--tapbox", default=None,
                        help="tapbox command (default: `tapbox` on PATH, else python -m tapbox)")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if os.environ.get(NETNS_ENV) != "1":
        reexec_in_netns(argv)
    params = Params.for_mode(args.quick)
    if args.rounds:
        params = Params(**{**params.__dict__, "rounds": max(1, args.rounds)})
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    started = time.monotonic()

    def log(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {text}", file=sys.stderr, flush=True)

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))

    def overtime(*_: object) -> None:
        raise SystemExit(f"benchmark: still running after {args.max_minutes} minutes: "
                         "stopped (see --max-minutes)")

    signal.signal(signal.SIGALRM, overtime)
    signal.alarm(int(args.max_minutes * 60))
    raise_nofile()
    procs = Procs()
    out = Output()
    load0 = cpu_snapshot()
    with tempfile.TemporaryDirectory(prefix="tapbox-bench-") as tmp:
        workdir = Path(tmp)
        try:
            status = _main(args, params, tools, procs, workdir, log, out)
        finally:
            procs.stop_all()
    if not out.lines:
        return status
    # Every process we started is reaped now, so our children's CPU time is complete.
    load = other_load(load0, cpu_snapshot())
    text = (f"- other load on the machine during the run (CPU time of processes that are not "
            f"the benchmark's): {load:.2f} cores on average of {os.cpu_count()}")
    if load > 0.1:
        text += " -- figures may be perturbed; rerun on an idle machine to confirm"
    out.lines = [text if line == LOAD_PLACEHOLDER else line for line in out.lines]
    print("\n".join(out.lines))
    if args.json:
        out.payload["other_load_cores"] = load
        Path(args.json).write_text(json.dumps(out.payload, indent=1))
    return status


LOAD_PLACEHOLDER = "\0load"


@dataclass
class Output:
    lines: list[str] = field(default_factory=list)
    payload: dict[str, Any] = field(default_factory=dict)


def cpu_snapshot() -> tuple[float, float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of us and our reaped children, now)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system, time.monotonic()


def machine_busy(seconds: float) -> float:
    """Cores busy on the whole machine over the next `seconds`."""
    def snap() -> tuple[int, int]:
        values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return sum(values) - values[3] - values[4], sum(values)

    busy0, all0 = snap()
    time.sleep(seconds)
    busy1, all1 = snap()
    return (busy1 - busy0) / max(1, all1 - all0) * (os.cpu_count() or 1)


def wait_quiet(limit: float, log: Callable[[str], None], threshold: float = 0.3) -> None:
    """Between sessions (our own processes idle): wait up to `limit` seconds until the machine
    is quiet, i.e. other processes use less than `threshold` cores over a second."""
    deadline = time.monotonic() + limit
    busy = machine_busy(1.0)
    while busy >= threshold and time.monotonic() < deadline:
        busy = machine_busy(1.0)
    if busy >= threshold:
        log(f"  machine still busy ({busy:.2f} cores) after waiting {limit:.0f} s: going on")


def other_load(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    wall = max(1e-6, after[2] - before[2])
    return max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / wall


def _main(args: argparse.Namespace, params: Params, tools: list[str], procs: Procs,
          workdir: Path, log: Callable[[str], None], out: Output) -> int:
    for tool in ("iperf3", "curl", "ip"):
        if shutil.which(tool) is None:
            print(f"benchmark: {tool} is needed", file=sys.stderr)
            return 2
    tapbox = args.tapbox.split() if args.tapbox else (
        [shutil.which("tapbox") or ""] if shutil.which("tapbox")
        else [sys.executable, "-m", "tapbox"])
    notes = set_up_topology(workdir)
    servers = Servers(procs, workdir)
    servers.start()
    have_pasta = shutil.which("pasta") is not None and "pasta" in tools
    env = Env(workdir, tapbox, procs, servers, params, have_pasta, notes, args.quiet_wait)
    if "pasta" in tools and shutil.which("pasta") is None:
        notes.append("pasta is not installed: no pasta column")
    configs = [Config("tapbox", 65520), Config("tapbox", 1500)] if "tapbox" in tools else []
    if "slirp4netns" in tools and shutil.which("slirp4netns"):
        configs += [Config("slirp4netns", 65520), Config("slirp4netns", 1500)]
    if have_pasta:
        configs.append(Config("pasta", 65520))
    results = Results()
    info = machine_info(env)
    for line in info + [f"- note: {n}" for n in notes]:
        log(line)
    log(f"{params.rounds} round(s) x {len(configs)} configurations; {params}")

    for rnd in range(params.rounds):
        shift = rnd % max(1, len(configs))
        for config in configs[shift:] + configs[:shift]:
            if args.quiet_wait > 0:
                wait_quiet(args.quiet_wait, log)
            log(f"round {rnd + 1}/{params.rounds}: {config.column}")
            run_one_session(config, env, results, log)
        log(f"round {rnd + 1}/{params.rounds}: direct (DNS without a sandbox)")
        run_one_session(Config("direct", 0), env, results, log)
    log(f"start-up: {params.startup_runs} runs per tool")
    measure_startup(env, results, configs, log)
    profile_lines: list[str] = []
    if args.profile:
        log("profiling tapbox with py-spy")
        profile_lines = profile_tapbox(env, Path(args.profile), log)

    columns = [c.column for c in configs]
    ratios = [c for c in ("slirp 65520", "slirp 1500", "pasta 65520") if c in columns]
    columns.append("direct")
    report = [
        "## Results",
        "",
        *info,
        f"- runs: median of {params.rounds} round(s) (a fresh sandbox per configuration per "
        f"round); start-up: median of {params.startup_runs}; bulk: iperf3 -t "
        f"{params.bulk_seconds}; ping-pong: {params.pingpong_count} round trips; connection "
        f"rate and DNS: {params.connrate_seconds:g} s / {params.dns_seconds:g} s each; "
        f"{params.hold_count} held connections" + (" (--quick)" if args.quick else ""),
        "- command: " + " ".join(["python3 benchmarks/run.py", *sys.argv[1:]]),
        *(f"- note: {n}" for n in notes),
        LOAD_PLACEHOLDER,
        "",
        *render_table(results, columns, ratios, params),
        "",
        "### Targets (tapbox at its default MTU 65520)",
        "",
        *render_targets(results),
    ]
    failures = render_failures(results)
    if failures:
        report += ["", "### Failed measurements", "", *failures]
    if profile_lines:
        report += ["", "## Profile (py-spy, tapbox process)", "", *profile_lines]
    out.lines = report
    out.payload = {"params": params.__dict__, "info": info, "notes": notes,
                   "results": results.to_json()}
    return 0


def run_one_session(config: Config, env: Env, results: Results,
                    log: Callable[[str], None]) -> None:
    sb = Sandbox(config, env.procs, env)
    try:
        sb.start()
    except Exception as exc:  # any failure is a table entry, not a crash
        reason = f"sandbox did not start: {_as_bench_error(exc)}"
        keys = ["dns_qps", "dns_p50"] if config.tool == "direct" else [
            m.key for m in METRICS if m.key not in ("startup", "ttfb")]
        for key in keys:
            results.fail(key, config.column, reason)
        log(f"    {reason}")
        sb.stop()
        return
    try:
        if config.tool == "direct":
            try:
                qps, p50 = dns_rate(sb, DNS_SERVER_IP, env.params.dns_seconds)
                results.add("dns_qps", "direct", qps)
                results.add("dns_p50", "direct", p50)
                log(f"    dns_qps={qps:.3g}, dns_p50={p50:.3g}")
            except BenchError as exc:
                results.fail("dns_qps", "direct", str(exc))
                results.fail("dns_p50", "direct", str(exc))
        else:
            measure_session(sb, env, results, log)
    finally:
        sb.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
