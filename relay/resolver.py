"""Resolver stage: turns a recipient domain into the ordered MX hosts and addresses to try
(RFC 5321 §5.1, null MX RFC 7505), or into its configured smarthosts, behind a query limit and a
TTL-bounded cache."""

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

from relay.classify import Reply, Verdict, classify
from relay.config import Config, DnsConfig
from relay.shapeconfig import Smarthost

CACHE_SIZE = 10_000
# Upper bound for remembering a permanent answer (NXDOMAIN, null MX, no address records).
PERMANENT_ERROR_TTL = 300.0


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
        """name's addresses, cached for their TTL; none when it has none or the lookup fails."""
        key = f"{name} A/AAAA"  # a space never occurs in a domain, the other keys
        cached = self._cached(key)
        if isinstance(cached, tuple):
            return cached
        started = time.monotonic()
        try:
            addresses, ttl = await self._addresses(_name(name))
        except (dns.exception.DNSException, ResolveError):
            return ()
        if addresses:
            self._remember(key, addresses, started, ttl)
        return addresses

    async def _resolve(self, domain: str) -> tuple[Route, float]:
        """The route for domain and the shortest TTL among the records it was built from."""
        name = _name(domain)
        try:
            mx = await self._lookup(name, "MX")
            if mx.rrset is None:
                return await self._implicit(domain, name, answer_ttl(mx))
        except dns.resolver.NXDOMAIN:
            raise ResolveError(Reply(550, "5.1.2", f"{domain} does not exist (NXDOMAIN)")) from None
        except dns.exception.DNSException as exc:
            reply = Reply(451, "4.4.3", f"DNS lookup for {domain} failed: {exc}")
            raise ResolveError(reply) from None
        return await self._mx_route(domain, mx)

    async def _implicit(
        self, domain: str, name: dns.name.Name, mx_ttl: float
    ) -> tuple[Route, float]:
        """RFC 5321 §5.1: without MX records the domain itself is the one host (implicit MX)."""
        addresses, ttl = await self._addresses(name)
        if not addresses:
            raise ResolveError(Reply(550, "5.1.2", f"{domain} has no MX or address records"))
        return Route(domain, (Host(domain, 0, addresses),)), min(mx_ttl, ttl)

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
        """One MX host with its addresses and their TTL; None when it has no address now."""
        try:
            addresses, ttl = await self._addresses(record.exchange)
        except dns.resolver.NXDOMAIN:
            return None, PERMANENT_ERROR_TTL
        except dns.exception.DNSException:
            return None, 0.0  # use the other hosts, but do not cache a route missing this one
        if not addresses:
            return None, ttl
        name = record.exchange.to_text(omit_final_dot=True).lower()
        return Host(name, record.preference, addresses), ttl

    async def _addresses(self, name: dns.name.Name) -> tuple[tuple[str, ...], float]:
        """A then AAAA addresses of name, queried concurrently, and the shorter TTL."""
        a, aaaa = await asyncio.gather(self._lookup(name, "A"), self._lookup(name, "AAAA"))
        return tuple(record.address for record in (*a, *aaaa)), min(answer_ttl(a), answer_ttl(aaaa))

    async def _lookup(self, name: dns.name.Name, rdtype: str) -> dns.resolver.Answer:
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


class Router:
    """Where mail for a recipient domain goes: through the smarthosts of the first route rule
    that matches it, else to the domain's MX hosts."""

    def __init__(self, cfg: Config, resolver: Resolver) -> None:
        self._cfg = cfg
        self._resolver = resolver

    async def route(self, domain: str) -> Route:
        """The route for domain; ResolveError when DNS alone settles the attempt."""
        name = domain.strip().rstrip(".").lower()
        rule = self._cfg.route_rule(name)
        if rule is None:
            return await self._resolver.route(domain)  # as it was given: a literal keeps its case
        return await self._resolver.smarthosts(name, rule.via)


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


def address_literal(literal: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """RFC 5321 §4.1.3: the address in `[192.0.2.1]` or `[IPv6:2001:db8::1]`, else None."""
    inner = literal[1:-1] if literal.startswith("[") and literal.endswith("]") else ""
    version, text = (6, inner[5:]) if inner.lower().startswith("ipv6:") else (4, inner)
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return address if address.version == version else None


def _literal(literal: str) -> Route:
    """A domain literal names the host itself; no DNS."""
    address = address_literal(literal)
    if address is None:
        raise ResolveError(Reply(550, "5.1.2", f"{literal} is not a valid address literal"))
    return Route(literal, (Host(literal, 0, (str(address),)),))


def answer_ttl(answer: dns.resolver.Answer) -> float:
    """Seconds the answer may be reused: the shortest TTL in it, or the SOA's for an empty one."""
    return float(answer.chaining_result.minimum_ttl)
