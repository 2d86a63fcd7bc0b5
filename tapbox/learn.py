"""Learn mode (`--learn FILE`): write the allowlist that admits exactly what a run used.

FILE is an allowlist (docs/allowlist.md), or a profile when its name ends in `.toml`
(docs/profiles.md): the same rules then go into its `[network] allow` (tapbox.learnprofile).

How this works
--------------
The run is an audit-mode run (nothing blocked, see tapbox.auditpolicy), and `Learner` watches
it: every flow that was allowed or would have been denied is "used". Rules are made only from
what tapbox itself decided, from its own records, never from text the sandbox wrote:

- a flow whose address came from DNS is remembered by the name whose A/AAAA answer gave that
  address (the policy's label: the name asked, never the CDN address behind it), one rule per
  name and port used (`api.example.com:443`);
- a flow to an address no DNS answer gave is remembered by the address and port
  (`192.0.2.10:8080`, `[2001:db8::1]:443`);
- a destination that was pinged gets a rule without a port (ICMP has no port: only such a rule
  admits a ping);
- a name that was only looked up (no flow followed: an SRV or TXT lookup, a name never
  connected to) is never a rule: it is listed in a comment, for the user to decide;
- flows that stay refused even in audit mode (the sandbox's own network, addresses the
  rebinding guard keeps out) are not learned.
Every rule text is parsed back before it is written and must be the kind it was made as (a name
is a name rule, never an address), and every comment is escaped (tapbox.textescape), so nothing
the sandbox sent can end a comment and start a rule. What is remembered is bounded
(`MAX_LEARNED`, `MAX_LOOKUPS_NOTED`).

FILE is read once, when the Learner is made, before the sandbox exists: its text and its rules
(part of the run's allowlist) are kept in memory, with a fingerprint of the file. At exit the
rules are written sorted (names, then IPv4, then IPv6), under a comment header that names the
command and the time. If FILE existed it is merged: the text read at the start is kept as it
was, and only rules it does not already admit are appended in a new block; stderr says what was
added. FILE is replaced atomically (write a temporary file, rename). If FILE changed while the
command ran (whoever changed it: the command could have), nothing of the change is merged: FILE
is written from the text read at the start, the changed version is kept under a new name next
to it (a hard link: nothing is read through a link the command may have planted), and stderr
says so.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import tempfile
import time
from dataclasses import dataclass

from tapbox import learnprofile
from tapbox.allowlist import Allowlist, AllowlistError, Rule, parse_lines, parse_rule
from tapbox.flows import FlowRecord
from tapbox.textescape import escape

PING_NOTE = "pinged (ICMP has no port: the rule admits every port)"
LOOKUPS_NOTE = ("# Looked up in DNS but never connected to, so not admitted (add NAME:PORT if "
                "the command needs it):")
MAX_LEARNED = 10_000  # (name or address, port) pairs remembered
MAX_LOOKUPS_NOTED = 100  # names listed as looked up only


class LearnError(Exception):
    """The learned allowlist was not written where asked (str(): why, for stderr)."""


@dataclass(frozen=True, order=True)
class _Used:
    order: tuple[int, str, int]  # sort key: (0 name / 1 IPv4 / 2 IPv6, host key, port)
    text: str
    comment: str = ""


def rule_text(host: str, port: int | None, is_name: bool) -> str:
    if not is_name and ":" in host:
        return f"[{host}]:{port}" if port else host
    return f"{host}:{port}" if port else host


_Fingerprint = tuple[str, int, int, int, int, bytes] | None  # realpath, stat, content


def _fingerprint(target: str) -> _Fingerprint:
    """What FILE is now (None: missing): to tell at exit whether it changed meanwhile."""
    try:
        with open(target, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except FileNotFoundError:
        return None
    return (os.path.realpath(target), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, data)


class Learner:
    def __init__(self, path: str, command: list[str]) -> None:
        self.path = path
        self.command = command
        self.target = os.path.realpath(path)
        try:
            self._at_start = _fingerprint(self.target)
        except OSError as exc:
            raise AllowlistError(f"{path}: cannot read: {exc.strerror or exc}") from None
        self.exists = self._at_start is not None
        self.text = ""  # FILE as read at the start, the only text of it ever used
        self.existing: list[Rule] = []
        if self._at_start is not None:
            try:
                self.text = self._at_start[-1].decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                raise AllowlistError(f"{path}: cannot read: not UTF-8 text (bad byte at "
                                     f"offset {exc.start})") from None
            if learnprofile.is_profile(path):  # ProfileError, AllowlistError: stop
                self.existing = learnprofile.existing_rules(self.text, path)
            else:
                self.existing = parse_lines(self.text.splitlines(), path)  # AllowlistError
        directory = os.path.dirname(self.target)
        if not os.access(directory, os.W_OK):
            raise AllowlistError(f"--learn {path}: cannot write to {directory}")
        # A FILE that does not exist yet is held by an empty placeholder for the run, so the
        # sandbox finds a read-only file there (tapbox.isolate.plan) rather than a name it
        # could create; the learned file replaces it, or the runner removes it.
        self.placeholder: tuple[str, int, int] | None = None
        if not self.exists:
            self.placeholder = _hold(self.target, path)
            self._at_start = _fingerprint(self.target)
        self.flows: set[tuple[str, str, int]] = set()  # ("name"|"ip", host, port or 0)
        self.left_out = 0  # flows not remembered: MAX_LEARNED was reached
        self.lookups: dict[str, None] = {}  # names resolved (ordered, bounded)
        self.lookups_left_out = 0

    def flow(self, record: FlowRecord) -> None:
        if not (record.allowed or record.would_deny):
            return
        flow = record.flow
        port = 0 if flow.proto == "icmp" else flow.dport  # pings: only a port-less rule admits
        if record.name:
            key = ("name", record.name, port)
        else:
            key = ("ip", str(ipaddress.ip_address(flow.dst)), port)
        if key in self.flows:
            return
        if len(self.flows) >= MAX_LEARNED:
            self.left_out += 1
            return
        self.flows.add(key)

    def dns(self, name: str, verdict: str) -> None:
        """A name looked up: never a rule by itself, only listed in a comment."""
        if not name or verdict not in ("allowed", "would-deny") or name in self.lookups:
            return
        if len(self.lookups) >= MAX_LOOKUPS_NOTED:
            self.lookups_left_out += 1
            return
        self.lookups[name] = None

    # ----- writing ------------------------------------------------------------------------------

    def used(self) -> list[_Used]:
        out: set[_Used] = set()
        anyport = {(kind, host) for kind, host, port in self.flows if port == 0}
        for kind, host, port in self.flows:
            if port and (kind, host) in anyport:
                continue  # the port-less rule a ping needed admits this port too
            note = "" if port else PING_NOTE
            if kind == "name":
                out.add(_Used((0, _name_key(host), port), rule_text(host, port, True), note))
            else:
                ip = ipaddress.ip_address(host)
                out.add(_Used((ip.version // 2 - 1, f"{int(ip):040d}", port),
                              rule_text(host, port, False), note))
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
            is_name = used.order[0] == 0
            if (rule.kind == "name") != is_name or rule.kind == "wildcard":
                bad.append(used.text)  # e.g. a "name" that reads back as an address
                continue
            if not _admitted(allowlist, rule):
                add.append(used)
        return add, bad

    def _lookup_lines(self, add: list[_Used]) -> list[str]:
        """Comment lines listing the names only looked up (none that is a rule already)."""
        allowlist = Allowlist(self.existing)
        connected = {host for kind, host, _ in self.flows if kind == "name"}
        names = []
        for name in self.lookups:
            if name in connected or allowlist.name_rules(name):
                continue
            try:
                if parse_rule(name).kind != "name":
                    continue
            except AllowlistError:
                continue
            names.append(name)
        lines = [f"#   {escape(name)}" for name in sorted(names, key=_name_key)]
        if self.lookups_left_out:
            lines.append(f"#   ... and {self.lookups_left_out} more")
        return [LOOKUPS_NOTE, *lines] if lines else []

    def write(self, status: int | None) -> list[str]:
        """Write or merge FILE; the lines for stderr."""
        add, bad = self.new_rules()
        report = [f"learn: {escape(text)!r} is not a valid rule; left out" for text in bad]
        if self.left_out:
            report.append(f"learn: the run used more than {MAX_LEARNED} destinations; "
                          f"{self.left_out} flows to others were not learned")
        changed = _fingerprint(self.target) != self._at_start
        if self.exists and not add and not changed:
            report.append(f"learn: {self.path} already admits everything this run used; "
                          "left unchanged")
            return report
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        command = escape(shlex.join(self.command))
        ran = f"exit status {status}" if status is not None else "no exit status"
        body = [f"{u.text}  # {u.comment}" if u.comment else u.text for u in add]
        body += self._lookup_lines(add)
        profile = learnprofile.is_profile(self.path)
        if profile and add:  # FILE.toml: the rules go into [network] allow
            rules = [(u.text, u.comment) for u in add]
            notes = self._lookup_lines(add)
            if self.exists:
                try:
                    text = learnprofile.merge_profile(
                        self.text, self.path, f"added by tapbox --learn, {when}, {ran}: "
                        f"{command}", rules, notes)
                except learnprofile.LearnError as exc:
                    report.append(f"learn: cannot add to {self.path}: {exc}; left unchanged. "
                                  "The run needed: " + ", ".join(u.text for u in add))
                    return report
                done = (f"added {len(add)} rule{'s' * (len(add) != 1)} to {self.path}: "
                        + ", ".join(u.text for u in add))
            else:
                text = learnprofile.new_profile([
                    "# Profile learned by tapbox --learn (format: docs/profiles.md)",
                    f"# command: {command}",
                    f"# run:     {when}, {ran}",
                    "# Names are the DNS names the command asked for; addresses appear only "
                    "where",
                    "# it connected without resolving a name. Review before use.",
                ], rules, notes)
                done = f"wrote {len(add)} rule{'s' * (len(add) != 1)} to {self.path}"
        elif self.exists and not add:
            text = self.text
            done = f"restored {self.path} as it was before the run (nothing to add)"
        elif self.exists:
            old = self.text
            if old and not old.endswith("\n"):
                old += "\n"
            text = old + "\n" + "\n".join(
                [f"# added by tapbox --learn, {when}, {ran}: {command}", *body]) + "\n"
            done = (f"added {len(add)} rule{'s' * (len(add) != 1)} to {self.path}: "
                    + ", ".join(u.text for u in add))
        elif profile:  # a new profile that learned nothing: an empty one
            text = learnprofile.new_profile([
                "# Profile learned by tapbox --learn (format: docs/profiles.md)",
                f"# command: {command}",
                f"# run:     {when}, {ran}: it connected to nothing",
            ], [], self._lookup_lines(add))
            done = f"wrote 0 rules to {self.path}"
        else:
            header = [
                "# Allowlist learned by tapbox --learn (format: docs/allowlist.md)",
                f"# command: {command}",
                f"# run:     {when}, {ran}",
                "# Names are the DNS names the command asked for; addresses appear only where",
                "# it connected without resolving a name. Review before use.",
            ]
            text = "\n".join([*header, *body]) + "\n"
            done = f"wrote {len(add)} rule{'s' * (len(add) != 1)} to {self.path}"
        if changed:
            # Whoever changed FILE meanwhile (the command could), none of it is merged: FILE
            # is written from the text read before the run; the changed file is kept aside.
            aside = _move_aside(self.target)
            what = "was created" if not self.exists else "changed"
            kept = f"that version is now {aside}" if aside else "it is gone now"
            report.append(f"learn: {self.path} {what} while the command ran, not by tapbox: "
                          f"nothing of it was merged ({kept}; review it)")
        _replace(self.target, text)
        report.append("learn: " + done)
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


def _hold(target: str, path: str) -> tuple[str, int, int]:
    """Create an empty file at `target`; its (path, dev, ino)."""
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
    except OSError as exc:
        raise AllowlistError(f"--learn {path}: cannot create: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return target, st.st_dev, st.st_ino


def _name_key(name: str) -> str:
    return ".".join(reversed(name.split(".")))


def _move_aside(target: str) -> str | None:
    """Give the file now at `target` (whatever it is: a symbolic link is moved, not followed)
    a new name next to it that did not exist; that name, or None if nothing is there."""
    directory, base = os.path.split(target)
    for n in range(100):
        aside = os.path.join(directory, f"{base}.changed-during-run" + (f".{n}" if n else ""))
        try:
            os.link(target, aside, follow_symlinks=False)  # fails if `aside` exists
        except FileExistsError:
            continue
        except FileNotFoundError:
            return None
        return aside
    return None


def _replace(target: str, text: str) -> None:
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
