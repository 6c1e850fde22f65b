"""Delivery, the resolver: turns a recipient domain into the ordered MX hosts and addresses to
try (RFC 5321 §5.1, null MX RFC 7505), or into its configured smarthosts, behind a query limit
and a TTL-bounded cache. A host's A and AAAA queries stand alone: one that fails leaves the
other's addresses usable (RFC 4074 servers mishandle AAAA), as in Postfix."""

from __future__ import annotations

import asyncio
import ipaddress
import random
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdtypes.ANY.MX
import dns.resolver

from relay.config.delivery import DnsConfig
from relay.config.routes import Smarthost
from relay.mail.address import address_literal
from relay.mail.reply import Reply, Verdict, classify
from relay.observe import logs

CACHE_SIZE = 10_000
# Upper bound for remembering a permanent answer (NXDOMAIN, null MX, no address records).
PERMANENT_ERROR_TTL = 300.0
# Upper bound for remembering the addresses of a host one of whose queries failed: a query that
# times out then costs one wait a minute per host, not one per message, and an answer that comes
# back is used within a minute (IPv4 goes first anyway). RFC 2308 §7.1 allows remembering a
# server failure for up to five minutes.
PARTIAL_ANSWER_TTL = 60.0
ADDRESS_TYPES = ("A", "AAAA")  # in the order their addresses are tried: IPv4 first


@dataclass(frozen=True)
class Host:
    name: str  # MX host name; for implicit MX the domain itself; for a literal, the literal
    preference: int
    addresses: tuple[str, ...]  # IPv4 addresses first, then IPv6
    # A smarthost's transport settings (port, TLS, AUTH) instead of delivery's for MX hosts.
    smarthost: Smarthost | None = None


@dataclass(frozen=True)
class Route:
    domain: str
    hosts: tuple[Host, ...]  # in the order the courier must try them; never empty


# What the cache holds: a domain's route, or the reply that settled it; a host name's addresses.
Cached = Route | Reply | tuple[str, ...]


@dataclass(frozen=True)
class Addresses:
    """What the A and AAAA queries for one name gave."""

    found: tuple[str, ...]  # IPv4 addresses first, then IPv6
    ttl: float  # how long found (or its absence) may be reused; 0: not at all
    # The queries that failed, (type, error): SERVFAIL, REFUSED, a timeout, or an NXDOMAIN that
    # the other type's addresses contradict. A query that failed contributes no TTL.
    failed: tuple[tuple[str, dns.exception.DNSException], ...] = ()


