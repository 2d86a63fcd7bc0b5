"""What happened in a run, as the Python API gives it back: `Result`, `Flow`, `DnsQuery`.

How this works: a run of the API always keeps an event log (the `--log` JSON lines of
docs/audit.md: the caller's `log=` file, or a private temporary one), and these records are read
back from it, so the API and the log can never disagree. `Flow` is one flow, its `flow_start`
and `flow_end` events joined by their id (a flow still open when the log stopped has no end);
`DnsQuery` is one `dns` event. Their fields are the log's fields, under the log's names.

Inside a sandbox the API made, the same log is readable as it grows (read-only: tapbox's record
files are read-only in the sandbox): TAPBOX_LOG names it in the environment of everything that
runs there, and `inside()` reads it.

Everything in them was recorded by tapbox (JSON-escaped when written), but strings such as a
DNS name or a process's argv are the sandbox's choosing: `str()` of a record escapes them
(tapbox.textescape) for printing; the fields hold them as they are.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from tapbox.textescape import escape


@dataclass(frozen=True)
class Process:
    """The sandboxed process that held a flow's socket: its pid inside the sandbox."""

    pid: int
    comm: str
    cmdline: tuple[str, ...]


@dataclass(frozen=True)
class Flow:
    """One TCP connection, UDP flow or ping the sandbox started (docs/audit.md, flow events)."""

    id: int
    proto: str  # "tcp", "udp", "icmp", "icmpv6"
    dst: str
    dport: int
    src_port: int
    domain: str | None  # the DNS name the address was learned from
    verdict: str  # "allowed", "denied", "would-deny" (audit mode: let through)
    rule: str | None  # the rule that admitted it (None: no rule)
    reason: str
    start: float  # wall-clock seconds
    end: float | None = None  # None: still open when the log stopped
    ending: str | None = None  # "closed", "reset", "refused upstream", "denied", ...
    ending_detail: str | None = None
    bytes_out: int = 0
    bytes_in: int = 0
    datagrams_out: int | None = None  # UDP and pings only
    datagrams_in: int | None = None
    process: Process | None = None

    @property
    def denied(self) -> bool:
        return self.verdict == "denied"

    @property
    def destination(self) -> str:
        """"tcp 192.0.2.10:443", "tcp [2001:db8::1]:443" (escaped: printable as it is)."""
        host = f"[{self.dst}]" if ":" in self.dst else self.dst
        port = f":{self.dport}" if self.proto in ("tcp", "udp") else ""
        return escape(f"{self.proto} {host}{port}")

    def __str__(self) -> str:
        name = f" ({escape(self.domain)})" if self.domain else ""
        return f"{self.destination}{name}"


@dataclass(frozen=True)
class DnsQuery:
    """One DNS question the sandbox asked tapbox's resolver (docs/audit.md, dns events)."""

    name: str
    qtype: str
    verdict: str  # "allowed", "denied", "would-deny", "local", "error"
    rule: str | None
    answers: tuple[str, ...]
    time: float
    reason: str | None = None
    guarded: tuple[str, ...] = ()  # answers the rebinding guard kept out

    @property
    def denied(self) -> bool:
        return self.verdict == "denied"

    def __str__(self) -> str:
        return f"dns {escape(self.name)} {escape(self.qtype)}"


@dataclass(frozen=True)
class Records:
    """A run's records: its flows (by id) and DNS queries, and the log's events as they are."""

    flows: tuple[Flow, ...] = ()
    dns: tuple[DnsQuery, ...] = ()
    events: tuple[Mapping[str, Any], ...] = field(default=(), repr=False)
    truncated: bool = False  # the log reached its size limit: records after it are missing

    @property
    def denied(self) -> list[Flow | DnsQuery]:
        """What the policy refused: denied flows, then denied DNS queries."""
        return [*(f for f in self.flows if f.denied), *(q for q in self.dns if q.denied)]


@dataclass(frozen=True)
class Result(Records):
    """A finished run (tapbox.run): subprocess.CompletedProcess's fields and what happened."""

    args: Any = None  # the command, as given (tapbox.call: the function)
    returncode: int = 0  # the command's exit status; 128+N if signal N killed it
    stdout: Any = None  # bytes or str when captured, else None
    stderr: Any = None
    # The overlay's changes come here with the copy-on-write issue (10).
    log: str | None = field(default=None, repr=False)  # the caller's log= file, if any

    def check_returncode(self) -> None:
        """Raise CommandError if the command exited non-zero (subprocess's method)."""
        if self.returncode:
            from tapbox.errors import CommandError

            raise CommandError(f"tapbox: {describe_args(self.args)} exited with status "
                               f"{self.returncode}", self)


def describe_args(args: Any) -> str:
    if isinstance(args, list | tuple):
        import shlex

        return escape(shlex.join(str(a) for a in args))
    return escape(str(args))


