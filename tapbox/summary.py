"""The exit summary: what the sandbox reached, grouped by destination, as an 80-column table.

How this works
--------------
`Summary` is fed one call per finished flow (`add_flow`) and per DNS answer (`add_dns`), either
live by the audit layer or from a saved log by `tapbox log show`, so both print the same table.
A destination is the DNS name a flow's address was learned from, else the address itself.

A row is one destination *and one verdict* (allowed, denied, or "would deny" in audit mode): an
allowed and a denied flow to one name are two rows, so neither hides the other. Each row counts
flows (and, for a name denied in DNS, the queries: no flow could follow them), bytes each way,
the ports used, and the rules that admitted the flows or the reason for the denial.

Layout (docs/audit.md): the verdict comes first in a column of its own, so it is never cut; the
destination comes last and gets the rest of the line, whole if it fits, else with its middle
elided (the end of a DNS name says the most); the rule or reason follows it, or goes on a line of
its own under it when both do not fit. Every string that can come from the sandbox or a log is
escaped (tapbox.textescape) before it is laid out.

Bounded: the sandbox can make ever-new destinations (or names, or ports) at will, so at most
`MAX_KEPT_ROWS` rows and `MAX_PORT_LABELS` port labels per row are kept; flows beyond that are
added to one "+N more destinations" row per verdict, whose N counts distinct destinations up to
`MAX_OVERFLOW_COUNTED`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tapbox.textescape import escape

WIDTH = 80
MAX_ROWS = 40  # rows printed at exit
MAX_KEPT_ROWS = 1000  # rows remembered
MAX_PORT_LABELS = 32  # port labels remembered per row
MAX_OVERFLOW_COUNTED = 10_000  # distinct destinations counted beyond MAX_KEPT_ROWS

# The verdicts, in the order their rows are shown, and how the VERDICT column spells them.
VERDICT_ORDER = ("denied", "would-deny", "allowed")
VERDICT_LABEL = {"denied": "DENIED", "would-deny": "WOULD DENY", "allowed": "allowed"}
_VERDICT_W, _COUNT_W, _BYTES_W, _PORTS_W = 10, 5, 5, 15
_HEAD_W = _VERDICT_W + 1 + _COUNT_W + 1 + _BYTES_W + 1 + _BYTES_W + 2 + _PORTS_W + 2


@dataclass
class Row:
    destination: str  # "" for the overflow row of a verdict
    verdict: str  # "allowed", "denied" or "would-deny"
    ports: set[str] = field(default_factory=set)
    more_ports: bool = False  # ports beyond MAX_PORT_LABELS were used
    flows: int = 0
    dns: int = 0  # denied DNS queries (denied / would-deny rows only)
    bytes_out: int = 0
    bytes_in: int = 0
    rules: dict[str, None] = field(default_factory=dict)  # ordered set
    reason: str | None = None  # the first denial's reason

    @property
    def count(self) -> int:
        return self.flows + self.dns

    @property
    def has_denial(self) -> bool:
        return self.verdict != "allowed"

    def add_port(self, label: str) -> None:
        if label in self.ports:
            return
        if len(self.ports) < MAX_PORT_LABELS:
            self.ports.add(label)
        else:
            self.more_ports = True


class Summary:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], Row] = {}
        self.overflow: dict[str, Row] = {}  # verdict -> the "+N more destinations" row
        self._overflow_seen: set[str] = set()  # destinations aggregated, up to a bound
        self._overflow_capped = False
        self._overflow_names: dict[str, int] = {}  # verdict -> names in DNS aggregated
        self.audit_mode = False

    def _row(self, destination: str, verdict: str) -> Row:
        key = (destination, verdict)
        row = self.rows.get(key)
        if row is not None:
            return row
        if len(self.rows) < MAX_KEPT_ROWS:
            row = self.rows[key] = Row(destination, verdict)
            return row
        kept = any((destination, v) in self.rows for v in VERDICT_ORDER)
        if not kept and destination not in self._overflow_seen:
            if len(self._overflow_seen) < MAX_OVERFLOW_COUNTED:
                self._overflow_seen.add(destination)
            else:
                self._overflow_capped = True
        row = self.overflow.get(verdict)
        if row is None:
            row = self.overflow[verdict] = Row("", verdict)
        return row

    def add_flow(self, *, domain: str | None, dst: str, proto: str, dport: int, verdict: str,
                 rule: str | None, reason: str, bytes_out: int = 0, bytes_in: int = 0) -> None:
        if verdict not in VERDICT_LABEL:
            verdict = "denied"
        row = self._row(domain or dst, verdict)
        row.add_port(proto if proto == "icmp" else f"{proto}/{dport}")
        row.flows += 1
        row.bytes_out += bytes_out
        row.bytes_in += bytes_in
        if verdict == "allowed":
            if rule and (rule in row.rules or len(row.rules) < MAX_PORT_LABELS):
                row.rules.setdefault(rule, None)
            return
        if verdict == "would-deny":
            self.audit_mode = True
        row.reason = row.reason or reason

    def add_dns(self, *, name: str, verdict: str, reason: str = "no rule") -> None:
        if not name or verdict not in ("denied", "would-deny"):
            return
        new = (name, verdict) not in self.rows and name not in self._overflow_seen
        row = self._row(name, verdict)
        if new and not row.destination:
            self._overflow_names[verdict] = self._overflow_names.get(verdict, 0) + 1
        row.dns += 1
        if verdict == "would-deny":
            self.audit_mode = True
        row.reason = row.reason or reason

    # ----- questions --------------------------------------------------------------------------

    def _all_rows(self) -> list[Row]:
        return [*self.rows.values(), *self.overflow.values()]

    @property
    def flow_count(self) -> int:
        return sum(r.flows for r in self._all_rows())

    @property
    def destination_count(self) -> int:
        return len({dest for dest, _ in self.rows}) + len(self._overflow_seen)

    @property
    def denied_anything(self) -> bool:
        return any(r.verdict == "denied" for r in self._all_rows())

    def destinations(self) -> set[str]:
        return {dest for dest, _ in self.rows}

    def filtered(self, *, denied_only: bool = False, domain: str | None = None) -> Summary:
        """A copy holding only the rows with a denial and/or for `domain` and its subdomains."""
        out = Summary()
        out.audit_mode = self.audit_mode
        want = domain.lower().rstrip(".") if domain else None
        for (dest, verdict), row in self.rows.items():
            if denied_only and not row.has_denial:
                continue
            if want is not None and dest != want and not dest.endswith("." + want):
                continue
            out.rows[(dest, verdict)] = row
        if want is None:  # what was aggregated cannot be told apart by name
            for verdict, row in self.overflow.items():
                if not denied_only or row.has_denial:
                    out.overflow[verdict] = row
            out._overflow_seen = self._overflow_seen
            out._overflow_capped = self._overflow_capped
            out._overflow_names = self._overflow_names
        return out

    # ----- rendering --------------------------------------------------------------------------

    def render(self, max_rows: int = MAX_ROWS, width: int = WIDTH) -> list[str]:
        order = {verdict: i for i, verdict in enumerate(VERDICT_ORDER)}
        rows = sorted(self.rows.values(), key=lambda r: (order[r.verdict], r.destination))
        more = sorted(self.overflow.values(), key=lambda r: order[r.verdict])
        every = self._all_rows()
        flows = self.flow_count
        destinations = self.destination_count
        denied = sum(r.flows for r in every if r.verdict == "denied")
        would = sum(r.flows for r in every if r.verdict == "would-deny")
        dns_denied = sum(1 for r in self.rows.values() if r.verdict == "denied" and r.dns) \
            + self._overflow_names.get("denied", 0)
        dns_would = sum(1 for r in self.rows.values() if r.verdict == "would-deny" and r.dns) \
            + self._overflow_names.get("would-deny", 0)
        plus = "+" if self._overflow_capped else ""
        parts = [f"{flows} flow{'s' * (flows != 1)} to {destinations}{plus} "
                 f"destination{'s' * (destinations != 1)}"]
        if denied:
            parts.append(f"{denied} denied")
        if would:
            parts.append(f"{would} would be denied")
        if dns_denied:
            parts.append(f"{dns_denied} name{'s' * (dns_denied != 1)} denied in DNS")
        if dns_would:
            parts.append(f"{dns_would} name{'s' * (dns_would != 1)} would be denied in DNS")
        lines = [""]
        for i, part in enumerate(parts):  # the heading, wrapped after a comma if need be
            text = ("tapbox summary: " if i == 0 else ", ") + part
            if i and len(lines[-1]) + len(text) > width:
                lines[-1] += ","
                lines.append("  " + part)
            else:
                lines[-1] += text
        if not rows and not more:
            return lines
        lines.append(_head("VERDICT", "COUNT", "SENT", "RECV", "PORTS") + "DESTINATION")
        for row in rows[:max_rows]:
            lines += self._row_lines(row, width)
        if len(rows) > max_rows:
            lines.append(f"... and {len(rows) - max_rows} more rows (see the --log file "
                         "or tapbox log show)")
        for row in more:  # what went beyond the rows kept: always shown
            lines += self._row_lines(row, width)
        if self.audit_mode:
            lines.append("audit mode: nothing was blocked; WOULD DENY: what the allowlist "
                         "would deny")
        return lines

    def _row_lines(self, row: Row, width: int) -> list[str]:
        head = _head(VERDICT_LABEL[row.verdict], human_count(row.count),
                     human_bytes(row.bytes_out) if row.flows else "-",
                     human_bytes(row.bytes_in) if row.flows else "-",
                     _ports(row))
        room = max(20, width - len(head))
        if row.destination:
            destination = middle_cut(escape(row.destination), room)
        else:
            n = len(self._overflow_seen)
            destination = f"+{n}{'+' if self._overflow_capped else ''} more " \
                          f"destination{'s' * (n != 1)}"
        detail = _detail(row, width - _VERDICT_W - 3)
        if not detail:
            return [head + destination]
        if len(destination) + 2 + len(detail) <= room:
            return [f"{head}{destination}  {detail}"]
        # On a line of its own, under the row's numbers: the rule or reason is never cut
        # short of its first words.
        return [head + destination, " " * (_VERDICT_W + 1) + right_cut(detail, width
                                                                       - _VERDICT_W - 1)]


def _head(verdict: str, count: str, sent: str, recv: str, ports: str) -> str:
    return (f"{verdict:<{_VERDICT_W}} {count:>{_COUNT_W}} {sent:>{_BYTES_W}} "
            f"{recv:>{_BYTES_W}}  {ports:<{_PORTS_W}}  ")


def _detail(row: Row, width: int) -> str:
    """"(rule ...)" for an allowed row (rules beyond `width` counted), "(reason)" for a
    denial; "" when there is nothing to add."""
    if row.has_denial:
        return f"({escape(short_reason(row.reason))})"
    rules = [escape(rule) for rule in row.rules]
    if not rules or rules == [row.destination]:
        return ""
    text = "(rule " if len(rules) == 1 else "(rules "
    for i, rule in enumerate(rules):
        more = len(rules) - i - 1
        tail = f", +{more} more)" if more else ")"
        if i and len(text) + len(rule) + len(tail) > width:
            return text.rstrip(", ") + f", +{len(rules) - i} more)"
        text += rule + (", " if more else ")")
    return text


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


def _ports(row: Row) -> str:
    labels = sorted((escape(p) for p in row.ports), key=_port_key)
    if row.dns:
        labels.append("dns")
    if not labels:
        return "-"
    unknown = "..." if row.more_ports else ""  # more ports than were remembered
    text = ",".join(labels) + ("," + unknown if unknown else "")
    if len(text) <= _PORTS_W:
        return text
    for shown in range(len(labels) - 1, 0, -1):
        text = ",".join(labels[:shown]) + f",+{len(labels) - shown}{unknown}"
        if len(text) <= _PORTS_W:
            return text
    more = f",+{len(labels) - 1}{unknown}"
    return right_cut(labels[0], _PORTS_W - len(more)) + more


def _port_key(label: str) -> tuple[str, int]:
    proto, _, port = label.partition("/")
    return (proto, int(port) if port.isdigit() else 0)


def middle_cut(text: str, width: int) -> str:
    """`text`, or its start and end around "..." when it is longer than `width`."""
    if len(text) <= width:
        return text
    keep = width - 3
    head = keep // 2
    return text[:head] + "..." + text[len(text) - (keep - head):]


def right_cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def human_count(n: int) -> str:
    """At most 5 characters: 99999, 100K, 1.2M, ... (powers of 1000)."""
    if n < 100_000:
        return str(n)
    value = float(n)
    for unit in "KMGT":
        value /= 1000
        if value < 9.95:
            return f"{value:.1f}{unit}"
        if value < 999.5:
            return f"{value:.0f}{unit}"
    return f"{value:.0f}P"


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
