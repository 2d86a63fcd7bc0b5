"""DNS for the sandbox: a policy-checking forwarder.

Theory of operation
-------------------
The sandbox's resolv.conf names 10.0.2.3; the netstack hands every DNS message sent there (UDP
datagrams, or TCP streams split by :class:`TcpDnsFramer`) to :meth:`DnsForwarder.answer`, which
returns the wire-format reply.  Nothing the sandbox sends is forwarded as is: the query is parsed,
judged, and a fresh query is built for the upstream resolver.

1. Parse (RFC 1035 §4.1).  Unparseable header -> drop (``None``); header parses but the body
   does not -> FORMERR.  Only a standard QUERY (opcode 0, RFC 1035 §4.1.1) of class IN with
   exactly one question is served; other opcodes get NOTIMP, other shapes FORMERR, EDNS versions
   above 0 BADVERS (RFC 6891 §6.1.3), zone transfers and non-IN classes REFUSED.
2. Names inside the sandbox's own networks' reverse zones (``2.0.10.in-addr.arpa``, the
   nibble zone of fd00::/64) are answered by tapbox itself, as RFC 6303 has resolvers answer
   the reverse zones of private ranges: NXDOMAIN, or the zone's SOA at its apex.  ``ping
   10.0.2.2`` asks for ``2.2.0.10.in-addr.arpa``; nothing upstream knows that name.
3. Judge the question name (never an address): ``policy.name_allowed(name)``.  Names are passed
   lowercased, without the final dot.  A label holding anything but letters, digits, ``-`` and
   ``_`` is denied outright, so that an escaped dot inside a label (``a\\.example.com``) can never
   look like a subdomain to a suffix match; so is a name whose last label is all digits (a
   literal address such as ``169.254.169.254``: no allowlist rule can name it).  Denied ->
   NXDOMAIN (RFC 1035 §4.1.1 RCODE 3) and nothing is sent upstream.
4. Only the query types programs need to reach a name are served (``SERVED_TYPES``: A, AAAA,
   CNAME; docs/threat-model.md says why); any other type of an admitted name is REFUSED
   (RFC 1035 §4.1.1 RCODE 5: refused for policy reasons) and nothing is sent upstream.  With
   the name's letter case this closes most of what the sandbox could otherwise encode in a
   query for an exactly admitted name (the type alone carries 16 bits).
5. Allowed -> a new query goes to the upstreams: a random id, the name *lowercased* (the
   sandbox's choice of letter case is not passed on: RFC 1035 §2.3.3 makes names
   case-insensitive, and the case bits are a channel), the same type, RD set, DO copied (it
   changes what the answer holds), CD not copied, EDNS0 with a 1232-byte payload.  It goes to
   the upstreams in order over UDP, and again over TCP (RFC 7766 §5) to the same
   upstream when the UDP answer has TC set.  The exchange uses trio sockets directly (dnspython
   builds and parses the messages; its trio backend needs a newer trio than tapbox supports).
   ``timeout`` bounds the whole call: each upstream gets an equal share of the time left.
   All fail -> SERVFAIL.  Answers are kept in a :class:`DnsCache` for their TTL, so a
   repeated query is answered without asking again (after steps 1-4, which run every time).
   ``answer_now`` answers everything that needs no upstream without waiting (the engine's
   loop calls it; ``complete`` does the rest); ``answer`` is both in one.
6. From the upstream answer, the CNAME chain is followed from the asked name (RFC 1034 §3.6.2,
   §4.3.2; at most 16 hops, loop-safe) and the A/AAAA records owned by the name at its end are
   handed to ``policy.learn`` under the *asked* name's rules.  Addresses the policy refuses
   (rebinding guard) are deleted from the reply, so the sandbox never sees an address it could
   not use; if none are left the reply is NOERROR with no address records (NODATA, RFC 2308
   §2.2), not NXDOMAIN: the name exists, it just has nothing the sandbox may reach.  When the
   chain ends without addresses in the answer, the final name is *not* resolved again.
7. The reply is built from the sandbox's own query (its id, its question in the client's own
   letter case, as resolvers answer a 0x20-randomised query; its EDNS state) and the
   upstream's sections and RCODE, then sized for the transport: over UDP 512 bytes, or the
   client's EDNS payload size (less than 512 counts as 512), capped by what one datagram on
   the link can carry (``udp_limit``, from the MTU) (RFC 1035 §4.2.1, RFC 6891 §6.2.5); 65535
   over TCP (RFC 1035 §4.2.2).  What does not fit is cut and TC is set, so the client retries
   over TCP.

With ``aaaa=False`` (no IPv6 on the host) AAAA questions for allowed names get NOERROR with no
records at once, without asking upstream, and AAAA records are dropped from ANY answers.

Upstream work is bounded: at most ``max_concurrent`` queries are in flight, at most as many more
wait for a slot; beyond that, and past the deadline, the answer is SERVFAIL.  answer() never
raises for anything the sandbox or an upstream sends.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import dns.rrset
import trio

from tapbox.net.dnsstream import TCP_MAX, TcpDnsFramer
from tapbox.net.upstream import parse_upstream, upstreams_from_resolv_conf
from tapbox.policy import SANDBOX_NET4, SANDBOX_NET6

__all__ = [
    "DnsEvent",
    "DnsForwarder",
    "parse_upstream",
    "upstreams_from_resolv_conf",
]

log = logging.getLogger(__name__)

# EDNS0 payload size we advertise (DNS flag day 2020: fits any path MTU without fragmentation).
EDNS_PAYLOAD = 1232
# RFC 1035 §4.2.1: UDP messages are limited to 512 bytes unless EDNS (RFC 6891) says more.
UDP_CLASSIC_MAX = 512
# How far a CNAME chain is followed (RFC 1034 §3.6.2 says chains should not exist at all...).
MAX_CNAME_HOPS = 16
# RFC 1035 §4.1.1: the header is 12 bytes.
HEADER_LEN = 12

_QR = 0x8000
_OPCODE_MASK = 0x7800
_RD = 0x0100
_RA = 0x0080

_LABEL_OK = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
_ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)
# The query types served for admitted names (docs/threat-model.md, "DNS"): what getaddrinfo()
# asks (A, AAAA) and the alias type tools ask for directly.  Clients of HTTPS/SVCB records fall
# back to A/AAAA when refused.
SERVED_TYPES = frozenset({dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.CNAME})


def _reverse_zone(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> dns.name.Name:
    """The reverse zone of a network on an octet (IPv4) or nibble (IPv6) boundary."""
    labels = dns.reversename.from_address(str(network.network_address)).labels
    keep = network.prefixlen // (8 if network.version == 4 else 4)
    suffix = 2  # in-addr.arpa / ip6.arpa, then the root label
    return dns.name.Name(labels[len(labels) - suffix - 1 - keep:])


# Reverse zones answered by tapbox itself (RFC 6303 §3: locally served zones).
LOCAL_ZONES = (_reverse_zone(SANDBOX_NET4), _reverse_zone(SANDBOX_NET6))
LOCAL_REASON = "the sandbox's own network"
# Upstream RCODEs after which the next upstream is tried instead.
_RETRY_RCODES = frozenset(
    {dns.rcode.SERVFAIL, dns.rcode.REFUSED, dns.rcode.NOTIMP, dns.rcode.FORMERR}
)


class _Rule(Protocol):
    text: str


class _Policy(Protocol):
    def name_allowed(self, name: str) -> Sequence[_Rule]: ...

    def learn(
        self,
        name: str,
        rules: Sequence[_Rule],
        addresses: Iterable[tuple[str, float]],
        now: float,
    ) -> list[str]: ...


@dataclass(frozen=True)
class DnsEvent:
    """One per answered query, for audit and logging by the caller."""

    name: str  # asked name, lowercased, no final dot ("" if the query had no usable question)
    qtype: str  # e.g. "A", "AAAA", "TXT" ("" if unknown)
    # would-deny: audit mode; local: answered by tapbox itself (the sandbox's reverse zones)
    verdict: Literal["allowed", "denied", "would-deny", "error", "local"]
    rule: str | None  # text of the first rule admitting the name
    answers: tuple[str, ...] = ()  # addresses (A/AAAA) admitted to the policy and returned
    guarded: tuple[str, ...] = ()  # addresses refused by the rebinding guard and removed
    # Why it was denied, answered locally or failed, in words (not part of equality).
    reason: str = field(default="", compare=False)


class _UpstreamFailed(Exception):
    pass


CacheKey = tuple[str, int, bool]  # (name, lowercased; query type; DNSSEC records wanted)


@dataclass(frozen=True, slots=True)
class Pending:
    """A query that needs an answer from upstream, as `DnsForwarder._prepare` judged it."""

    query: dns.message.Message
    tcp: bool
    udp_limit: int
    limit: int  # the reply's size limit
    name: str
    qtype: str
    rules: Sequence[_Rule]
    rule_text: str
    verdict: Literal["allowed", "would-deny"]
    lower: dns.name.Name  # the name as asked upstream
    rdtype: dns.rdatatype.RdataType
    key: CacheKey


class DnsCache:
    """Upstream answers kept for as long as their TTLs say, so a repeated query is answered
    without asking upstream again.

    What is kept is the upstream's message, never a reply to the sandbox: every query is still
    judged by the policy first (a name denied now is denied, whatever was cached), and every
    cached answer goes through the same address learning and guard as a fresh one. Keyed by
    the lowercased name, the query type and whether DNSSEC records were asked for (the only
    things the upstream query depends on). Kept: NOERROR answers for the smallest TTL in them
    (RFC 1035 §3.2.1, RFC 2181 §5.2), and negative answers (NXDOMAIN, NODATA) for their SOA's
    negative TTL (RFC 2308 §5); nothing without a TTL, nothing for longer than `max_ttl`, no
    failure. When served, TTLs count down by the time spent in the cache (RFC 1035 §4.1.3).
    At most `size` entries; the least recently used goes first.
    """

    def __init__(self, size: int = 1024, max_ttl: float = 3600.0) -> None:
        self.size = size
        self.max_ttl = max_ttl
        self._entries: OrderedDict[CacheKey, tuple[dns.message.Message, float, float]] = \
            OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: CacheKey, message: dns.message.Message, now: float) -> None:
        ttl = min(_cache_ttl(message), self.max_ttl)
        if ttl <= 0 or self.size <= 0:
            return
        self._entries[key] = (message, now, now + ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def get(self, key: CacheKey, now: float) -> dns.message.Message | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        message, stored, expires = entry
        if now >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        aged = int(now - stored)
        if aged <= 0:
            return message
        copy = dns.message.Message(id=message.id)
        copy.flags = message.flags
        copy.set_rcode(message.rcode())
        for section in ("answer", "authority", "additional"):
            rrsets = []
            for rrset in getattr(message, section):
                rrset = rrset.copy()
                rrset.ttl = max(0, rrset.ttl - aged)
                rrsets.append(rrset)
            setattr(copy, section, rrsets)
        return copy


def _cache_ttl(message: dns.message.Message) -> float:
    """How long an upstream answer may be kept (0: not at all)."""
    rcode = message.rcode()
    if rcode == dns.rcode.NOERROR and message.answer:
        return float(min(rrset.ttl for rrset in (*message.answer, *message.authority)))
    if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        for rrset in message.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                return float(min(rrset.ttl, next(iter(rrset)).minimum))
    return 0.0


class DnsForwarder:
    """Answers the sandbox's DNS queries: policy check, upstream resolution, address learning."""

    def __init__(
        self,
        policy: _Policy,
        upstreams: Sequence[tuple[str, int]],
        *,
        clock: Callable[[], float] = trio.current_time,
        timeout: float = 5.0,
        on_event: Callable[[DnsEvent], None] | None = None,
        aaaa: bool = True,
        max_concurrent: int = 64,
        cache: DnsCache | None = None,
    ) -> None:
        self.policy = policy
        self.upstreams = list(upstreams)
        self.clock = clock
        self.timeout = timeout
        self.on_event = on_event
        self.aaaa = aaaa
        self.cache = cache if cache is not None else DnsCache()
        self._limiter = trio.CapacityLimiter(max_concurrent)
        self._max_waiting = max_concurrent

    # ----------------------------------------------------------------------------- entry point

    async def answer(self, query: bytes, *, tcp: bool = False,
                     udp_limit: int = TCP_MAX) -> bytes | None:
        """Answer one DNS message from the sandbox (wire format) with a wire-format reply.

        ``tcp=True`` when the query came over TCP: the reply may then use up to 65535 bytes;
        otherwise it is cut to the client's UDP limit, and to ``udp_limit`` (the most one
        datagram to the client can carry), with TC set.  Returns ``None`` when the message is
        not a query whose header can be read: the caller drops it.
        """
        result = self.answer_now(query, tcp=tcp, udp_limit=udp_limit)
        if isinstance(result, Pending):
            return await self.complete(result)
        return result

    def answer_now(self, query: bytes, *, tcp: bool = False,
                   udp_limit: int = TCP_MAX) -> bytes | None | Pending:
        """As `answer`, without waiting: the reply, or a `Pending` query for `complete` when
        the answer must come from upstream (it is not in the cache)."""
        if len(query) < HEADER_LEN:
            return None
        qid, qflags = struct.unpack_from("!HH", query)
        if qflags & _QR:
            return None  # a response, not a query: never answer those (no reflection loops)
        try:
            msg = dns.message.from_wire(query)
        except Exception:
            self._emit(DnsEvent("", "", "error", None))
            return _header_only(qid, qflags, dns.rcode.FORMERR)
        try:
            prepared = self._prepare(msg, tcp, udp_limit)
            if isinstance(prepared, Pending):
                cached = self.cache.get(prepared.key, self.clock())
                if cached is not None:
                    return self._finish(prepared, cached)
            return prepared
        except Exception:
            return self._internal_error(msg, qid, qflags, tcp, udp_limit)

    async def complete(self, pending: Pending) -> bytes:
        """The reply to a query `answer_now` could not answer at once: ask upstream."""
        query = pending.query
        try:
            try:
                upstream = await self._resolve(query, pending.lower, pending.rdtype)
            except _UpstreamFailed as exc:
                self._emit(DnsEvent(pending.name, pending.qtype, "error", pending.rule_text,
                                    reason=f"upstream failed ({exc})"))
                return _render(_reply(query, dns.rcode.SERVFAIL), pending.limit)
            self.cache.put(pending.key, upstream, self.clock())
            return self._finish(pending, upstream)
        except Exception:
            return self._internal_error(query, query.id, query.flags, pending.tcp,
                                        pending.udp_limit)

    def _internal_error(self, msg: dns.message.Message, qid: int, qflags: int, tcp: bool,
                        udp_limit: int) -> bytes:
        log.exception("DNS: internal error answering query %d", qid)
        self._emit(DnsEvent(*_describe(msg), "error", None))
        try:
            limit = self._size_limit(msg, tcp, udp_limit)
            return _render(_reply(msg, dns.rcode.SERVFAIL), limit)
        except Exception:
            return _header_only(qid, qflags, dns.rcode.SERVFAIL)

    def _prepare(self, query: dns.message.Message, tcp: bool,
                 udp_limit: int) -> bytes | Pending:
        """Everything decided without upstream: a reply, or what to ask upstream."""
        limit = self._size_limit(query, tcp, udp_limit)
        if query.opcode() != dns.opcode.QUERY:
            self._emit(DnsEvent(*_describe(query), "error", None))
            return _render(_reply(query, dns.rcode.NOTIMP), limit)
        if query.edns > 0:
            self._emit(DnsEvent(*_describe(query), "error", None))
            return _render(_reply(query, dns.rcode.BADVERS), limit)
        if len(query.question) != 1:
            self._emit(DnsEvent("", "", "error", None))
            return _render(_reply(query, dns.rcode.FORMERR), limit)

        question = query.question[0]
        qname: dns.name.Name = question.name
        qtype = dns.rdatatype.to_text(question.rdtype)
        name = _policy_name(qname)
        shown = name if name is not None else qname.to_text(omit_final_dot=True).lower()

        if question.rdclass != dns.rdataclass.IN or question.rdtype in (
            dns.rdatatype.AXFR,
            dns.rdatatype.IXFR,
        ):
            self._emit(DnsEvent(shown, qtype, "denied", None,
                                reason="zone transfers and classes other than IN are not served"))
            return _render(_reply(query, dns.rcode.REFUSED), limit)

        local = _local_zone(qname)
        if local is not None:
            self._emit(DnsEvent(shown, qtype, "local", None, reason=LOCAL_REASON))
            return _render(_local_answer(query, qname, question.rdtype, local), limit)

        # The policy is asked on every query, cached or not: a denial is never a cache entry.
        rules = list(self.policy.name_allowed(name)) if name is not None else []
        if name is None or not rules:
            why = "no rule" if name is not None else "not a name a rule can admit"
            self._emit(DnsEvent(shown, qtype, "denied", None, reason=why))
            return _render(_reply(query, dns.rcode.NXDOMAIN), limit)
        rule_text = rules[0].text
        if question.rdtype not in SERVED_TYPES:
            self._emit(DnsEvent(name, qtype, "denied", rule_text,
                                reason=f"query type {qtype} is not served"))
            return _render(_reply(query, dns.rcode.REFUSED), limit)
        # Audit mode (tapbox.auditpolicy): a stand-in rule lets a name without a rule resolve.
        verdict: Literal["allowed", "would-deny"] = (
            "would-deny" if getattr(rules[0], "would_deny", False) else "allowed"
        )

        if question.rdtype == dns.rdatatype.AAAA and not self.aaaa:
            self._emit(DnsEvent(name, qtype, verdict, rule_text))
            return _render(_reply(query, dns.rcode.NOERROR), limit)

        # Upstream sees the name in lower case, whatever case the sandbox used.
        want_dnssec = bool(query.ednsflags & dns.flags.DO)
        return Pending(query, tcp, udp_limit, limit, name, qtype, rules, rule_text, verdict,
                       dns.name.from_text(name + "."), question.rdtype,
                       (name, int(question.rdtype), want_dnssec))

    def _finish(self, pending: Pending, upstream: dns.message.Message) -> bytes:
        """The reply from an upstream answer (fresh or cached): addresses learned by the
        policy, those it refuses removed."""
        query, limit, name, qtype = pending.query, pending.limit, pending.name, pending.qtype
        rule_text = pending.rule_text
        qname = query.question[0].name
        rcode = upstream.rcode()
        if rcode > 0xF and query.edns < 0:
            # An extended RCODE cannot be expressed to a client without EDNS.
            self._emit(DnsEvent(name, qtype, "error", rule_text,
                                reason="extended RCODE for a client without EDNS"))
            return _render(_reply(query, dns.rcode.SERVFAIL), limit)

        answer_rrsets = list(upstream.answer)
        if not self.aaaa:
            answer_rrsets = [r for r in answer_rrsets if r.rdtype != dns.rdatatype.AAAA]
        final = _follow_cnames(qname, answer_rrsets)
        found: list[tuple[str, float]] = []
        for rrset in answer_rrsets:
            if (
                rrset.name == final
                and rrset.rdtype in _ADDRESS_TYPES
                and (rrset.rdclass == dns.rdataclass.IN)
            ):
                found.extend((rd.address, float(rrset.ttl)) for rd in rrset)

        refused: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
        if found:
            refused_text = self.policy.learn(name, pending.rules, found, now=self.clock())
            refused = {ip for a in refused_text if (ip := _ip(a)) is not None}
        admitted = tuple(dict.fromkeys(a for a, _ in found if _ip(a) not in refused))
        guarded = tuple(dict.fromkeys(a for a, _ in found if _ip(a) in refused))
        modified = bool(guarded) or len(answer_rrsets) != len(upstream.answer)
        if guarded:
            answer_rrsets = _strip_addresses(answer_rrsets, final, refused)

        reply = _reply(query, rcode)
        reply.answer = answer_rrsets
        reply.authority = list(upstream.authority)
        reply.additional = list(upstream.additional)
        # RFC 6840 §5.8: AD only to clients that asked for DNSSEC-awareness, and not once we
        # have edited the answer.
        wants_ad = bool(query.flags & dns.flags.AD) or bool(query.ednsflags & dns.flags.DO)
        if upstream.flags & dns.flags.AD and wants_ad and not modified:
            reply.flags |= dns.flags.AD
        self._emit(DnsEvent(name, qtype, pending.verdict, rule_text, admitted, guarded))
        return _render(reply, limit)

    # -------------------------------------------------------------------------------- upstream

    async def _resolve(
        self, client: dns.message.Message, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> dns.message.Message:
        """Ask the upstreams in order; return the first usable response or raise."""
        if not self.upstreams:
            raise _UpstreamFailed("no upstream")
        deadline = trio.current_time() + self.timeout
        with trio.move_on_at(deadline):
            try:
                self._limiter.acquire_nowait()
            except trio.WouldBlock:
                if self._limiter.statistics().tasks_waiting >= self._max_waiting:
                    raise _UpstreamFailed("too many queries in flight") from None
                await self._limiter.acquire()
            try:
                return await self._try_upstreams(client, qname, rdtype, deadline)
            finally:
                self._limiter.release()
        raise _UpstreamFailed("timeout")

    async def _try_upstreams(
        self,
        client: dns.message.Message,
        qname: dns.name.Name,
        rdtype: dns.rdatatype.RdataType,
        deadline: float,
    ) -> dns.message.Message:
        want_dnssec = bool(client.ednsflags & dns.flags.DO)
        for i, (host, port) in enumerate(self.upstreams):
            share = (deadline - trio.current_time()) / (len(self.upstreams) - i)
            if share <= 0:
                break
            q = dns.message.make_query(
                qname,
                rdtype,
                dns.rdataclass.IN,
                use_edns=0,
                payload=EDNS_PAYLOAD,
                want_dnssec=want_dnssec,
            )
            q.flags = dns.flags.RD  # nothing else of the sandbox's flags is passed on
            with trio.move_on_after(share):
                try:
                    r = await _exchange_udp(q, host, port)
                    if r is None or r.flags & dns.flags.TC:
                        r = await _exchange_tcp(q, host, port)
                except Exception as exc:  # OSError, bad wire data from the upstream
                    log.debug("DNS upstream %s:%d failed: %r", host, port, exc)
                    continue
                if r.rcode() in _RETRY_RCODES:
                    log.debug(
                        "DNS upstream %s:%d answered %s", host, port, dns.rcode.to_text(r.rcode())
                    )
                    continue
                return r
            log.debug("DNS upstream %s:%d timed out", host, port)
        raise _UpstreamFailed("all upstreams failed")

    # ------------------------------------------------------------------------------- helpers

    @staticmethod
    def _size_limit(query: dns.message.Message, tcp: bool, udp_limit: int) -> int:
        if tcp:
            return TCP_MAX
        # RFC 6891 §6.2.5: a payload size below 512 is treated as 512.
        client = max(UDP_CLASSIC_MAX, query.payload) if query.edns >= 0 else UDP_CLASSIC_MAX
        return min(client, udp_limit, TCP_MAX)

    def _emit(self, event: DnsEvent) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(event)
        except Exception:
            log.exception("DNS: on_event callback failed")


def _describe(msg: dns.message.Message) -> tuple[str, str]:
    """(name, qtype) of a message's first question, for events; ("", "") if it has none."""
    if not msg.question:
        return "", ""
    q = msg.question[0]
    return q.name.to_text(omit_final_dot=True).lower(), dns.rdatatype.to_text(q.rdtype)


def _policy_name(qname: dns.name.Name) -> str | None:
    """The name as the policy sees it, or None if it can never be allowed: a label with other
    characters than letters, digits, '-' and '_', or a last label of digits only (an address
    written as a name, as tapbox.allowlist refuses it in a rule)."""
    labels = [label for label in qname.labels if label]
    if not labels:
        return None
    for label in labels:
        if not _LABEL_OK.issuperset(label):
            return None
    if labels[-1].isdigit():
        return None
    return b".".join(labels).decode("ascii").lower()


def _local_zone(qname: dns.name.Name) -> dns.name.Name | None:
    """The locally served zone `qname` is in, if any."""
    for zone in LOCAL_ZONES:
        if qname.is_subdomain(zone):
            return zone
    return None


def _local_answer(query: dns.message.Message, qname: dns.name.Name, rdtype: int,
                  zone: dns.name.Name) -> dns.message.Message:
    """Authoritative answer from a locally served zone that holds only its SOA (RFC 6303 §3:
    the SOA and NS records given there; NXDOMAIN below the apex)."""
    reply = _reply(query, dns.rcode.NOERROR)
    reply.flags |= dns.flags.AA
    soa = dns.rrset.from_text(zone, 10800, dns.rdataclass.IN, dns.rdatatype.SOA,
                              f"{zone} nobody.invalid. 1 604800 86400 2419200 10800")
    if qname != zone:
        reply.set_rcode(dns.rcode.NXDOMAIN)
        reply.authority.append(soa)
    elif rdtype == dns.rdatatype.SOA:
        reply.answer.append(soa)
    elif rdtype == dns.rdatatype.NS:
        reply.answer.append(dns.rrset.from_text(zone, 10800, dns.rdataclass.IN,
                                                dns.rdatatype.NS, str(zone)))
    else:
        reply.authority.append(soa)  # NODATA (RFC 2308 §2.2)
    return reply


def _follow_cnames(qname: dns.name.Name, rrsets: Sequence[dns.rrset.RRset]) -> dns.name.Name:
    """The name at the end of the CNAME chain starting at qname (RFC 1034 §4.3.2 step 3a)."""
    cnames = {
        r.name: r
        for r in rrsets
        if r.rdtype == dns.rdatatype.CNAME and r.rdclass == dns.rdataclass.IN and len(r) > 0
    }
    current = qname
    seen = {current}
    for _ in range(MAX_CNAME_HOPS):
        rrset = cnames.get(current)
        if rrset is None:
            break
        target = next(iter(rrset)).target
        if target in seen:
            break  # loop: stop at the last new name
        seen.add(target)
        current = target
    return current


def _strip_addresses(
    rrsets: Sequence[dns.rrset.RRset],
    owner: dns.name.Name,
    refused: set[ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> list[dns.rrset.RRset]:
    out: list[dns.rrset.RRset] = []
    for rrset in rrsets:
        if rrset.name == owner and rrset.rdtype in _ADDRESS_TYPES:
            kept = [rd for rd in rrset if _ip(rd.address) not in refused]
            if not kept:
                continue
            if len(kept) != len(rrset):
                rrset = dns.rrset.from_rdata_list(rrset.name, rrset.ttl, kept)
        out.append(rrset)
    return out


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _reply(query: dns.message.Message, rcode: dns.rcode.Rcode) -> dns.message.Message:
    """An empty reply to `query`: its id and question, RA set, EDNS iff the client used it."""
    reply = dns.message.make_response(query, recursion_available=True, our_payload=EDNS_PAYLOAD)
    if query.edns >= 0 and query.ednsflags & dns.flags.DO:
        reply.ednsflags |= dns.flags.DO  # RFC 3225 §3: echo DO
    reply.set_rcode(rcode)
    return reply


def _render(reply: dns.message.Message, limit: int) -> bytes:
    return reply.to_wire(max_size=limit, prefer_truncation=True)


def _header_only(qid: int, qflags: int, rcode: int) -> bytes:
    """A bare reply header (no sections) for when the query cannot be parsed further."""
    flags = _QR | (qflags & (_OPCODE_MASK | _RD)) | _RA | (rcode & 0xF)
    return struct.pack("!6H", qid, flags, 0, 0, 0, 0)


# ---------------------------------------------------------------------------------- transport
# The exchange with an upstream is done here on trio sockets, with dnspython only building and
# parsing messages: dnspython's own trio backend requires a newer trio than tapbox does.
# Timeouts come from the caller's cancel scope.


class _BadUpstreamReply(Exception):
    pass


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _check_reply(q: dns.message.Message, wire: bytes) -> dns.message.Message | None:
    """Parse an upstream reply to `q`.

    None: the reply was truncated so badly that dnspython would not parse it (go to TCP).
    Raises _BadUpstreamReply if the reply does not parse or does not answer `q`.
    """
    try:
        r = dns.message.from_wire(wire)
    except dns.message.Truncated:
        return None
    except Exception as exc:
        raise _BadUpstreamReply(f"unparseable reply: {exc!r}") from exc
    if not q.is_response(r):
        raise _BadUpstreamReply("reply does not match the query")
    return r


async def _exchange_udp(q: dns.message.Message, host: str, port: int) -> dns.message.Message | None:
    """One query over UDP (RFC 1035 §4.2.1) on a connected socket, so the kernel drops
    datagrams from any other source.  Datagrams with another id, or that are not replies, are
    ignored (RFC 5452 §9.1: stale or spoofed); a reply with our id that does not parse or match
    the question fails this upstream."""
    wire = q.to_wire()
    with trio.socket.socket(_family(host), socket.SOCK_DGRAM) as sock:
        await sock.connect((host, port))
        await sock.send(wire)
        while True:
            data = await sock.recv(65535)
            if len(data) < HEADER_LEN:
                continue
            rid, rflags = struct.unpack_from("!HH", data)
            if rid != q.id or not rflags & _QR:
                continue
            return _check_reply(q, data)


async def _exchange_tcp(q: dns.message.Message, host: str, port: int) -> dns.message.Message:
    """One query over TCP (RFC 1035 §4.2.2, RFC 7766 §6.2: length-prefixed, one per connection
    here)."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(TcpDnsFramer.frame(q.to_wire()))
        framer = TcpDnsFramer()
        while True:
            chunk = await stream.receive_some(TCP_MAX + 2)
            if not chunk:
                raise _BadUpstreamReply("connection closed before the reply")
            for message in framer.feed(chunk):
                r = _check_reply(q, message)
                if r is None:
                    raise _BadUpstreamReply("truncated reply over TCP")
                return r
