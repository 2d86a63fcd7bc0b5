"""What tapbox tells the user on stderr about the sandbox's network use.

Denied connections are always reported, once per destination (a program retrying in a loop
gives one line, not thousands); with -v every decision is reported, and denied DNS names too.
"""

from __future__ import annotations

import sys
from typing import TextIO

from netstack.events import Flow
from tapbox.dns import DnsEvent


class Audit:
    def __init__(self, verbose: bool = False, stream: TextIO | None = None) -> None:
        self.verbose = verbose
        self.stream = stream or sys.stderr
        self._denied_seen: set[tuple[str, str, int]] = set()
        self.denied_count = 0
        self.allowed_count = 0

    def say(self, text: str) -> None:
        try:
            print(f"tapbox: {text}", file=self.stream, flush=True)
        except (OSError, ValueError):
            pass  # a closed stderr must not take the firewall down

    def flow_denied(self, flow: Flow, reason: str) -> None:
        self.denied_count += 1
        key = (flow.proto, flow.dst, flow.dport)
        if self.verbose:
            self.say(f"denied {flow} ({reason})")
        elif key not in self._denied_seen:
            self._denied_seen.add(key)
            self.say(f"denied {flow}")

    def flow_allowed(self, flow: Flow, reason: str) -> None:
        self.allowed_count += 1
        if self.verbose:
            self.say(f"allowed {flow} ({reason})")

    def upstream_failed(self, flow: Flow, error: str) -> None:
        if self.verbose:
            self.say(f"{flow}: allowed, but the host could not connect: {error}")

    def dns(self, event: DnsEvent) -> None:
        for address in event.guarded:
            self.say(f"dns {event.name} -> {address} not admitted (rebinding guard: only an "
                     "explicit IP/CIDR rule can allow it)")
        if not self.verbose:
            return
        if event.verdict == "denied":
            self.say(f"denied dns {event.name} {event.qtype} (no rule)")
        elif event.verdict == "error":
            self.say(f"dns {event.name} {event.qtype}: upstream failed")
        else:
            answers = ", ".join(event.answers) or "no addresses"
            self.say(f"dns {event.name} {event.qtype} -> {answers} (rule {event.rule})")
