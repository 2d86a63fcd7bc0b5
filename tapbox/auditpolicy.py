"""Audit mode (`--audit`, and `--learn`): decide as the allowlist would, block nothing.

How this works
--------------
`AuditPolicy` is a `Policy` that says what the allowlist would decide but lets flows through:

- DNS: a name with no rule is answered as if `WOULD_DENY` admitted it: tapbox.net.dns resolves it
  upstream and reports the query with the verdict "would-deny". The addresses it learns are
  kept in a separate shadow `Policy`, so they are never mixed with what real rules admit, yet a
  later flow to one of them is named after the domain it came from.
- Flows: the real decision is made first. If the allowlist admits the flow, that stands. If it
  does not, the flow is let through with `Decision.would_deny` set, except for destinations the
  guard protects (the host's loopback and own addresses, link-local and metadata, the sandbox's
  own network, ...: tapbox.guard, the same Guard as the real policy's): those stay refused
  unless an explicit IP/CIDR rule inside their guarded range admits them, audit or not.
  Guarded addresses in DNS answers are still stripped (the shadow policy refuses to learn
  them, like the real one). The engine still never proxies the sandbox's own network.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from tapbox.allowlist import Allowlist, IPAddress, Rule, normalize_address
from tapbox.audit import AUDIT_RULE_TEXT
from tapbox.guard import Guard
from tapbox.policy import Decision, Policy


@dataclass(frozen=True)
class _WouldDenyRule(Rule):
    """A stand-in rule for names no real rule admits; tapbox.net.dns reports "would-deny"."""

    would_deny: ClassVar[bool] = True


WOULD_DENY = _WouldDenyRule("wildcard", AUDIT_RULE_TEXT, "audit", None, None, None)


class AuditPolicy(Policy):
    def __init__(self, allowlist: Allowlist, *, guard: Guard | None = None,
                 **kwargs: float) -> None:
        super().__init__(allowlist, guard=guard, **kwargs)  # type: ignore[arg-type]
        self.shadow = Policy(Allowlist([]), guard=self.guard, **kwargs)  # type: ignore[arg-type]

    def name_allowed(self, name: str) -> list[Rule]:
        return super().name_allowed(name) or [WOULD_DENY]

    def learn(self, name: str, rules: Sequence[Rule], addresses: Iterable[tuple[str, float]],
              now: float) -> list[str]:
        if list(rules) == [WOULD_DENY]:
            return self.shadow.learn(name, rules, addresses, now)
        return super().learn(name, rules, addresses, now)

    def decide(self, ip: str | IPAddress, port: int, now: float) -> Decision:
        real = super().decide(ip, port, now)
        if real.allowed:
            return real
        address = normalize_address(ip)
        if self.guard.reason(address) is not None:
            return real
        shadow = self.shadow.decide(address, port, now)
        name = real.name or shadow.name
        reason = real.reason
        if real.name is None and shadow.name is not None:
            reason = f"no rule for dns {shadow.name}"
        return Decision(False, None, name, reason, would_deny=True)

    def expire(self, now: float) -> None:
        super().expire(now)
        self.shadow.expire(now)