class ResolveError(Exception):
    """Resolution settled the recipients' fate for this attempt without any connection."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply

    @property
    def permanent(self) -> bool:
        return classify(self.reply).verdict is Verdict.PERMANENT


class Resolver:
    """Routes for recipient domains; all DNS queries share one concurrency limit."""

    def __init__(self, cfg: DnsConfig, *, rng: random.Random | None = None) -> None:
        self._cfg = cfg
        self._rng = rng or random.Random()
        self._dns = dns_resolver(cfg)
        self._limit = asyncio.Semaphore(cfg.max_queries)
        self._cache: OrderedDict[str, tuple[float, Cached]] = OrderedDict()

    async def route(self, domain: str) -> Route:
        """Where to deliver mail for domain; ResolveError when DNS alone settles the attempt."""
        domain = domain.strip().rstrip(".")
        if domain.startswith("["):
            return _literal(domain)
        domain = domain.lower()
        cached = self._cached(domain)
        if isinstance(cached, Reply):
            raise ResolveError(cached)
        if isinstance(cached, Route):
            return cached
        started = time.monotonic()
        try:
            route, ttl = await self._resolve(domain)
        except ResolveError as exc:
            if exc.permanent:
                self._remember(domain, exc.reply, started, PERMANENT_ERROR_TTL)
            raise
        self._remember(domain, route, started, ttl)
        return route

    async def smarthosts(self, domain: str, via: Sequence[Smarthost]) -> Route:
        """The route for domain through via's smarthosts, in order: an address is used as it is,
        a name's A/AAAA addresses are looked up; a smarthost without any address now is skipped,
        and when none is left the attempt fails temporarily (ResolveError)."""
        found = await asyncio.gather(*(self._smarthost(n, host) for n, host in enumerate(via)))
        hosts = tuple(host for host in found if host is not None)
        if not hosts:
            names = ", ".join(smarthost.host for smarthost in via)
            text = f"no address for any smarthost of {domain} ({names})"
            raise ResolveError(Reply(451, "4.4.4", text))
        return Route(domain, hosts)

    async def _smarthost(self, index: int, smarthost: Smarthost) -> Host | None:
        try:
            addresses: tuple[str, ...] = (str(ipaddress.ip_address(smarthost.host)),)
        except ValueError:
            addresses = await self._host_addresses(smarthost.host.lower().rstrip("."))
        return Host(smarthost.host, index, addresses, smarthost) if addresses else None

    async def _host_addresses(self, name: str) -> tuple[str, ...]:
        """name's addresses, cached for their TTL; none when it has none or both lookups fail."""
        key = f"{name} A/AAAA"  # a space never occurs in a domain, the other keys
        cached = self._cached(key)
        if isinstance(cached, tuple):
            return cached
        started = time.monotonic()
        try:
            addresses = await self.addresses(_name(name))
        except ResolveError:
            return ()
        if addresses.found:
            self._remember(key, addresses.found, started, addresses.ttl)
        return addresses.found

    async def _resolve(self, domain: str) -> tuple[Route, float]:
        """The route for domain and the shortest TTL among the records it was built from."""
        name = _name(domain)
        try:
            mx = await self.lookup(name, "MX")
        except dns.resolver.NXDOMAIN:
            raise ResolveError(Reply(550, "5.1.2", f"{domain} does not exist (NXDOMAIN)")) from None
        except dns.exception.DNSException as exc:
            raise ResolveError(_lookup_failed(domain, exc)) from None
        if mx.rrset is None:
            return await self._implicit(domain, name, answer_ttl(mx))
        return await self._mx_route(domain, mx)

    async def _implicit(
        self, domain: str, name: dns.name.Name, mx_ttl: float
    ) -> tuple[Route, float]:
        """RFC 5321 §5.1: without MX records the domain itself is the one host (implicit MX).
        Permanent only when both address queries answered that there is none."""
        addresses = await self.addresses(name)
        if addresses.found:
            return Route(domain, (Host(domain, 0, addresses.found),)), min(mx_ttl, addresses.ttl)
        if addresses.failed:
            raise ResolveError(_lookup_failed(domain, addresses.failed[0][1]))
        raise ResolveError(Reply(550, "5.1.2", f"{domain} has no MX or address records"))

    async def _mx_route(self, domain: str, mx: dns.resolver.Answer) -> tuple[Route, float]:
        records: list[dns.rdtypes.ANY.MX.MX] = list(mx)
        if any(record.exchange == dns.name.root for record in records):
            # RFC 7505 §3: a null MX says the domain accepts no mail; make no connection.
            text = f"{domain} does not accept mail (null MX, RFC 7505)"
            raise ResolveError(Reply(556, "5.1.10", text))
        # RFC 5321 §5.1: lowest preference first; equal preferences in random order. Servers
        # shuffle records, so put them in a fixed order first: the same rng gives the same route.
        records.sort(key=lambda record: record.exchange)
        records.sort(key=lambda record: (record.preference, self._rng.random()))
        found = await asyncio.gather(*(self._host(record) for record in records))
        hosts = tuple(host for host, _ in found if host is not None)
        if not hosts:
            # Temporary: address records of new MX hosts often appear after the MX itself, and a
            # failed lookup of one host may succeed on the next attempt.
            raise ResolveError(Reply(451, "4.4.4", f"no address for any MX host of {domain}"))
        return Route(domain, hosts), min([answer_ttl(mx), *(ttl for _, ttl in found)])

    async def _host(self, record: dns.rdtypes.ANY.MX.MX) -> tuple[Host | None, float]:
        """One MX host with its addresses and their TTL; None when it has no address now (with
        a TTL of 0 when a failed lookup is why: the route is then not cached without it)."""
        addresses = await self.addresses(record.exchange)
        if not addresses.found:
            return None, addresses.ttl
        name = record.exchange.to_text(omit_final_dot=True).lower()
        return Host(name, record.preference, addresses.found), addresses.ttl

    async def addresses(self, name: dns.name.Name) -> Addresses:
        """name's A and AAAA addresses, queried concurrently; each failed query is logged."""
        outcomes = await asyncio.gather(*(self._query(name, rdtype) for rdtype in ADDRESS_TYPES))
        addresses = _gathered(dict(zip(ADDRESS_TYPES, outcomes, strict=True)))
        host = name.to_text(omit_final_dot=True)
        for rdtype, error in addresses.failed:
            logs.event(
                "dns_query_failed", level="warning", host=host, rdtype=rdtype,
                reason=_query_failure(error), error=str(error), addresses=len(addresses.found),
            )  # fmt: skip
        return addresses

    async def _query(
        self, name: dns.name.Name, rdtype: str
    ) -> dns.resolver.Answer | dns.exception.DNSException:
        """One query within the limit: its answer (empty for NoAnswer), or why it failed."""
        try:
            return await self.lookup(name, rdtype)
        except dns.exception.DNSException as exc:
            return exc

    async def lookup(self, name: dns.name.Name, rdtype: str) -> dns.resolver.Answer:
        """One query within the limit; an empty answer (NoAnswer) is returned, not raised."""
        async with self._limit:
            return await self._dns.resolve(name, rdtype, raise_on_no_answer=False)

    def _cached(self, domain: str) -> Cached | None:
        entry = self._cache.get(domain)
        if entry is None:
            return None
        expires, value = entry
        if time.monotonic() >= expires:
            del self._cache[domain]
            return None
        return value

    def _remember(self, domain: str, value: Cached, started: float, ttl: float) -> None:
        """Cache value for ttl (at most max_cache_ttl) counted from when its queries started."""
        ttl = min(ttl, self._cfg.max_cache_ttl)
        if ttl <= 0:
            return
        self._cache.pop(domain, None)
        self._cache[domain] = (started + ttl, value)
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)


