"""One tapbox run: allowlist, sandbox, engine, command, exit status — in that order.

Everything a user can get wrong is checked before the command runs (the allowlist parses,
the DNS upstream is known, the record files open, the sandbox is set up); only then is the
sandbox told to exec. The engine's modules (trio, the stack: about 0.1 s) are imported in a
thread meanwhile, and the command starts without waiting for them: until the engine's loop
reads the TAP device, the command's frames wait in tap0's queue, so nothing reaches the network
undecided, and the command's own start-up overlaps tapbox's. If the engine cannot start, or
fails afterwards, for whatever reason, the command is killed at once, tapbox says so in one
line and exits 125: tapbox never leaves a command running without its firewall. With
--timeout, the whole sandbox is killed when the time (counted from the command's start) is up
and tapbox exits 124 (as timeout(1)).

The sandbox's supervisor thread (tapbox.isolate.supervisor) names every system call the policy
refuses; `ViolationSink` passes each to the audit layer in the thread that owns it (the trio
loop, through its token, or directly in a run without network, where the main thread only
waits).

What to do comes as RunOptions (tapbox.options), however it was given: command line, profile
or API; the command comes with it, separately.

Recording (docs/audit.md) is set up in the same spirit: the --log and --pcap files are opened,
and a --learn file is read, before the sandbox exists, so a bad path stops tapbox with 125
before CMD runs. At the end, whatever way CMD ended (exit, signal), the log gets its exit event,
the capture is flushed, the summary is printed and the learned allowlist is written. Inside the
sandbox all three paths are read-only (tapbox.isolate.plan); a --learn file that does not exist
yet is held by an empty placeholder for the run, removed again if nothing was learned.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tapbox.allowlist import Allowlist, AllowlistError, Rule, load_file, parse_rule
from tapbox.errors import EXIT_TAPBOX_FAILED, EXIT_TIMEOUT, SetupError
from tapbox.isolate import Sandbox, SandboxConfig, SignalForwarder
from tapbox.layout import DNS_ADDRESS, DNS_ADDRESS6
from tapbox.options import AllowRule, RunOptions

if TYPE_CHECKING:
    from tapbox.audit import Audit
    from tapbox.eventlog import EventLog
    from tapbox.isolate.layerdir import LayerDir
    from tapbox.isolate.supervisor import Violation
    from tapbox.isolate.syscalls import Policy
    from tapbox.learn import Learner
    from tapbox.net.dns import DnsForwarder, Pending
    from tapbox.pcap import PcapWriter

IMPORT_SWITCH_INTERVAL = 0.0005  # seconds (sys.setswitchinterval) while the engine imports
DNS_WARM_DELAY = 0.1  # seconds of the command's run before dnspython's import starts
DRAIN_TIMEOUT = 10.0  # seconds open connections may take to finish after the command exits


def load_rules(files: Sequence[str], rules: Sequence[AllowRule]) -> list[Rule]:
    """All rules from allowlist files and single rules; an AllowlistError names file:line (or
    the --allow option)."""
    loaded: list[Rule] = []
    for path in files:
        loaded.extend(load_file(path))
    for rule in rules:
        loaded.append(parse_rule(rule.text, rule.source))
    return loaded


def host_has_ipv6() -> bool:
    """Whether the host can route to global IPv6 destinations (a route lookup, no packet:
    connecting a UDP socket sends nothing)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.connect(("2001:db8::1", 9))
        return True
    except OSError:
        return False


