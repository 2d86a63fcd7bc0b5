"""Flow decisions: which new connections the sandbox may open.

How this works
--------------
The netstack reports each new flow as (destination IP, port); :meth:`Policy.decide` answers it.
Two kinds of rule can admit a flow:

1. An explicit IP/CIDR rule in the allowlist (``192.0.2.0/24:443``). It is checked first. A
   guarded address (below) is admitted only by a rule whose address or range lies inside the
   guarded range holding it (``169.254.169.254:80``, ``127.0.0.0/8``): writing it is the
   user's explicit intent, which a broad rule (``0.0.0.0/0``, ``10.0.0.0/8``) is not.
2. A name rule (``api.example.com``, ``*.example.com``), through DNS. The sandbox can only
   resolve names through tapbox's own DNS server; when it answers an allowed name, it calls
   :meth:`Policy.learn` with the addresses it returned (for a CNAME chain: the name asked, and
   the addresses at the end of the chain). Each address is then admitted, on the ports of the
   rule that allowed the name, for ``max(ttl, min_ttl)`` seconds. When several names lead to
   one address, a flow to it is labelled with the name whose answer gave the address most
   recently (the name the program most likely just looked up).

Rebinding guard: an address the `Guard` flags (tapbox.guard: the host's loopback and own
addresses, link-local and metadata, unspecified, multicast, broadcast, the sandbox's own network,
in any of their IPv6 forms) is never learned from DNS, so a name rule can't be turned into
access to the host or the sandbox's gateway by a DNS answer. Such addresses are admitted only
by an explicit IP/CIDR rule inside their guarded range. Addresses are normalised first
(tapbox.allowlist.normalize_address), so every form of one address is judged alike.

State is bounded: at most ``max_entries`` learned addresses; when full, the address whose
admission expires soonest is forgotten first. Time is a float passed in by the caller; this
module reads no clock and does no I/O.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tapbox.allowlist import (
    Allowlist,
    IPAddress,
    IPNetwork,
    Rule,
    normalize_address,
    normalize_name,
)
from tapbox.guard import SANDBOX_NET4, SANDBOX_NET6, Guard

__all__ = ["SANDBOX_NET4", "SANDBOX_NET6", "Decision", "Guard", "Policy", "is_guarded"]

DEFAULT_MIN_TTL = 300.0
DEFAULT_MAX_ENTRIES = 65536
# Remembered "DNS returned a guarded address for this name" notes, for audit reasons only.
MAX_GUARDED_NOTES = 1024

_FIXED_GUARD = Guard()


@dataclass(frozen=True)
class Decision:
    """The answer for one new flow.

    ``rule`` is the rule that admitted it (None when denied); ``name`` is the DNS name the
    address was learned from, when DNS was involved; ``reason`` is short text for audit logs.
    ``would_deny`` (audit mode, tapbox.auditpolicy): denied by the allowlist, let through.
    """

    allowed: bool
    rule: Rule | None
    name: str | None
    reason: str
    would_deny: bool = False


def is_guarded(ip: str | IPAddress) -> str | None:
    """Why ``ip`` is guarded whatever host tapbox runs on (tapbox.guard.FIXED_RANGES), or
    None. Raises ValueError if ``ip`` is not an IP address."""
    return _FIXED_GUARD.reason(ip)


@dataclass
class _Admission:
    """One learned address: for each rule that admits it, (name learned from, expiry time),
    the rule whose answer came last at the end (and its name the one learned last)."""

    by_rule: dict[Rule, tuple[str, float]]
    expires: float  # the latest expiry in by_rule


class Policy:
    """Allowlist plus what DNS has taught it; answers flow decisions."""

    def __init__(
        self,
        allowlist: Allowlist,
        *,
        min_ttl: float = DEFAULT_MIN_TTL,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        guard: Guard | None = None,
    ) -> None:
        if min_ttl < 0:
            raise ValueError("min_ttl must not be negative")
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.allowlist = allowlist
        self.guard = guard if guard is not None else _FIXED_GUARD
        self.min_ttl = float(min_ttl)
        self.max_entries = max_entries
        self._learned: dict[IPAddress, _Admission] = {}
        # Min-heap of (expiry, sequence, address); the sequence number breaks ties so that
        # addresses (IPv4 and IPv6 do not compare) are never compared. An item is stale when
        # the address is gone or its expiry has since moved; stale items are skipped on pop,
        # and the heap is rebuilt if they pile up.
        self._expiry_heap: list[tuple[float, int, IPAddress]] = []
        self._sequence = itertools.count()
        self._guarded_notes: dict[IPAddress, tuple[str, float]] = {}

    def __len__(self) -> int:
        """Number of addresses currently remembered (live or not yet purged)."""
        return len(self._learned)

    def name_allowed(self, name: str) -> list[Rule]:
        """The rules that allow resolving ``name`` (empty: the name is denied)."""
        return self.allowlist.name_rules(name)

    def learn(
        self,
        name: str,
        rules: Sequence[Rule],
        addresses: Iterable[tuple[str, float]],
        now: float,
    ) -> list[str]:
        """Admit the addresses ``name`` resolved to, under ``rules``, for max(ttl, min_ttl).

        Returns the guarded addresses that were skipped (as given), for the caller to log.
        """
        name = normalize_name(name)
        self.expire(now)
        skipped = []
        for text, ttl in addresses:
            address = normalize_address(text)
            expires = now + max(float(ttl), self.min_ttl)
            if self.guard.reason(address) is not None:
                skipped.append(text)
                self._note_guarded(address, name, expires)
                continue
            for rule in rules:
                self._admit(address, rule, name, expires)
        self._enforce_bound()
        return skipped

    def decide(self, ip: str | IPAddress, port: int, now: float) -> Decision:
        """Decide a new flow to ``ip``:``port``."""
        address = normalize_address(ip)
        guarded = self.guard.ranges(address)
        if guarded:
            return self._decide_guarded(address, port, now, guarded)
        rule = self.allowlist.address_rule(address, port)
        if rule is not None:
            return Decision(True, rule, None, f"rule {rule.text}")
        admission = self._learned.get(address)
        if admission is not None:
            live = [  # the most recently learned first
                (learned_rule, learned_name)
                for learned_rule, (learned_name, expires) in reversed(admission.by_rule.items())
                if now < expires
            ]
            for learned_rule, learned_name in live:
                if learned_rule.admits_port(port):
                    reason = f"dns {learned_name} via {learned_rule.text}"
                    return Decision(True, learned_rule, learned_name, reason)
            if live:
                learned_rule, learned_name = live[0]
                reason = f"port {port} not admitted (dns {learned_name} via {learned_rule.text})"
                return Decision(False, None, learned_name, reason)
        return Decision(False, None, None, "no rule")

    def _decide_guarded(self, address: IPAddress, port: int, now: float,
                        guarded: list[tuple[IPNetwork, str]]) -> Decision:
        """Only a rule inside a guarded range holding ``address`` admits it; never DNS."""
        rule = self.allowlist.address_rule(address, port, within=[net for net, _ in guarded])
        if rule is not None:
            return Decision(True, rule, None, f"rule {rule.text}")
        why = guarded[0][1]
        note = self._guarded_notes.get(address)
        if note is not None and now < note[1]:
            reason = f"guarded address ({why}) not admitted by name rule"
            return Decision(False, None, note[0], reason)
        broad = self.allowlist.address_rule(address, port)
        if broad is not None:
            reason = f"guarded address ({why}) not admitted by broad rule {broad.text}"
            return Decision(False, None, None, reason)
        return Decision(False, None, None, "no rule")

    def expire(self, now: float) -> None:
        """Forget admissions that have expired by ``now`` (also done by :meth:`learn`)."""
        heap = self._expiry_heap
        while heap and heap[0][0] <= now:
            expires, _, address = heapq.heappop(heap)
            self._drop_if_current(address, expires)
        for address in [a for a, (_, exp) in self._guarded_notes.items() if exp <= now]:
            del self._guarded_notes[address]

    # ----------------------------------------------------------------------------------------

    def _admit(self, address: IPAddress, rule: Rule, name: str, expires: float) -> None:
        admission = self._learned.get(address)
        if admission is None:
            admission = _Admission(by_rule={}, expires=expires)
            self._learned[address] = admission
            self._push(address, expires)
        # Moved to the end with the latest name; the admission lasts as long as its longest.
        previous = admission.by_rule.pop(rule, None)
        admission.by_rule[rule] = (name, expires if previous is None
                                   else max(previous[1], expires))
        if expires > admission.expires:
            admission.expires = expires
            self._push(address, expires)

    def _enforce_bound(self) -> None:
        heap = self._expiry_heap
        while len(self._learned) > self.max_entries:
            expires, _, address = heapq.heappop(heap)
            self._drop_if_current(address, expires)
        if len(heap) > 2 * len(self._learned) + 64:
            self._expiry_heap = [
                (a.expires, next(self._sequence), addr) for addr, a in self._learned.items()
            ]
            heapq.heapify(self._expiry_heap)

    def _drop_if_current(self, address: IPAddress, expires: float) -> None:
        """Forget ``address`` if ``expires`` (from a heap item) is still its expiry time."""
        admission = self._learned.get(address)
        if admission is not None and admission.expires == expires:
            del self._learned[address]

    def _push(self, address: IPAddress, expires: float) -> None:
        heapq.heappush(self._expiry_heap, (expires, next(self._sequence), address))

    def _note_guarded(self, address: IPAddress, name: str, expires: float) -> None:
        notes = self._guarded_notes
        notes.pop(address, None)
        notes[address] = (name, expires)
        while len(notes) > MAX_GUARDED_NOTES:
            del notes[next(iter(notes))]
