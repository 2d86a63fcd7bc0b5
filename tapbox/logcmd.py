"""`tapbox log show FILE [--denied] [--domain NAME] [--flows]`: read a saved event log.

How this works: the log's events (tapbox.eventlog.read_events) are fed to the same
tapbox.summary.Summary the exit summary uses, so the table looks the same. A flow counts once:
its flow_end event if there is one, else its flow_start (the flow was still open when the log
stops, e.g. tapbox was killed). Filters keep the rows with something denied (`--denied`) and/or
the rows for one domain and its subdomains, or one address (`--domain`); `--flows` lists the
matching flows one per line, with the process that opened each.

The command line (`tapbox log show ...`) is read by tapbox.cli.log, which calls show().
"""

from __future__ import annotations

import shlex
import time
from typing import Any

from tapbox.eventlog import read_events
from tapbox.summary import WIDTH, Summary, human_bytes


def show(path: str, *, denied: bool = False, domain: str | None = None,
         flows: bool = False) -> list[str]:
    start: dict[str, Any] | None = None
    end: dict[str, Any] | None = None
    by_id: dict[Any, dict[str, Any]] = {}
    dns: list[dict[str, Any]] = []
    for event in read_events(path):
        kind = event.get("event")
        if kind == "start" and start is None:
            start = event
        elif kind == "exit":
            end = event
        elif kind == "dns":
            dns.append(event)
        elif kind in ("flow_start", "flow_end"):
            key = event.get("id")
            if kind == "flow_end" or key not in by_id:
                by_id[key] = event
    summary = Summary()
    for event in list(by_id.values()):
        try:
            int(event.get("dport", 0)), int(event.get("bytes_out", 0))
            int(event.get("bytes_in", 0)), float(event.get("start", 0))
        except (TypeError, ValueError):
            del by_id[event.get("id")]  # a damaged line: left out rather than fail
            continue
        summary.add_flow(domain=event.get("domain"), dst=str(event.get("dst", "?")),
                         proto=str(event.get("proto", "?")), dport=int(event.get("dport", 0)),
                         verdict=str(event.get("verdict", "denied")), rule=_rule(event),
                         reason=str(event.get("reason", "")),
                         bytes_out=int(event.get("bytes_out", 0)),
                         bytes_in=int(event.get("bytes_in", 0)))
    for event in dns:
        summary.add_dns(name=str(event.get("name", "")), verdict=str(event.get("verdict", "")))
    if start is not None and start.get("mode") in ("audit", "learn"):
        summary.audit_mode = True
    shown = summary.filtered(denied_only=denied, domain=domain)
    lines = _heading(path, start, end)
    lines += shown.render(max_rows=10_000)
    if flows:
        lines.append("")
        lines += _flow_lines(by_id.values(), shown, denied)
    return lines


def _rule(event: dict[str, Any]) -> str | None:
    rule = event.get("rule")
    return None if rule in (None, "no rule") else str(rule)


def _heading(path: str, start: dict[str, Any] | None, end: dict[str, Any] | None) -> list[str]:
    if start is None:
        return [f"log:     {path} (no start event: not the whole log?)"]
    command = start.get("command")
    text = shlex.join(command) if isinstance(command, list) else "?"
    if len(text) > WIDTH - 9:
        text = text[:WIDTH - 12] + "..."
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(start.get("time", 0))))
    status = "no exit event (still running, or tapbox was killed)" if end is None else \
        f"exit status {end.get('status')}"
    return [f"log:     {path}", f"command: {text}",
            f"run:     {when}, {start.get('mode', 'enforce')} mode, {status}"]


def _flow_lines(events: Any, shown: Summary, denied_only: bool) -> list[str]:
    out = []
    for event in sorted(events, key=lambda e: (float(e.get("start", 0)), e.get("id", 0))):
        key = event.get("domain") or event.get("dst")
        if key not in shown.rows:
            continue
        if denied_only and event.get("verdict") == "allowed":
            continue
        dst = str(event.get("dst", "?"))
        host = f"[{dst}]" if ":" in dst else dst
        name = f" ({event['domain']})" if event.get("domain") else ""
        when = time.strftime("%H:%M:%S", time.localtime(float(event.get("start", 0))))
        ending = event.get("ending") or "open"
        process = event.get("process")
        if isinstance(process, dict):
            who = f"pid {process.get('pid')} {process.get('comm', '')}"
        else:
            who = "process unknown" if process == "unknown" else ""
        out.append(f"#{event.get('id')} {when} {event.get('proto')} {host}:{event.get('dport')}"
                   f"{name} {str(event.get('verdict', '?')).upper()} {ending} "
                   f"{human_bytes(int(event.get('bytes_out', 0)))} out "
                   f"{human_bytes(int(event.get('bytes_in', 0)))} in  {who}".rstrip())
    return out
