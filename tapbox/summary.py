"""The exit summary: what the sandbox reached, grouped by destination, as an 80-column table.

How this works
--------------
`Summary` is fed one call per finished flow (`add_flow`) and per DNS answer (`add_dns`), either
live by the audit layer or from a saved log by `tapbox log show`, so both print the same table.
A destination is the DNS name a flow's address was learned from, else the address itself. Each
row counts flows (allowed, and denied or "would deny" in audit mode), bytes each way, the ports
used and the rules that admitted them. A name that was only asked in DNS and denied there (so no
flow could follow) gets a row of its own with "dns" as its port, counting the queries.

Rows with something denied come first, then by name; long tables are cut (`max_rows`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

WIDTH = 80
MAX_ROWS = 40
_DEST_W, _PORTS_W, _OK_W, _DENY_W, _BYTES_W = 21, 15, 3, 4, 5


@dataclass
class Row:
    destination: str
    ports: set[str] = field(default_factory=set)
    allowed: int = 0
    denied: int = 0
    would_deny: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    rules: dict[str, None] = field(default_factory=dict)  # ordered set
    denial: str | None = None  # the first denial's reason
    dns_denied: int = 0
    dns_would_deny: int = 0

    @property
    def flows(self) -> int:
        return self.allowed + self.denied + self.would_deny

    @property
    def ok_count(self) -> int:
        return self.allowed

    @property
    def deny_count(self) -> int:
        if self.flows:
            return self.denied + self.would_deny
        return self.dns_denied + self.dns_would_deny

    @property
    def has_denial(self) -> bool:
        return self.deny_count > 0


class Summary:
    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}
        self.audit_mode = False

    def _row(self, destination: str) -> Row:
        row = self.rows.get(destination)
        if row is None:
            row = self.rows[destination] = Row(destination)
        return row

    def add_flow(self, *, domain: str | None, dst: str, proto: str, dport: int, verdict: str,
                 rule: str | None, reason: str, bytes_out: int = 0, bytes_in: int = 0) -> None:
        row = self._row(domain or dst)
        row.ports.add(proto if proto == "icmp" else f"{proto}/{dport}")
        row.bytes_out += bytes_out
        row.bytes_in += bytes_in
        if verdict == "allowed":
            row.allowed += 1
            if rule:
                row.rules.setdefault(rule, None)
        elif verdict == "would-deny":
            row.would_deny += 1
            self.audit_mode = True
            row.denial = row.denial or reason
        else:
            row.denied += 1
            row.denial = row.denial or reason

    def add_dns(self, *, name: str, verdict: str, reason: str = "no rule") -> None:
        if not name or verdict not in ("denied", "would-deny"):
            return
        row = self._row(name)
        if verdict == "denied":
            row.dns_denied += 1
        else:
            row.dns_would_deny += 1
            self.audit_mode = True
        row.denial = row.denial or reason

    # ----- questions --------------------------------------------------------------------------

    @property
    def flow_count(self) -> int:
        return sum(r.flows for r in self.rows.values())

    @property
    def denied_anything(self) -> bool:
        return any(r.denied or r.dns_denied for r in self.rows.values())

    def filtered(self, *, denied_only: bool = False, domain: str | None = None) -> Summary:
        """A copy holding only the rows with a denial and/or for `domain` and its subdomains."""
        out = Summary()
        out.audit_mode = self.audit_mode
        want = domain.lower().rstrip(".") if domain else None
        for key, row in self.rows.items():
            if denied_only and not row.has_denial:
                continue
            if want is not None and key != want and not key.endswith("." + want):
                continue
            out.rows[key] = row
        return out

    # ----- rendering --------------------------------------------------------------------------

    def render(self, max_rows: int = MAX_ROWS, width: int = WIDTH) -> list[str]:
        rows = sorted(self.rows.values(), key=lambda r: (not r.has_denial, r.destination))
        flows = self.flow_count
        denied = sum(r.denied for r in rows)
        would = sum(r.would_deny for r in rows)
        dns_denied = sum(1 for r in rows if r.dns_denied and not r.flows)
        dns_would = sum(1 for r in rows if r.dns_would_deny and not r.flows)
        parts = [f"{flows} flow{'s' * (flows != 1)} to {len(rows)} "
                 f"destination{'s' * (len(rows) != 1)}"]
        if denied:
            parts.append(f"{denied} denied")
        if would:
            parts.append(f"{would} would be denied")
        if dns_denied:
            parts.append(f"{dns_denied} name{'s' * (dns_denied != 1)} denied in DNS")
        if dns_would:
            parts.append(f"{dns_would} name{'s' * (dns_would != 1)} would be denied in DNS")
        lines = ["tapbox summary: " + ", ".join(parts)]
        if not rows:
            return lines
        rule_w = max(8, width - (_DEST_W + _PORTS_W + _OK_W + _DENY_W + 2 * _BYTES_W + 7))
        lines.append(_line("DESTINATION", "PORTS", "OK", "DENY", "SENT", "RECV",
                           "RULE / VERDICT", rule_w))
        for row in rows[:max_rows]:
            lines.append(_line(_left_cut(row.destination, _DEST_W), _ports(row.ports),
                               str(row.ok_count), str(row.deny_count),
                               human_bytes(row.bytes_out) if row.flows else "-",
                               human_bytes(row.bytes_in) if row.flows else "-",
                               _right_cut(_verdict(row), rule_w), rule_w))
        if len(rows) > max_rows:
            lines.append(f"... and {len(rows) - max_rows} more destinations (see the --log file "
                         "or tapbox log show)")
        if self.audit_mode:
            lines.append("audit mode: nothing was blocked; DENY counts what the allowlist "
                         "would deny")
        return lines


def _line(dest: str, ports: str, ok: str, deny: str, sent: str, recv: str, verdict: str,
          rule_w: int) -> str:
    text = (f"{dest:<{_DEST_W}} {ports:<{_PORTS_W}} {ok:>{_OK_W}} {deny:>{_DENY_W}} "
            f"{sent:>{_BYTES_W}} {recv:>{_BYTES_W}}  {verdict}")
    return text.rstrip()


def _verdict(row: Row) -> str:
    parts = []
    why = short_reason(row.denial)
    if row.denied or (not row.flows and row.dns_denied):
        parts.append(f"DENIED: {why}")
    if row.would_deny or (not row.flows and row.dns_would_deny):
        parts.append(f"WOULD DENY: {why}")
    if row.allowed:
        parts.append(", ".join(row.rules) or "allowed")
    return "; ".join(parts)


def short_reason(reason: str | None) -> str:
    """The policy's reason for a denial, in a few words for the table."""
    if not reason:
        return "no rule"
    if reason.startswith("the sandbox's own network"):
        return "sandbox network"
    if reason.startswith("guarded address"):
        return "guarded " + reason[reason.find("("):reason.find(")") + 1]
    if reason.startswith("port ") and " not admitted" in reason:
        return reason[:reason.index(" not admitted")] + " not admitted"
    if reason.startswith("no rule"):
        return "no rule"
    return reason


def _ports(ports: Iterable[str]) -> str:
    labels = sorted(ports, key=_port_key) or ["dns"]
    text = ",".join(labels)
    if len(text) <= _PORTS_W:
        return text
    shown = labels[0]
    for i, label in enumerate(labels[1:], 1):
        if len(f"{shown},{label},+{len(labels) - i - 1}") > _PORTS_W:
            break
        shown += "," + label
    else:
        return shown
    more = f",+{len(labels) - shown.count(',') - 1}"
    return _right_cut(shown, _PORTS_W - len(more)) + more


def _port_key(label: str) -> tuple[str, int]:
    proto, _, port = label.partition("/")
    return (proto, int(port) if port.isdigit() else 0)


def _left_cut(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


def _right_cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def human_bytes(n: int) -> str:
    """At most 5 characters: 0, 999, 1.2K, 12K, 123K, 1.2M, ... (powers of 1024)."""
    if n < 1000:
        return str(n)
    value = float(n)
    for unit in "KMGTP":
        value /= 1024
        if value < 9.95:
            return f"{value:.1f}{unit}"
        if value < 999.5:
            return f"{value:.0f}{unit}"
    return f"{value:.0f}E"