def records_from_events(events: Iterable[Mapping[str, Any]]) -> Records:
    """The records of a log's events (a bad or unknown event is skipped, never raised)."""
    kept: list[Mapping[str, Any]] = []
    starts: dict[int, Mapping[str, Any]] = {}
    ends: dict[int, Mapping[str, Any]] = {}
    dns: list[DnsQuery] = []
    truncated = False
    for event in events:
        kept.append(event)
        kind = event.get("event")
        try:
            if kind == "flow_start":
                starts.setdefault(int(event["id"]), event)
            elif kind == "flow_end":
                ends[int(event["id"])] = event
            elif kind == "dns":
                dns.append(_dns(event))
            elif kind == "truncated":
                truncated = True
        except (KeyError, TypeError, ValueError):
            continue
    flows = []
    for ident in sorted(starts.keys() | ends.keys()):
        try:
            flows.append(_flow(starts.get(ident), ends.get(ident)))
        except (KeyError, TypeError, ValueError):
            continue
    return Records(tuple(flows), tuple(dns), tuple(kept), truncated)


def read_log(source: str | os.PathLike[str] | int) -> Records:
    """The records of an event log (a `log=` / `--log` file): a path, or a file descriptor
    open on one (read from its start, its offset left alone). Raises OSError if it cannot be
    read; a torn last line (the log is still being written) is skipped."""
    import json

    if isinstance(source, int):
        chunks = []
        offset = 0
        while chunk := os.pread(source, 1 << 20, offset):
            chunks.append(chunk)
            offset += len(chunk)
        data = b"".join(chunks)
    else:
        with open(source, "rb") as f:
            data = f.read()
    return records_from_events(_events(json.loads, data))


def _events(loads: Any, data: bytes) -> Iterator[Mapping[str, Any]]:
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            event = loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and isinstance(event.get("event"), str):
            yield event


def _flow(start: Mapping[str, Any] | None, end: Mapping[str, Any] | None) -> Flow:
    first = start or end
    assert first is not None
    last = end or {}
    rule = first.get("rule")
    datagrams_out = last.get("datagrams_out")
    datagrams_in = last.get("datagrams_in")
    return Flow(
        id=int(first["id"]), proto=str(first["proto"]), dst=str(first["dst"]),
        dport=int(first["dport"]), src_port=int(first.get("src_port") or 0),
        domain=_opt_str(first.get("domain")), verdict=str(first["verdict"]),
        rule=None if rule in (None, "no rule") else str(rule), reason=str(first.get("reason", "")),
        start=float(first.get("start", first.get("time", 0.0))),
        end=float(last["end"]) if "end" in last else None,
        ending=_opt_str(last.get("ending")), ending_detail=_opt_str(last.get("ending_detail")),
        bytes_out=int(last.get("bytes_out", 0)), bytes_in=int(last.get("bytes_in", 0)),
        datagrams_out=None if datagrams_out is None else int(datagrams_out),
        datagrams_in=None if datagrams_in is None else int(datagrams_in),
        process=_process((end or start or {}).get("process")),
    )


def _process(value: Any) -> Process | None:
    if not isinstance(value, dict) or not isinstance(value.get("pid"), int):
        return None
    cmdline = value.get("cmdline")
    return Process(value["pid"], str(value.get("comm", "")),
                   tuple(str(a) for a in cmdline) if isinstance(cmdline, list) else ())


def _dns(event: Mapping[str, Any]) -> DnsQuery:
    rule = event.get("rule")
    return DnsQuery(name=str(event["name"]), qtype=str(event.get("qtype", "")),
                    verdict=str(event["verdict"]),
                    rule=None if rule in (None, "no rule") else str(rule),
                    answers=tuple(str(a) for a in event.get("answers") or ()),
                    time=float(event.get("time", 0.0)), reason=_opt_str(event.get("reason")),
                    guarded=tuple(str(a) for a in event.get("guarded") or ()))


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


LOG_VARIABLE = "TAPBOX_LOG"  # in the sandbox's environment: the run's event log


@dataclass(frozen=True)
class Inside:
    """A sandbox seen from inside (tapbox.inside(), tapbox.enter()): its event log."""

    log: str

    def records(self) -> Records:
        """What tapbox has recorded so far. A flow shows up once tapbox knows which process
        made it (usually within milliseconds, at most half a second after it started)."""
        return read_log(self.log)


def inside() -> Inside | None:
    """The sandbox this process runs in, if the Python API made it with a network (tapbox.run,
    call or enter, and whatever they start); None elsewhere."""
    import os

    path = os.environ.get(LOG_VARIABLE)
    if not path or os.environ.get("TAPBOX") != "1":
        return None
    return Inside(path)
