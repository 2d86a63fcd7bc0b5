"""The audit layer: what tapbox records and tells the user about the sandbox's network use.

How this works
--------------
The engine and the DNS forwarder report to one `Audit` object: `flow_started(record)` and
`flow_ended(record)` for every flow (tapbox.flows.FlowRecord), `dns(event)` for every DNS
answer, `say(text)` for anything else. `Audit` fans each report out to the sinks in use:

- stderr: denied connections are always reported, once per destination (a program retrying in
  a loop gives one line, not thousands); with -v every decision, and denied DNS names too;
  -q silences both the per-destination lines and the summary. These per-event lines are
  rate-limited (a token bucket, `LineBudget`): beyond it they are counted, and the count is
  printed with the next line that passes and at exit. The "once per destination" memory is
  bounded too (`MAX_DENIED_REMEMBERED`, oldest forgotten first). Every string the sandbox
  controls is escaped (tapbox.textescape) before it is printed;
- the event log (tapbox.eventlog, `--log`): every event, one flushed JSON line each;
- the exit summary (tapbox.summary): printed at exit when something was denied, in audit mode,
  or with --summary;
- the learner (tapbox.learn, `--learn`).

The sandbox's processes report here too: `syscall_refused(violation)` for every system call the
seccomp policy refused (tapbox.isolate.supervisor names the process and the call; stderr once
per process name, call and outcome, the log every time), and the run's end says whether
`--timeout` killed the sandbox.

Attribution (tapbox.attribution) fills `record.process` a little after the flow starts. While
it is under way (`record.attributing`), the flow's start and end are held back and released by
`flow_attributed()`, so every sink sees a flow's start, with its process, before its end.
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TextIO

from tapbox.flows import FlowRecord
from tapbox.textescape import escape

if TYPE_CHECKING:
    from tapbox.dns import DnsEvent
    from tapbox.eventlog import EventLog
    from tapbox.isolate.supervisor import Violation
    from tapbox.learn import Learner
    from tapbox.summary import Summary

SummaryMode = Literal["auto", "always", "never"]
AUDIT_RULE_TEXT = "no rule (audit)"  # the text of tapbox.auditpolicy.WOULD_DENY

# Destinations whose denial was reported on stderr, remembered to report each once; the same
# for refused system calls (by process name, call and outcome).
MAX_DENIED_REMEMBERED = 4096
# Per-event lines on stderr: a burst, then a steady rate (lines per second); -v gets more.
LINE_BURST, LINE_RATE = 20, 5.0
VERBOSE_LINE_BURST, VERBOSE_LINE_RATE = 1000, 200.0


class LineBudget:
    """A token bucket: `take()` says whether one more line may be printed now."""

    def __init__(self, burst: int, rate: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = float(burst)
        self.rate = rate
        self.clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self) -> bool:
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class Audit:
    def __init__(self, verbose: bool = False, stream: TextIO | None = None, *,
                 quiet: bool = False, audit_mode: bool = False, log: EventLog | None = None,
                 summary: Summary | None = None, learner: Learner | None = None,
                 summary_mode: SummaryMode = "auto", budget: LineBudget | None = None) -> None:
        self.verbose = verbose
        self.quiet = quiet and not verbose
        self.stream = stream or sys.stderr
        self.audit_mode = audit_mode
        self.log = log
        self.summary = summary
        self.learner = learner
        self.summary_mode: SummaryMode = "never" if quiet else summary_mode
        self._denied_seen: OrderedDict[tuple[str, str, int], None] = OrderedDict()
        self.budget = budget or (LineBudget(VERBOSE_LINE_BURST, VERBOSE_LINE_RATE) if verbose
                                 else LineBudget(LINE_BURST, LINE_RATE))
        self.suppressed = 0  # per-event lines not printed since the last one that was
        self._held: dict[int, FlowRecord] = {}
        self._serial = 0
        self._log_failure_told = False
        self.denied_count = 0
        self.allowed_count = 0
        self.would_deny_count = 0
        self.syscalls_refused = 0
        self._refusals_seen: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self.timed_out: float | None = None  # --timeout's seconds, once it killed the sandbox

    # ----- what the engine and DNS report -------------------------------------------------------

    def say(self, text: str) -> None:
        self._print(text)
        self._log({"event": "message", "time": round(time.time(), 6), "text": text})

    def flow_started(self, record: FlowRecord) -> None:
        self._serial += 1
        record.serial = self._serial
        if record.attributing:
            self._held[id(record)] = record
            return
        self._started(record)

    def flow_attributed(self, record: FlowRecord) -> None:
        """Attribution is done (record.process is set): release what was held back."""
        if self._held.pop(id(record), None) is None:
            return
        self._started(record)
        if record.ended is not None:
            self._ended(record)

    def flow_ended(self, record: FlowRecord) -> None:
        if id(record) in self._held:
            return  # reported with its start once attributed
        self._ended(record)

    def dns(self, event: DnsEvent) -> None:
        name = escape(event.name)
        for address in event.guarded:
            text = (f"dns {name} -> {address} not admitted (rebinding guard: only an "
                    "explicit IP/CIDR rule can allow it)")
            self._event_line(text)
            self._log({"event": "message", "time": round(time.time(), 6), "text": text})
        if self.log is not None:
            from tapbox.eventlog import NO_RULE, dns_event

            fields = dns_event(event)
            if event.rule == AUDIT_RULE_TEXT:
                fields["rule"] = NO_RULE
            self._log(fields)
        reason = event.reason or "no rule"
        if self.summary is not None:
            self.summary.add_dns(name=event.name, verdict=event.verdict, reason=reason)
        if self.learner is not None:
            self.learner.dns(event.name, event.verdict)
        if not self.verbose:
            return
        qtype = escape(event.qtype)
        if event.verdict == "denied":
            self._event_line(f"denied dns {name} {qtype} ({reason})")
        elif event.verdict == "error":
            self._event_line(f"dns {name} {qtype}: {event.reason or 'failed'}")
        elif event.verdict == "local":
            self._event_line(f"dns {name} {qtype}: answered by tapbox ({reason})")
        else:
            answers = ", ".join(event.answers) or "no addresses"
            if event.verdict == "would-deny":
                self._event_line(f"would deny dns {name} {qtype} -> {answers} (no rule)")
            else:
                self._event_line(f"dns {name} {qtype} -> {answers} "
                                 f"(rule {escape(event.rule)})")

    # ----- the sandbox's processes ---------------------------------------------------------------

    def syscall_refused(self, violation: Violation) -> None:
        """A system call the policy refused (or killed its process for)."""
        v = violation
        self.syscalls_refused += 1
        self._log({"event": "syscall", "time": round(v.time, 6), "pid": v.pid, "comm": v.comm,
                   "cmdline": list(v.cmdline), "syscall": v.syscall, "arch": v.arch,
                   "action": v.action, "policy": v.policy})
        killed = v.action == "killed"
        if self.verbose or ((killed or not self.quiet)
                            and _remember(self._refusals_seen, (v.comm, v.syscall, v.action))):
            self._event_line(v.describe())

    def timeout(self, seconds: float) -> None:
        """--timeout ran out: the sandbox has been killed."""
        self.timed_out = seconds
        text = (f"the command ran out of time (--timeout {_seconds(seconds)}): the whole sandbox "
                f"was killed")
        self._print(text)
        self._log({"event": "message", "time": round(time.time(), 6), "text": text})

    # ----- the run's beginning and end ----------------------------------------------------------

    def run_started(self, **fields: Any) -> None:
        self._log({"event": "start", "time": round(time.time(), 6), **fields})

    def run_finished(self, status: int | None, drops: dict[str, int] | None = None) -> None:
        """Release held flows, log the exit event; call once the engine has stopped."""
        for record in list(self._held.values()):
            if record.process is None:
                from tapbox.flows import ProcessInfo

                record.process = ProcessInfo(None, note="tapbox stopped before it was found")
            record.attributing = False
            self.flow_attributed(record)
        self.flush_suppressed()
        event: dict[str, Any] = {"event": "exit", "time": round(time.time(), 6),
                                 "status": status, "flows": self._serial,
                                 "denied": self.denied_count,
                                 "would_deny": self.would_deny_count}
        if drops:
            event["dropped"] = dict(sorted(drops.items()))  # the stack's own reason names
        if self.syscalls_refused:
            event["syscalls_refused"] = self.syscalls_refused
        if self.timed_out is not None:
            event["timed_out"] = self.timed_out
        self._log(event)
        if self.log is not None:
            self.log.close()

    def summary_lines(self) -> list[str]:
        """The exit summary, or [] when it is not wanted."""
        if self.summary is None or self.summary_mode == "never":
            return []
        wanted = (self.summary_mode == "always" or self.audit_mode
                  or self.summary.denied_anything)
        return self.summary.render() if wanted else []

    def print_summary(self) -> None:
        self.flush_suppressed()
        for line in self.summary_lines():
            self._print(line, prefix="")
        if self.timed_out is not None:  # whatever the report mode: it explains the status
            self._print(f"killed after --timeout {_seconds(self.timed_out)} (exit status 124)")

    def flush_suppressed(self) -> None:
        """Say how many per-event lines the rate limit kept back, if any."""
        if self.suppressed:
            count, self.suppressed = self.suppressed, 0
            self._print(f"{count} more line{'s' * (count != 1)} about connections, DNS and "
                        "system calls not shown (too many too fast; the summary and --log count "
                        "them all)")

    # ----- sinks --------------------------------------------------------------------------------

    def _started(self, record: FlowRecord) -> None:
        flow = record.flow
        if self.log is not None:
            from tapbox.eventlog import flow_start_event

            self._log(flow_start_event(record))
        if self.learner is not None:
            self.learner.flow(record)
        who = _who(record)
        reason = escape(record.reason)
        if record.would_deny:
            self.would_deny_count += 1
            if self.verbose:
                self._event_line(f"audit: would deny {flow} ({reason}){who}")
            elif not self.quiet and self._first_denial(flow.proto, flow.dst, flow.dport):
                self._event_line(f"audit: would deny {flow}{_named(record)}")
            return
        if record.allowed:
            self.allowed_count += 1
            if self.verbose:
                self._event_line(f"allowed {flow} ({reason}){who}")
            return
        self.denied_count += 1
        if self.verbose:
            self._event_line(f"denied {flow} ({reason}){who}")
        elif not self.quiet and self._first_denial(flow.proto, flow.dst, flow.dport):
            # A refusal for another reason than the allowlist (a limit, the rebinding guard)
            # says so, lest the user think the allowlist is wrong.
            why = "" if record.reason == "no rule" else f" ({reason})"
            self._event_line(f"denied {flow}{why}")

    def _first_denial(self, proto: str, dst: str, dport: int) -> bool:
        """Whether this destination's denial has not been reported yet (bounded memory)."""
        return _remember(self._denied_seen, (proto, dst, dport))

    def _ended(self, record: FlowRecord) -> None:
        if self.log is not None:
            from tapbox.eventlog import flow_end_event

            self._log(flow_end_event(record))
        if self.summary is not None:
            from tapbox.eventlog import verdict_of

            flow = record.flow
            self.summary.add_flow(domain=record.name, dst=flow.dst, proto=flow.proto,
                                  dport=flow.dport, verdict=verdict_of(record),
                                  rule=record.rule, reason=record.reason,
                                  bytes_out=record.bytes_out, bytes_in=record.bytes_in)
        if self.verbose and (record.allowed or record.would_deny):
            self._event_line(f"{record.flow} ended: {record.ending} ({record.bytes_out} bytes "
                             f"out, {record.bytes_in} in)")

    def _log(self, event: dict[str, Any]) -> None:
        if self.log is None:
            return
        self.log.write(event)
        if self.log.failed and not self._log_failure_told:
            self._log_failure_told = True
            self._print(self.log.failed)

    def _event_line(self, text: str) -> None:
        """A line about one flow or DNS query: printed within the rate limit, else counted."""
        if not self.budget.take():
            self.suppressed += 1
            return
        self.flush_suppressed()
        self._print(text)

    def _print(self, text: str, prefix: str = "tapbox: ") -> None:
        try:
            print(escape(f"{prefix}{text}"), file=self.stream, flush=True)
        except (OSError, ValueError):
            pass  # a closed stderr must not take the firewall down


def _remember(seen: OrderedDict[Any, None], key: Any) -> bool:
    """Whether `key` is new to `seen` (then remembered; the oldest forgotten beyond
    MAX_DENIED_REMEMBERED)."""
    if key in seen:
        seen.move_to_end(key)
        return False
    seen[key] = None
    if len(seen) > MAX_DENIED_REMEMBERED:
        seen.popitem(last=False)
    return True


def _seconds(value: float) -> str:
    """30 -> '30s', 90 -> '90s', 1.5 -> '1.5s'."""
    return f"{value:g}s"


def _who(record: FlowRecord) -> str:
    info = record.process
    if info is None or info.pid is None:
        return ""
    return f" by pid {info.pid} ({escape(info.comm)})"


def _named(record: FlowRecord) -> str:
    return f" (dns {escape(record.name)})" if record.name else ""
