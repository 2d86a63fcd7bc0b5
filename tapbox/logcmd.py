"""`tapbox log show FILE [--denied] [--domain NAME] [--flows]`: read a saved event log.

How this works: the log's events (tapbox.eventlog.read_events) are fed to the same
tapbox.summary.Summary the exit summary uses, so the table looks the same. A flow counts once:
its flow_end event if there is one, else its flow_start (the flow was still open when the log
stops, e.g. tapbox was killed). Filters keep the rows with something denied (`--denied`) and/or
the rows for one domain and its subdomains, or one address (`--domain`); `--flows` lists the
matching flows one per line, with the process that opened each.

The command line (`tapbox log show ...`) is read by tapbox.cli.log, which calls show().

A log is untrusted input: whoever wrote the file chose every string in it. Each printed line
passes through tapbox.textescape.escape (and the table escapes its fields before laying them
out), so no field can send a terminal an escape sequence; a field of the wrong type is shown as
"?" rather than stopping the command.
"""

from __future__ import annotations

import shlex
import time
from typing import Any

from tapbox.eventlog import read_events
from tapbox.summary import WIDTH, Summary, human_bytes
from tapbox.textescape import escape


def show(path: str, *, denied: bool = False, domain: str | None = None,
         flows: bool = False) -> list[str]:
    start: dict[str, Any] | None = None
    end: dict[str, Any] | None = None
    truncated: dict[str, Any] | None = None
    summary = Summary()
    counted: list[dict[str, Any]] = []  # the flows counted, kept for --flows only
    open_flows: dict[Any, dict[str, Any]] = {}  # flow_start events with no flow_end yet

    def count(event: dict[str, Any]) -> None:
        try:
            dport, bytes_out = int(event.get("dport", 0)), int(event.get("bytes_out", 0))
            bytes_in, _ = int(event.get("bytes_in", 0)), float(event.get("start", 0))
        except (TypeError, ValueError, OverflowError):
            return  # a damaged line: left out rather than fail
        summary.add_flow(domain=_text(event.get("domain")), dst=str(event.get("dst", "?")),
                         proto=str(event.get("proto", "?")), dport=dport,
                         verdict=str(event.get("verdict", "denied")), rule=_rule(event),
                         reason=str(event.get("reason", "")),
                         bytes_out=bytes_out, bytes_in=bytes_in)
        if flows:
            counted.append(event)

    for event in read_events(path):
        kind = event.get("event")
        if kind == "start" and start is None:
            start = event
        elif kind == "exit":
            end = event
        elif kind == "truncated":
            truncated = event
        elif kind == "dns":
            summary.add_dns(name=str(event.get("name", "")),
                            verdict=str(event.get("verdict", "")),
                            reason=str(event.get("reason") or "no rule"))
        elif kind == "flow_start":
            open_flows.setdefault(_key(event.get("id")), event)
        elif kind == "flow_end":
            open_flows.pop(_key(event.get("id")), None)
            count(event)
    for event in open_flows.values():  # still open when the log stops: counted once
        count(event)
    if start is not None and start.get("mode") in ("audit", "learn"):
        summary.audit_mode = True
    shown = summary.filtered(denied_only=denied, domain=domain)
    lines = _heading(path, start, end, truncated)
    lines += shown.render(max_rows=10_000)
    if flows:
        lines.append("")
        lines += _flow_lines(counted, shown, denied)
    return lines


def _key(value: Any) -> Any:
    return value if isinstance(value, (int, str)) else repr(value)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return 0.0


def _clock(value: Any, fmt: str) -> str:
    try:
        return time.strftime(fmt, time.localtime(_number(value)))
    except (ValueError, OverflowError, OSError):
        return "?"


def _rule(event: dict[str, Any]) -> str | None:
    rule = event.get("rule")
    return None if rule in (None, "no rule") else str(rule)


def _heading(path: str, start: dict[str, Any] | None, end: dict[str, Any] | None,
             truncated: dict[str, Any] | None = None) -> list[str]:
    if start is None:
        return [f"log:     {path} (no start event: not the whole log?)"]
    command = start.get("command")
    if isinstance(command, list):
        text = shlex.join(escape(word) for word in command)
    else:
        text = "?"
    if len(text) > WIDTH - 9:
        text = text[:WIDTH - 12] + "..."
    when = _clock(start.get("time", 0), "%Y-%m-%d %H:%M:%S")
    if end is not None:
        status = f"exit status {end.get('status')}"
    elif truncated is not None:
        status = "the log was cut at its size limit (--log-limit): no exit event"
    else:
        status = "no exit event (still running, or tapbox was killed)"
    return [f"log:     {path}", f"command: {text}",
            f"run:     {when}, {start.get('mode', 'enforce')} mode, {status}"]


def _flow_lines(events: Any, shown: Summary, denied_only: bool) -> list[str]:
    out = []
    destinations = shown.destinations()
    for event in sorted(events, key=lambda e: (_number(e.get("start", 0)), str(e.get("id")))):
        key = event.get("domain") or event.get("dst")
        if key not in destinations:
            continue
        if denied_only and event.get("verdict") == "allowed":
            continue
        dst = escape(event.get("dst", "?"))
        host = f"[{dst}]" if ":" in dst else dst
        name = f" ({escape(event['domain'])})" if event.get("domain") else ""
        when = _clock(event.get("start", 0), "%H:%M:%S")
        ending = escape(event.get("ending") or "open")
        process = event.get("process")
        if isinstance(process, dict):
            who = f"pid {escape(process.get('pid'))} {escape(process.get('comm', ''))}"
        else:
            who = "process unknown" if process == "unknown" else ""
        out.append(f"#{escape(event.get('id'))} {when} {escape(event.get('proto'))} "
                   f"{host}:{escape(event.get('dport'))}{name} "
                   f"{escape(event.get('verdict', '?')).upper()} {ending} "
                   f"{human_bytes(int(event.get('bytes_out', 0)))} out "
                   f"{human_bytes(int(event.get('bytes_in', 0)))} in  {who}".rstrip())
    return out