def raise_fd_limit() -> None:
    """Every proxied connection holds a host socket: allow as many as the hard limit does."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


class QuickSwitching:
    """The interpreter's thread switch interval, lowered while an engine import runs: the main
    thread has a few short steps to take meanwhile (pid 1's messages, start(), the wait), and
    each would otherwise wait up to the default 5 ms for the lock the importing thread holds.
    Runs of the API may overlap in one process: the first one in saves the interval, the last
    one out restores it."""

    _lock = threading.Lock()
    _users = 0
    _saved = 0.0

    @classmethod
    def enter(cls) -> None:
        with cls._lock:
            if cls._users == 0:
                cls._saved = sys.getswitchinterval()
                sys.setswitchinterval(IMPORT_SWITCH_INTERVAL)
            cls._users += 1

    @classmethod
    def leave(cls) -> None:
        with cls._lock:
            cls._users -= 1
            if cls._users == 0:
                sys.setswitchinterval(cls._saved)


class EngineImport:
    """The engine's imports (trio, the stack, and what the audit layer imports lazily) and the
    host's own addresses (for the guard), in a thread started as the sandbox child sets itself
    up: the sandbox's set-up, the command's start and these imports overlap instead of adding
    up. `result()` waits for it and raises what it raised. The DNS forwarder (dnspython) is
    imported later still, once the command runs (`_Forwarder`)."""

    def __init__(self) -> None:
        self.host: list[str] = []
        self._error: BaseException | None = None
        # Readable once the work is done (os.pipe: its write end is closed then).
        self.done_fd, self._done_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._work, name="tapbox-engine-import",
                                        daemon=True)
        QuickSwitching.enter()
        try:
            self._thread.start()
        except BaseException:
            QuickSwitching.leave()
            raise

    def _work(self) -> None:
        try:
            import tapbox.eventlog  # noqa: F401
            import tapbox.net.engine  # noqa: F401
            from tapbox.hostaddrs import host_addresses

            self.host.extend(host_addresses())
        except BaseException as exc:  # noqa: BLE001 - handed to result()'s caller
            self._error = exc
        finally:
            QuickSwitching.leave()
            os.close(self._done_w)

    def result(self) -> list[str]:
        """The host's addresses, once the engine's modules are imported; raises EngineStartError
        naming what failed."""
        self._thread.join()
        self.close()
        if self._error is not None:
            text = " ".join(str(self._error).split())
            raise EngineStartError(f"{type(self._error).__name__}: {text}" if text
                                   else type(self._error).__name__) from self._error
        return self.host

    def close(self) -> None:
        """Close done_fd (the imports may go on: their thread ends with the process)."""
        if self.done_fd >= 0:
            os.close(self.done_fd)
            self.done_fd = -1


class EngineStartError(Exception):
    """The engine could not be imported or started (a broken installation, no file descriptor
    left...): the command is stopped and tapbox exits 125."""


class _Forwarder:
    """The DNS forwarder, built on first use: its module imports dnspython (about 0.1 s), so
    the import starts in a thread once the command has run for a moment (`warm`), off the
    start-up path; a query that comes first waits for it."""

    def __init__(self, build: Callable[[], DnsForwarder]) -> None:
        self._build = build
        self._real: DnsForwarder | None = None

    async def warm(self, delay: float) -> None:
        """Start the import after `delay` seconds of the command's run: a short command never
        pays for it, and the import does not compete for the interpreter with the command's
        first steps and tapbox's exit (measured: 18 ms of CPU off `tapbox -- true`)."""
        import trio

        await trio.sleep(delay)
        if self._real is None:
            threading.Thread(target=_import_dns, name="tapbox-dns-import", daemon=True).start()

    def _get(self) -> DnsForwarder:
        if self._real is None:
            self._real = self._build()
        return self._real

    def answer_now(self, query: bytes, *, tcp: bool = False,
                   udp_limit: int = 65535) -> bytes | None | Pending:
        return self._get().answer_now(query, tcp=tcp, udp_limit=udp_limit)

    async def complete(self, pending: Pending) -> bytes:
        return await self._get().complete(pending)


def _import_dns() -> None:
    try:
        import tapbox.net.dns  # noqa: F401
    except Exception:  # (no file descriptor left, say): met again, and reported, on first use
        pass


def _upstreams(options: RunOptions) -> list[tuple[str, int]]:
    from tapbox.net.upstream import parse_upstream, upstreams_from_resolv_conf

    if options.network.dns_upstream:
        try:
            return [parse_upstream(text) for text in options.network.dns_upstream]
        except ValueError as exc:
            raise SetupError(f"--dns-upstream: {exc}") from None
    return upstreams_from_resolv_conf()


class ViolationSink:
    """Refused system calls, from the supervisor thread to the audit layer's thread."""

    MAX_PENDING = 1000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._audit: Audit | None = None
        self._make: Callable[[], Audit] | None = None  # makes the audit layer when first needed
        self._token: object | None = None  # trio's TrioToken while the loop runs
        self._pending: list[Violation] = []
        self._queued = 0  # handed to the loop, not reported yet
        self.unreported = 0  # refusals that came faster than the loop took them

    def __call__(self, violation: Violation) -> None:
        with self._lock:
            if self._audit is None and self._make is not None:
                self._audit = self._make()
            audit, token = self._audit, self._token
            if audit is None:
                if len(self._pending) < self.MAX_PENDING:
                    self._pending.append(violation)
                return
        if token is None:
            audit.syscall_refused(violation)
            return
        with self._lock:  # bounded: a flood of refusals must not grow trio's queue
            if self._queued >= self.MAX_PENDING:
                self.unreported += 1
                return
            self._queued += 1
        try:
            token.run_sync_soon(self._report, audit, violation)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - trio.RunFinishedError: the loop is over
            with self._lock:
                self._token = None
                self._queued -= 1
            audit.syscall_refused(violation)

    def _report(self, audit: Audit, violation: Violation) -> None:
        with self._lock:
            self._queued -= 1
        audit.syscall_refused(violation)

    def attach(self, audit: Audit | None, token: object | None = None) -> None:
        """From now on report to `audit` (through `token` if given); None: hold them again."""
        with self._lock:
            self._audit, self._token = audit, token
            pending, self._pending = self._pending, []
        for violation in pending:
            if audit is not None:
                audit.syscall_refused(violation)

    def audit(self, make: Callable[[], Audit]) -> Audit:
        """The audit layer, made by `make` now if no violation made it yet. Until then,
        violations make it themselves (a run without network imports it only if needed)."""
        with self._lock:
            if self._audit is None:
                self._audit = make()
            return self._audit

    def make_when_needed(self, make: Callable[[], Audit]) -> None:
        with self._lock:
            self._make = make


def _rlimits(options: RunOptions) -> tuple[tuple[int, int], ...]:
    """The command's resource limits as (RLIMIT_*, value); SetupError if one is above the hard
    limit tapbox itself was given (an unprivileged process cannot raise it)."""
    import resource

    limits = options.limits
    wanted = [(resource.RLIMIT_DATA, limits.memory, "--memory"),
              # pid 1 of the sandbox runs as the same user: one more
              (resource.RLIMIT_NPROC, limits.max_procs and limits.max_procs + 1, "--max-procs"),
              (resource.RLIMIT_NOFILE, limits.max_files, "--max-files")]
    out: list[tuple[int, int]] = []
    if limits.max_procs is not None and os.getuid() == 0:
        raise SetupError("tapbox: --max-procs cannot be enforced when tapbox runs as root: the "
                         "kernel exempts uid 0 from RLIMIT_NPROC; run tapbox as another user")
    for which, value, flag in wanted:
        if value is None:
            continue
        _soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY and value > hard:
            raise SetupError(f"tapbox: {flag}: {value} is above the hard limit tapbox was given "
                             f"({hard}): ask for less, or raise it (ulimit -H)")
        out.append((which, value))
    return tuple(out)


def limits_description(options: RunOptions) -> str | None:
    """What the limits are and how they are enforced, for -v and the log; None if none."""
    limits = options.limits
    parts = []
    if limits.timeout is not None:
        parts.append(f"time {limits.timeout:g}s for the whole sandbox")
    if limits.memory is not None:
        parts.append(f"memory {limits.memory} bytes per process (RLIMIT_DATA)")
    if limits.max_procs is not None:
        parts.append(f"{limits.max_procs} processes and threads (RLIMIT_NPROC, counted in "
                     "the sandbox's user namespace)")
    if limits.max_files is not None:
        parts.append(f"{limits.max_files} open files per process (RLIMIT_NOFILE)")
    return "; ".join(parts) if parts else None


@dataclass
class Recording:
    """What this run records besides stderr: opened before the sandbox exists."""

    log: EventLog | None = None
    pcap: PcapWriter | None = None
    learner: Learner | None = None
    sources: list[str] = field(default_factory=list)
    placeholder: tuple[str, int, int] | None = None  # (path, dev, ino) of an empty --learn file
    failure: str | None = None  # why the engine died, if it did (the run then ends with 125)

    def paths(self, options: RunOptions) -> tuple[str, ...]:
        """The files this run records to: the sandbox may not write them."""
        record = options.record
        return tuple(name for name in (record.log, record.pcap, record.learn) if name)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if self.pcap is not None:
            self.pcap.close()
        if self.placeholder is not None:  # nothing was learned: leave no empty allowlist
            path, dev, ino = self.placeholder
            try:
                st = os.stat(path)
                if (st.st_dev, st.st_ino, st.st_size) == (dev, ino, 0):
                    os.unlink(path)
            except OSError:
                pass


def _open_recording(command: Sequence[str], options: RunOptions) -> Recording:
    net, record = options.network, options.record
    recording = Recording(sources=[*net.allowlists, *(f"{r.source} {r.text}" for r in net.allow)])
    try:
        if record.learn:
            from tapbox.learn import Learner

            recording.learner = Learner(record.learn, list(command))
            if recording.learner.exists:
                recording.sources.append(record.learn)
            recording.placeholder = recording.learner.placeholder
        if record.log:
            from tapbox.eventlog import EventLog, LogError

            try:
                recording.log = EventLog(record.log, record.log_limit)
            except LogError as exc:
                raise SetupError(str(exc)) from None
        if record.pcap:
            from tapbox.pcap import PcapError, PcapWriter

            try:
                recording.pcap = PcapWriter(record.pcap, record.pcap_limit)
            except PcapError as exc:
                raise SetupError(str(exc)) from None
    except AllowlistError as exc:
        recording.close()
        raise SetupError(str(exc)) from None
    except BaseException:
        recording.close()
        raise
    return recording


def run(command: Sequence[str], options: RunOptions) -> int:
    """Run `command` as `options` say (validated: RunOptions.from_layers or .validate());
    returns the exit status. Raises TapboxError if tapbox fails before the command runs.
    In the copy-on-write view, the layer is then kept, committed or discarded
    (tapbox.review)."""
    if options.filesystem.view != "overlay":
        return _run(command, options, None)
    from tapbox.isolate.layerdir import LayerDir

    fs = options.filesystem
    if options.environment.root and os.getuid() != 0 and options.record.report != "quiet":
        print("tapbox: --root --fs overlay: the sandbox's root cannot write the host's "
              "root-owned directories (/usr, /etc, /var/lib...) nor switch to another user: "
              "only your id is mapped in its user namespace, so package managers will fail "
              "(docs/overlay.md)", file=sys.stderr)
    layer = LayerDir.create(fs.changes_dir, command, os.getcwd())
    try:
        status = _run(command, options, layer)
    except BaseException:
        if layer.meta.get("runs") == 1 and fs.changes_dir is None:
            layer.remove()  # nothing ran: nothing to keep
        raise
    layer.finish(status)
    from tapbox.review import at_exit

    return at_exit(layer, fs.on_exit, status)


def _run(command: Sequence[str], options: RunOptions, layer: LayerDir | None) -> int:
    """The `tapbox` command's way: signals sent to tapbox are passed on to the command, and the
    file descriptor limit is raised for the engine's sockets (tapbox.api runs in a program
    that keeps its own signals and limits: it uses prepare() and serve() alone)."""
    prepared = prepare(command, options)
    prepared.layer = layer
    try:
        forwarder = SignalForwarder()
        try:
            sandbox = Sandbox.spawn(prepared.sandbox_config(list(command)),
                                    meanwhile=prepared.meanwhile,
                                    on_violation=prepared.violations)
        except BaseException:
            forwarder.restore()
            raise
        forwarder.start(sandbox.pid)
        try:
            raise_fd_limit()  # after the fork: the command keeps the limits it was given
            return serve(prepared, sandbox)
        finally:
            forwarder.restore(discard_pending=True)  # the caller's signal mask, as it was
    finally:
        prepared.close()


@dataclass
class Prepared:
    """One run, ready for its sandbox: the allowlist parsed, the record files open, the DNS
    upstreams known, the limits and the system-call policy checked. Everything here can fail
    before the command exists."""

    command: list[str]  # as the event log names it
    options: RunOptions
    rules: list[Rule]
    recording: Recording
    upstreams: list[tuple[str, int]]
    ipv6: bool
    rlimits: tuple[tuple[int, int], ...] = ()
    policy: Policy | None = None
    engine_import: EngineImport | None = None  # started by meanwhile()
    # Refused system calls, from the sandbox's supervisor to the audit layer (Sandbox.spawn's
    # on_violation).
    violations: ViolationSink = field(default_factory=ViolationSink)
    layer: LayerDir | None = None  # the copy-on-write view's layer (--fs overlay)

    @property
    def network(self) -> bool:
        return self.options.network.enabled

    def sandbox_config(self, argv: list[str] | None, **process: Any) -> SandboxConfig:
        """The sandbox for this run; `argv` None: Python mode (tapbox.isolate.child).
        `process`: the command's stdio, pass_fds, cwd and env (SandboxConfig)."""
        resolv = f"nameserver {DNS_ADDRESS}\n" + (f"nameserver {DNS_ADDRESS6}\n" if self.ipv6
                                                 else "")
        env, confine = self.options.environment, self.options.process
        return SandboxConfig(argv=argv, network=self.network, mtu=self.options.network.mtu,
                             root=env.root, ipv6=self.ipv6, resolv_conf=resolv,
                             read_only_files=self.recording.paths(self.options),
                             filesystem=self.options.filesystem, setenv=env.setenv,
                             unsetenv=env.unsetenv, clearenv=env.clearenv,
                             syscalls=self.policy, nest=confine.nest,
                             landlock=confine.landlock, rlimits=self.rlimits,
                             layer=self.layer, **process)

    def meanwhile(self) -> None:
        """What the parent starts while the sandbox sets itself up (Sandbox.spawn): the
        engine's imports, in a thread that goes on while the command starts."""
        if self.network and self.engine_import is None:
            self.engine_import = EngineImport()

    def close(self) -> None:
        self.recording.close()
        if self.engine_import is not None:
            self.engine_import.close()


def prepare(command: Sequence[str], options: RunOptions) -> Prepared:
    """Everything before the sandbox: raises TapboxError (an AllowlistError for a rule)."""
    from tapbox.isolate.syscalls import policy_for

    rlimits = _rlimits(options)
    policy = policy_for(options.process.syscalls, options.process.syscall_allow)
    if not options.network.enabled:
        return Prepared(list(command), options, [], Recording(), [], False, rlimits, policy)
    rules = load_rules(options.network.allowlists, options.network.allow)
    recording = _open_recording(command, options)
    try:
        if recording.learner is not None:
            rules.extend(recording.learner.existing)
        if not rules and not options.record.audit_mode and options.record.report != "quiet":
            print("tapbox: the allowlist is empty: no network access is allowed",
                  file=sys.stderr)
        upstreams = _upstreams(options)
        if not upstreams and any(r.name for r in rules):
            print("tapbox: no DNS upstream (none in /etc/resolv.conf; use --dns-upstream): "
                  "names will not resolve", file=sys.stderr)
        ipv6 = options.network.ipv6
        ipv6_enabled = ipv6 == "on" or (ipv6 == "auto" and host_has_ipv6())
    except BaseException:
        recording.close()
        raise
    return Prepared(list(command), options, rules, recording, upstreams, ipv6_enabled, rlimits,
                    policy)


def serve(prepared: Prepared, sandbox: Sandbox) -> int:
    """Start the sandbox's command and serve its network until it exits (or --timeout kills
    it: 124); its exit status. The sandbox is killed and reaped on the way out, whatever
    happens."""
    options = prepared.options
    violations = prepared.violations
    try:
        _say_plan(sandbox, options)
        if not prepared.network:
            def make_audit() -> Audit:
                from tapbox.audit import Audit

                return Audit(verbose=options.record.verbose,
                             quiet=options.record.report == "quiet")

            violations.make_when_needed(make_audit)  # importing it costs ~60 ms
            sandbox.start()
            status = _wait(sandbox, options.limits.timeout)
            if status is None:
                audit = violations.audit(make_audit)
                audit.timeout(options.limits.timeout or 0)
                status = EXIT_TIMEOUT
                audit.print_summary()
            _explain_status(lambda: violations.audit(make_audit), sandbox, status, options)
        else:
            # The command starts now; its frames wait in tap0's queue until the engine reads
            # them (the module's docstring).
            sandbox.start()
            status = _serve_network(prepared, sandbox)
        _say_discarded(sandbox)
        return status
    finally:
        if sandbox.returncode is None:
            sandbox.kill()
            sandbox.wait_status()
        sandbox.close()


def _serve_network(prepared: Prepared, sandbox: Sandbox) -> int:
    """The started sandbox's network, until it exits; its exit status. The engine runs once
    its imports are done, and serves whatever the command sent meanwhile; a command that ends
    before that without sending a single frame has nothing for it to decide, and its run ends
    at once (the records say the same as if the engine had run: no flows)."""
    if prepared.engine_import is None:
        prepared.meanwhile()
    engine_import = prepared.engine_import
    assert engine_import is not None
    if _ended_before(engine_import, sandbox, prepared.options.limits.timeout):
        audit = _start_audit(prepared, sandbox)
        status = sandbox.wait_status()
        _end_records(audit, prepared, sandbox, status, {})
        return _learn(audit, prepared.recording, status)
    try:
        host = engine_import.result()
    except EngineStartError as exc:
        from tapbox.textescape import escape

        sandbox.kill()
        prepared.recording.failure = str(exc)
        print(f"tapbox: the network engine could not start ({escape(str(exc))}); "
              "the command was stopped", file=sys.stderr)
        return EXIT_TAPBOX_FAILED
    import trio

    return trio.run(_serve, prepared, sandbox, host)


def _ended_before(engine_import: EngineImport, sandbox: Sandbox, timeout: float | None) -> bool:
    """Wait for the engine's imports or the sandbox's end, whichever comes first: True if the
    sandbox ended first and left no frame in tap0's queue (so there is nothing to serve)."""
    import select

    exit_fd, tap_fd = sandbox.exit_fd, sandbox.tap_fd
    if exit_fd is None or tap_fd is None:  # kernel < 5.3: no pidfd to wait on
        return False
    waiting = select.poll()
    waiting.register(engine_import.done_fd, select.POLLIN)
    waiting.register(exit_fd, select.POLLIN)
    left = sandbox.time_left(timeout)
    ready = {fd for fd, _ in waiting.poll(None if left == float("inf") else left * 1000)}
    if exit_fd not in ready or engine_import.done_fd in ready:
        return False
    queued = select.poll()
    queued.register(tap_fd, select.POLLIN)
    return not queued.poll(0)


def _wait(sandbox: Sandbox, timeout: float | None) -> int | None:
    """The sandbox's exit status, or None (the sandbox killed and reaped) if `timeout`
    seconds passed first."""
    if timeout is None or sandbox.wait_status_within(timeout):
        return sandbox.wait_status()
    sandbox.kill()
    sandbox.wait_status()
    return None


def _say_plan(sandbox: Sandbox, options: RunOptions) -> None:
    """The sandbox's mounts, system-call policy, Landlock and limits (-v), and what the user
    should know before the command runs."""
    from tapbox.textescape import escape

    plan = sandbox.plan
    if plan is None:
        return
    if options.record.verbose:
        for line in plan.describe():
            print(f"tapbox: sandbox: {escape(line)}", file=sys.stderr)
        for line in _describe_confinement(sandbox, options):
            print(f"tapbox: sandbox: {escape(line)}", file=sys.stderr)
    if options.record.report != "quiet":
        for line in plan.notices:
            print(f"tapbox: {escape(line)}", file=sys.stderr)


def _describe_confinement(sandbox: Sandbox, options: RunOptions) -> list[str]:
    """-v: the system-call policy (and whether violations are named), nesting, Landlock, the
    limits."""
    process = options.process
    allowed = f" + {' '.join(process.syscall_allow)}" if process.syscall_allow else ""
    named = "refused calls are named" if not sandbox.unnamed_because else \
        f"refused calls are not named ({sandbox.unnamed_because})"
    lines = [f"system calls: {process.syscalls}{allowed}; {named}"]
    if not process.nest:
        lines.append("no nesting: user.max_user_namespaces = 0 inside")
    if sandbox.landlock:
        lines.append(sandbox.landlock)
    described = limits_description(options)
    if described:
        lines.append(f"limits: {described}")
    return lines


def _explain_status(audit: Callable[[], Audit], sandbox: Sandbox, status: int,
                    options: RunOptions) -> None:
    """A command killed by SIGSYS met a filter that could not name the call: say so."""
    import signal

    if status == 128 + signal.SIGSYS and not sandbox.violations:
        why = f" ({sandbox.unnamed_because})" if sandbox.unnamed_because else ""
        audit().say(f"the command was killed by SIGSYS: it made a system call that --syscalls "
                    f"{options.process.syscalls} forbids; the call could not be named{why}")


def _say_discarded(sandbox: Sandbox) -> None:
    """Nothing is lost silently: what the command wrote to its copy-on-write home, once the
    sandbox is gone (even with -q)."""
    plan = sandbox.plan
    if sandbox.layer_fd is None or plan is None or plan.home is None:
        return
    from tapbox.isolate import discarded

    line = discarded.describe(discarded.count(sandbox.layer_fd, plan.layers, plan.home))
    if line is not None:
        print(f"tapbox: {line}", file=sys.stderr)


def _start_audit(prepared: Prepared, sandbox: Sandbox) -> Audit:
    """The run's audit layer (stderr, summary, log, learning), with its start recorded."""
    from tapbox.audit import Audit
    from tapbox.summary import Summary

    options, recording = prepared.options, prepared.recording
    record = options.record
    audit = Audit(verbose=record.verbose, quiet=record.report == "quiet",
                  audit_mode=record.audit_mode, log=recording.log, summary=Summary(),
                  learner=recording.learner,
                  summary_mode="always" if record.report == "summary" else "auto")
    if recording.pcap is not None:
        recording.pcap.on_stop = audit.say
    audit.run_started(
        mode="learn" if recording.learner else "audit" if record.audit_mode else "enforce",
        command=list(prepared.command), cwd=os.getcwd(), tapbox_pid=os.getpid(),
        sandbox_pid=sandbox.pid, allowlist=recording.sources, rules=len(prepared.rules),
        dns_upstreams=[f"{host}:{port}" for host, port in prepared.upstreams],
        pcap=record.pcap, syscalls=options.process.syscalls,
        syscall_allow=list(options.process.syscall_allow), nest=options.process.nest,
        limits=limits_description(options))
    return audit


async def _serve(prepared: Prepared, sandbox: Sandbox, host: list[str]) -> int:
    import trio

    from tapbox.guard import Guard
    from tapbox.net.engine import Engine, EngineConfig, EngineError, sandbox_interface
    from tapbox.net.faults import ENV_VAR, FaultSpec
    from tapbox.policy import Policy

    assert sandbox.tap_fd is not None
    options, recording, violations = prepared.options, prepared.recording, prepared.violations
    rules, upstreams, ipv6 = prepared.rules, prepared.upstreams, prepared.ipv6
    audit = _start_audit(prepared, sandbox)
    violations.attach(audit, trio.lowlevel.current_trio_token())
    guard = Guard(host)
    if options.record.audit_mode:
        from tapbox.auditpolicy import AuditPolicy

        policy: Policy = AuditPolicy(Allowlist(rules), guard=guard)
    else:
        policy = Policy(Allowlist(rules), guard=guard)
    def forwarder() -> DnsForwarder:
        from tapbox.net.dns import DnsForwarder

        return DnsForwarder(policy, upstreams, on_event=audit.dns, aaaa=ipv6)

    dns = _Forwarder(forwarder)
    faults = FaultSpec.parse(os.environ[ENV_VAR]) if os.environ.get(ENV_VAR) else None
    # The sandbox's TAP carries virtio-net headers; checksums are left to the kernel unless
    # the test-only fault seam is on (a corrupted frame must then fail its checksum).
    config = EngineConfig(faults=faults, interface=sandbox_interface(
        mtu=options.network.mtu, isn_key=os.urandom(16), ipv6=ipv6, vnet_hdr=True,
        checksum_offload=faults is None))
    engine = Engine(sandbox.tap_fd, policy, dns, audit, config)
    engine.capture = recording.pcap
    attributor = None
    if recording.log is not None:
        from tapbox.attribution import Attributor, namespace_of

        if namespace_of(sandbox.pid) not in (None, namespace_of(os.getpid())):
            attributor = Attributor(sandbox.pid, on_done=audit.flow_attributed)
            engine.attributor = attributor
    status = EXIT_TAPBOX_FAILED
    try:
        async with trio.open_nursery() as nursery:
            if attributor is not None:
                await nursery.start(attributor.run)
            await nursery.start(engine.run)
            nursery.start_soon(dns.warm, DNS_WARM_DELAY)
            timeout = options.limits.timeout
            with trio.move_on_after(sandbox.time_left(timeout)) as limit:
                status = await sandbox.wait()
            if limit.cancelled_caught:
                sandbox.kill()
                await sandbox.wait()
                audit.timeout(timeout or 0)
                status = EXIT_TIMEOUT
            else:
                # The command may have closed sockets whose data its kernel is still sending:
                # keep serving until those connections finish, for a bounded time.
                with trio.move_on_after(DRAIN_TIMEOUT):
                    await engine.drain()
            nursery.cancel_scope.cancel()
    except Exception as exc:  # the engine died (an ExceptionGroup from the nurseries)
        sandbox.kill()
        recording.failure = _engine_failure(exc, EngineError)
        audit.say(f"the network engine failed ({recording.failure}); the command was stopped")
        if recording.learner is not None:
            audit.say(f"learn: the run did not complete; {recording.learner.path} left as it was")
            recording.learner = None
        status = EXIT_TAPBOX_FAILED
    finally:
        _end_records(audit, prepared, sandbox, status, engine.drop_counts())
    return _learn(audit, recording, status)


def _end_records(audit: Audit, prepared: Prepared, sandbox: Sandbox, status: int,
                 drops: dict[str, int]) -> None:
    """The end of a run with network, whatever way it ended: refused calls reported from the
    supervisor's thread again, the TAP released, the exit event, the capture flushed, the
    summary."""
    recording, violations = prepared.recording, prepared.violations
    violations.attach(audit)  # the loop ends: report from the supervisor's thread
    if violations.unreported:
        audit.syscalls_refused += violations.unreported
        audit.say(f"{violations.unreported} refused system calls came too fast to be "
                  "reported one by one (counted in the exit event)")
    if sandbox.tap_fd is not None:
        _release_tap(sandbox.tap_fd)
        sandbox.tap_fd = None
    _explain_status(lambda: audit, sandbox, status, prepared.options)
    if prepared.options.record.verbose and drops:
        from tapbox.dropreasons import summarize

        audit.say(summarize(drops))
    if prepared.layer is not None and recording.log is not None:
        from tapbox.review import log_changes

        log_changes(prepared.layer, recording.log)
    _finish(audit, recording, status, drops)


def _release_tap(fd: int) -> None:
    """Close the TAP fd without waiting for the kernel to tear tap0 down: closing the last
    copy unregisters the device before close() returns (RCU grace periods, 25-100 ms), and
    tapbox's exit would wait for that. A short-lived `true` gets a copy and is the one to
    close it last, as it exits. (If it cannot be started, or exits first, the close is ours.)"""
    import subprocess

    try:
        subprocess.Popen(["true"], pass_fds=(fd,), stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        pass
    os.close(fd)


def _engine_failure(exc: BaseException, engine_error: type[Exception]) -> str:
    """One line on why the engine died: the TAP device's failure, or the first error found."""
    leaves = _leaves(exc)
    for leaf in leaves:
        if isinstance(leaf, engine_error):
            return str(leaf)
    first = leaves[0]
    text = " ".join(str(first).split())
    return f"internal error: {type(first).__name__}" + (f": {text}" if text else "")


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _finish(audit: Audit, recording: Recording, status: int,
            drops: dict[str, int] | None = None) -> None:
    """Exit event, capture flushed, summary printed: whatever way the run ended."""
    audit.run_finished(status, drops)
    pcap = recording.pcap
    if pcap is not None:
        pcap.close()
        if not audit.quiet and pcap.stopped is None:
            audit.say(f"captured {pcap.frames} frames to {pcap.path}")
    audit.print_summary()


def _learn(audit: Audit, recording: Recording, status: int) -> int:
    if recording.learner is None:
        return status
    try:
        for line in recording.learner.write(status):
            audit.say(line)
    except OSError as exc:
        audit.say(f"learn: cannot write {recording.learner.path}: {exc.strerror or exc}")
        return EXIT_TAPBOX_FAILED
    return status
