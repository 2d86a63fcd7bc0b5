"""Learn mode (`--learn FILE`): write the allowlist that admits exactly what a run used.

How this works
--------------
The run is an audit-mode run (nothing blocked, see tapbox.auditpolicy), and `Learner` watches
it: every flow that was allowed or would have been denied is "used". A flow whose address came
from DNS is remembered by the name that was asked (never the CDN address behind it), one rule
per name and port (`api.example.com:443`); a flow to an address the command never resolved is
remembered by the address and port (`192.0.2.10:8080`, `[2001:db8::1]:443`). A name that was
resolved but never connected to is written as a bare name (DNS has no port), with a comment; so
is a destination that was pinged (ICMP has no port: only a rule without one admits a ping).
Flows that stay refused even in audit mode (the sandbox's own network, addresses the rebinding
guard keeps out) are not learned.

At exit the rules are written sorted (names, then IPv4, then IPv6), under a comment header that
names the command and the time. If FILE exists it is merged, never silently overwritten: its
text is kept as it is, and only rules it does not already admit are appended in a new block;
stderr says what was added. The file is replaced atomically (write a temporary file, rename).
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import tempfile
import time
from dataclasses import dataclass

from tapbox.allowlist import Allowlist, AllowlistError, Rule, load_file, parse_rule
from tapbox.flows import FlowRecord

RESOLVED_ONLY_NOTE = "resolved only, never connected to (a name rule admits every port)"
PING_NOTE = "pinged (ICMP has no port: the rule admits every port)"


@dataclass(frozen=True, order=True)
class _Used:
    order: tuple[int, str, int]  # sort key: (0 name / 1 IPv4 / 2 IPv6, host key, port)
    text: str
    comment: str = ""


def rule_text(host: str, port: int | None, is_name: bool) -> str:
    if not is_name and ":" in host:
        return f"[{host}]:{port}" if port else host
    return f"{host}:{port}" if port else host


class Learner:
    def __init__(self, path: str, command: list[str]) -> None:
        self.path = path
        self.command = command
        self.existing: list[Rule] = []
        self.exists = os.path.exists(path)
        if self.exists:
            self.existing = load_file(path)  # AllowlistError: the caller stops before the run
        directory = os.path.dirname(os.path.abspath(path))
        if not os.access(directory, os.W_OK):
            raise AllowlistError(f"--learn {path}: cannot write to {directory}")
        self.flows: set[tuple[str, str, int]] = set()  # ("name"|"ip", host, port or 0)
        self.resolved: set[str] = set()

    def flow(self, record: FlowRecord) -> None:
        if not (record.allowed or record.would_deny):
            return
        flow = record.flow
        port = 0 if flow.proto == "icmp" else flow.dport  # pings: only a port-less rule admits
        if record.name:
            self.flows.add(("name", record.name, port))
        else:
            self.flows.add(("ip", str(ipaddress.ip_address(flow.dst)), port))

    def dns(self, name: str, verdict: str) -> None:
        if name and verdict in ("allowed", "would-deny"):
            self.resolved.add(name)

    # ----- writing ------------------------------------------------------------------------------

    def used(self) -> list[_Used]:
        out: set[_Used] = set()
        connected = {host for kind, host, _ in self.flows if kind == "name"}
        anyport = {host for _, host, port in self.flows if port == 0}
        for kind, host, port in self.flows:
            if port and host in anyport:
                continue  # the port-less rule a ping needed admits this port too
            note = "" if port else PING_NOTE
            if kind == "name":
                out.add(_Used((0, _name_key(host), port), rule_text(host, port, True), note))
            else:
                ip = ipaddress.ip_address(host)
                out.add(_Used((ip.version // 2 - 1, f"{int(ip):040d}", port),
                              rule_text(host, port, False), note))
        for name in self.resolved - connected:
            out.add(_Used((0, _name_key(name), 0), name, RESOLVED_ONLY_NOTE))
        return sorted(out)

    def new_rules(self) -> tuple[list[_Used], list[str]]:
        """(rules to add, texts that could not be written as rules)."""
        allowlist = Allowlist(self.existing)
        add, bad = [], []
        for used in self.used():
            try:
                rule = parse_rule(used.text)
            except AllowlistError:
                bad.append(used.text)
                continue
            if not _admitted(allowlist, rule):
                add.append(used)
        return add, bad

    def write(self, status: int | None) -> list[str]:
        """Write or merge FILE; the lines for stderr."""
        add, bad = self.new_rules()
        report = [f"learn: {text!r} is not a valid rule; left out" for text in bad]
        if self.exists and not add:
            report.append(f"learn: {self.path} already admits everything this run used; "
                          "left unchanged")
            return report
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        command = shlex.join(self.command)
        ran = f"exit status {status}" if status is not None else "no exit status"
        body = [f"{u.text}  # {u.comment}" if u.comment else u.text for u in add]
        if self.exists:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                old = f.read()
            if old and not old.endswith("\n"):
                old += "\n"
            text = old + "\n" + "\n".join(
                [f"# added by tapbox --learn, {when}, {ran}: {command}", *body]) + "\n"
            report.append(f"learn: added {len(add)} rule{'s' * (len(add) != 1)} to "
                          f"{self.path}: " + ", ".join(u.text for u in add))
        else:
            header = [
                "# Allowlist learned by tapbox --learn (format: docs/allowlist.md)",
                f"# command: {command}",
                f"# run:     {when}, {ran}",
                "# Names are the DNS names the command asked for; addresses appear only where",
                "# it connected without resolving a name. Review before use.",
            ]
            text = "\n".join([*header, *body]) + "\n"
            report.append(f"learn: wrote {len(add)} rule{'s' * (len(add) != 1)} to {self.path}")
        _replace(self.path, text)
        return report


def _admitted(allowlist: Allowlist, rule: Rule) -> bool:
    """Whether an existing allowlist already admits everything `rule` admits (for a learned rule:
    one name or address, one port or all)."""
    port = rule.ports.low if rule.ports else None
    if rule.name is not None:
        rules = allowlist.name_rules(rule.name)
        return any(r.ports is None or (port is not None and r.admits_port(port)) for r in rules)
    assert rule.network is not None
    found = allowlist.address_rule(rule.network.network_address, port or 1)
    return found is not None and (port is not None or found.ports is None)


def _name_key(name: str) -> str:
    return ".".join(reversed(name.split(".")))


def _replace(path: str, text: str) -> None:
    target = os.path.realpath(path)
    directory = os.path.dirname(target)
    mode = 0o644
    try:
        mode = os.stat(target).st_mode & 0o7777
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(prefix=".tapbox-learn-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