def dns_resolver(cfg: DnsConfig) -> dns.asyncresolver.Resolver:
    """A dnspython resolver for cfg: its nameservers (or the system's), no cache of its own."""
    resolver = dns.asyncresolver.Resolver(configure=not cfg.nameservers)
    if cfg.nameservers:
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(host, port) for host, port in cfg.nameservers
        ]
    resolver.lifetime = cfg.timeout
    resolver.cache = None
    return resolver


def _name(domain: str) -> dns.name.Name:
    """The absolute name for domain (so no search list applies); a malformed one never resolves."""
    try:
        name = dns.name.from_text(domain)
    except dns.exception.DNSException:
        name = dns.name.root
    if name == dns.name.root:
        raise ResolveError(Reply(550, "5.1.2", f"{domain!r} is not a valid domain name"))
    return name


def _literal(literal: str) -> Route:
    """A domain literal names the host itself; no DNS."""
    address = address_literal(literal)
    if address is None:
        raise ResolveError(Reply(550, "5.1.2", f"{literal} is not a valid address literal"))
    return Route(literal, (Host(literal, 0, (str(address),)),))


def _gathered(outcomes: dict[str, dns.resolver.Answer | dns.exception.DNSException]) -> Addresses:
    """The addresses of one name from its queries' outcomes by type (A first). What came back is
    used; an NXDOMAIN counts as an answer (no address) unless another type's addresses
    contradict it (RFC 4074 §4.2); every other failure is listed in failed."""
    answers = [o for o in outcomes.values() if isinstance(o, dns.resolver.Answer)]
    found = tuple(record.address for answer in answers for record in answer)
    failed = tuple(
        (rdtype, outcome)
        for rdtype, outcome in outcomes.items()
        if isinstance(outcome, dns.exception.DNSException)
        and (found or not isinstance(outcome, dns.resolver.NXDOMAIN))
    )
    ttl = min(_reuse_for(outcome, bool(found)) for outcome in outcomes.values())
    return Addresses(found, ttl, failed)


def _reuse_for(outcome: dns.resolver.Answer | dns.exception.DNSException, found: bool) -> float:
    """How long one query's outcome lets the name's addresses be reused: an answer for its TTL;
    a failed query has no TTL of its own, so beside addresses it caps them at
    PARTIAL_ANSWER_TTL, and alone it allows no reuse, unless it is an NXDOMAIN (permanent)."""
    if isinstance(outcome, dns.resolver.Answer):
        return answer_ttl(outcome)
    if found:
        return PARTIAL_ANSWER_TTL
    return PERMANENT_ERROR_TTL if isinstance(outcome, dns.resolver.NXDOMAIN) else 0.0


def _query_failure(error: dns.exception.DNSException) -> str:
    """A failed query's cause in one word: NXDOMAIN, timeout, or the reply codes the name
    servers gave (SERVFAIL, REFUSED, …)."""
    if isinstance(error, dns.resolver.NXDOMAIN):
        return "NXDOMAIN"
    if isinstance(error, dns.exception.Timeout):
        return "timeout"
    errors = getattr(error, "kwargs", {}).get("errors") or []
    causes = dict.fromkeys(str(server_error[3]) for server_error in errors)
    return ", ".join(causes) or type(error).__name__


def _lookup_failed(domain: str, error: dns.exception.DNSException) -> Reply:
    """A lookup for domain that failed on the DNS side: temporary (RFC 5321 §5.1)."""
    return Reply(451, "4.4.3", f"DNS lookup for {domain} failed: {error}")


def answer_ttl(answer: dns.resolver.Answer) -> float:
    """Seconds the answer may be reused: the shortest TTL in it, or the SOA's for an empty one."""
    return float(answer.chaining_result.minimum_ttl)
