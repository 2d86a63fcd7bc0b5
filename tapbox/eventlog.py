"""The event log (`--log FILE`): one JSON object per line, written as things happen.

How this works
--------------
`EventLog` opens FILE before the command runs (truncating it) and appends one line per event
with a single os.write() on an O_APPEND descriptor: nothing is held in a Python buffer, so
whatever has been seen survives a crash of the command or of tapbox itself. Each line is a
complete JSON object carrying ``"v": LOG_VERSION``; docs/audit.md documents the schema:

- ``start``    once: tapbox's pid, the command, the mode, the allowlist sources
- ``dns``      every DNS question the sandbox asked tapbox's resolver
- ``flow_start`` / ``flow_end``   every TCP connection and UDP flow (flow_end repeats the
  start fields, so a reader may use flow_end alone; a flow with no flow_end was still open
  when the log stops)
- ``message``  what tapbox said on stderr about the network (e.g. the rebinding guard)
- ``exit``     once, at the end: the command's exit status
- ``truncated`` instead of everything after it, when the next line would take the file past
  its size limit (`--log-limit`): room for this last line is kept, so the file never exceeds
  the limit and always says why it stops

Lines are pure ASCII (json.dumps with ensure_ascii): whatever the sandbox put in a name or an
argument is a JSON escape in the file, never a byte a terminal would obey when the file is
printed. `read_events()` is the reading side, used by `tapbox log show`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from tapbox.flows import FlowRecord, ProcessInfo
from tapbox.options import DEFAULT_LOG_LIMIT, MIN_LOG_LIMIT  # --log-limit

if TYPE_CHECKING:  # tapbox.net.dns pulls in dnspython: `tapbox log show` does not need it
    from tapbox.net.dns import DnsEvent

LOG_VERSION = 1
NO_RULE = "no rule"
_TRUNCATED_ROOM = 256  # bytes kept free for the final "truncated" line

# How a flow ended, in the log's own words: the engine's detail -> category.
ENDINGS = ("closed", "reset", "refused upstream", "timeout", "unreachable", "denied",
           "abandoned", "open at exit", "error")


def ending_category(detail: str | None) -> str | None:
    """The log's category for the engine's words on how a flow ended."""
    if detail is None:
        return None
    text = detail.lower()
    if text == "closed":
        return "closed"
    if text == "denied":
        return "denied"
    if text.startswith("refused upstream"):
        return "refused upstream"
    if "timeout" in text or "timed out" in text:
        return "timeout"
    if text.startswith("reset") or text == "aborted":
        return "reset"
    if text.startswith("unreachable"):
        return "unreachable"
    if text.startswith("open when"):
        return "open at exit"
    if text.startswith("given up"):
        return "abandoned"
    return "error"


def verdict_of(record: FlowRecord) -> str:
    if record.would_deny:
        return "would-deny"
    return "allowed" if record.allowed else "denied"


def process_fields(info: ProcessInfo | None) -> dict[str, Any]:
    if info is None:
        return {}
    if info.pid is None:
        return {"process": "unknown", "process_note": info.note}
    out: dict[str, Any] = {"process": {"pid": info.pid, "comm": info.comm,
                                       "cmdline": list(info.cmdline)}}
    if info.shared_with:
        out["process"]["shared_with"] = list(info.shared_with)
    return out


def flow_fields(record: FlowRecord) -> dict[str, Any]:
    flow = record.flow
    fields: dict[str, Any] = {
        "id": record.serial,
        "proto": flow.proto,
        "src_port": flow.sport,
        "dst": flow.dst,
        "dport": flow.dport,
        "domain": record.name,
        "verdict": verdict_of(record),
        "rule": record.rule or NO_RULE,
        "reason": record.reason,
        "start": round(record.started, 6),
    }
    fields.update(process_fields(record.process))
    return fields


def flow_start_event(record: FlowRecord) -> dict[str, Any]:
    return {"event": "flow_start", "time": round(record.started, 6), **flow_fields(record)}


def flow_end_event(record: FlowRecord) -> dict[str, Any]:
    end = record.ended if record.ended is not None else time.time()
    fields = {"event": "flow_end", "time": round(end, 6), **flow_fields(record),
              "end": round(end, 6), "duration": round(max(0.0, end - record.started), 6),
              "bytes_out": record.bytes_out, "bytes_in": record.bytes_in}
    if record.flow.proto != "tcp":  # UDP and pings: one flow holds many datagrams
        fields["datagrams_out"] = record.datagrams_out
        fields["datagrams_in"] = record.datagrams_in
    fields["ending"] = ending_category(record.ending)
    fields["ending_detail"] = record.ending
    return fields


def dns_event(event: DnsEvent) -> dict[str, Any]:
    fields = {"event": "dns", "time": round(time.time(), 6), "name": event.name,
              "qtype": event.qtype, "verdict": event.verdict, "rule": event.rule or NO_RULE,
              "answers": list(event.answers), "guarded": list(event.guarded)}
    if event.reason:
        fields["reason"] = event.reason
    return fields


class LogError(Exception):
    pass


def _line(event: dict[str, Any]) -> bytes:
    return (json.dumps({"v": LOG_VERSION, **event}, separators=(",", ":"), ensure_ascii=True)
            + "\n").encode("ascii")


class EventLog:
    """Appends events to FILE, one flushed line each, up to `limit` bytes in all."""

    def __init__(self, path: str, limit: int = DEFAULT_LOG_LIMIT) -> None:
        self.path = path
        self.limit = max(limit, MIN_LOG_LIMIT)
        self.size = 0
        try:
            self._fd: int | None = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise LogError(f"--log {path}: cannot open: {exc.strerror or exc}") from None
        self.failed: str | None = None  # why the log stopped early, for stderr

    def write(self, event: dict[str, Any]) -> None:
        if self._fd is None:
            return
        data = _line(event)
        if self.size + len(data) > self.limit - _TRUNCATED_ROOM:
            self._write(_line({"event": "truncated", "time": round(time.time(), 6),
                               "limit": self.limit, "size": self.size}))
            if self.failed is None:
                self.failed = f"the log {self.path} reached its size limit (--log-limit " \
                              f"{self.limit} bytes); the log stops here"
            self.close()
            return
        self._write(data)

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        try:
            while data:
                written = os.write(self._fd, data)
                self.size += written
                data = data[written:]
        except OSError as exc:
            self.failed = f"writing the log {self.path} failed ({exc.strerror or exc}); " \
                          "the log stops here"
            self.close()

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None


def read_events(path: str) -> Iterator[dict[str, Any]]:
    """The events of a log file; a torn last line (tapbox was killed mid-write) is skipped.

    Raises LogError for a file that cannot be read or is not a tapbox log.
    """
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except OSError as exc:
        raise LogError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                if number == 1:
                    raise LogError(f"{path}: not a tapbox log (line 1 is not JSON)") from None
                continue
            if not isinstance(event, dict) or "event" not in event:
                continue
            version = event.get("v")
            if isinstance(version, int) and version > LOG_VERSION:
                raise LogError(f"{path}: log version {version} is newer than this tapbox "
                               f"understands ({LOG_VERSION})")
            yield event
