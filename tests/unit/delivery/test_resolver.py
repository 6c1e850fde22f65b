"""Resolver stage against a real DNS server: MX order, null and implicit MX, failures (of one
address query or all), cache."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

import dns.name
import pytest
from structlog.testing import capture_logs

from relay.config.delivery import DeliveryConfig, DnsConfig
from relay.config.model import Config
from relay.config.routes import RouteRule, Smarthost
from relay.delivery.resolver import (
    PARTIAL_ANSWER_TTL,
    PERMANENT_ERROR_TTL,
    Addresses,
    Host,
    ResolveError,
    Resolver,
    Route,
)
from relay.delivery.router import Router
from relay.mail.reply import Reply, Verdict, classify
from tests.support.dns import NEGATIVE_TTL, DnsServer

DOMAIN = "example.test"


def resolver(server: DnsServer, *, timeout: float = 2.0, **kwargs: Any) -> Resolver:
    rng = kwargs.pop("rng", None)
    cfg = DnsConfig(nameservers=((server.host, server.port),), timeout=timeout, **kwargs)
    return Resolver(cfg, rng=rng)


def route(server: DnsServer, domain: str = DOMAIN, **kwargs: Any) -> Route:
    return asyncio.run(resolver(server, **kwargs).route(domain))


def failure(server: DnsServer, domain: str = DOMAIN, **kwargs: Any) -> Reply:
    with pytest.raises(ResolveError) as info:
        route(server, domain, **kwargs)
    assert str(info.value) == str(info.value.reply)
    return info.value.reply


def verdict(reply: Reply) -> Verdict:
    return classify(reply).verdict


def names(found: Route) -> list[str]:
    return [host.name for host in found.hosts]


def test_mx_hosts_come_in_preference_order(dns_server: DnsServer) -> None:
    dns_server.mx(DOMAIN, (20, "mx2.example.test"), (10, "mx1.example.test"), (30, "mx3.test"))
    for index, host in enumerate(["mx1.example.test", "mx2.example.test", "mx3.test"], 1):
        dns_server.a(host, f"192.0.2.{index}")

    found = route(dns_server)

    assert found == Route(
        DOMAIN,
        (
            Host("mx1.example.test", 10, ("192.0.2.1",)),
            Host("mx2.example.test", 20, ("192.0.2.2",)),
            Host("mx3.test", 30, ("192.0.2.3",)),
        ),
    )


def test_equal_preferences_are_shuffled_by_the_rng(dns_server: DnsServer) -> None:
    dns_server.mx(DOMAIN, (10, "a.test"), (10, "b.test"), (5, "first.test"))
    for host in ["a.test", "b.test", "first.test"]:
        dns_server.a(host, "192.0.2.1")

    orders = {tuple(names(route(dns_server, rng=random.Random(seed)))) for seed in range(20)}

    assert orders == {("first.test", "a.test", "b.test"), ("first.test", "b.test", "a.test")}
    same_seed = {tuple(names(route(dns_server, rng=random.Random(7)))) for _ in range(5)}
    assert len(same_seed) == 1


def test_ipv4_addresses_come_before_ipv6(dns_server: DnsServer) -> None:
    dns_server.mx(DOMAIN, (10, "mx.test"))
    dns_server.aaaa("mx.test", "2001:db8::1")
    dns_server.a("mx.test", "192.0.2.1", "192.0.2.2")

    addresses = route(dns_server).hosts[0].addresses

    assert sorted(addresses[:2]) == ["192.0.2.1", "192.0.2.2"]  # in the order the server sent
    assert addresses[2:] == ("2001:db8::1",)


def test_domain_without_mx_is_its_own_host(dns_server: DnsServer) -> None:
    dns_server.a(DOMAIN, "192.0.2.9")
    dns_server.aaaa(DOMAIN, "2001:db8::9")

    found = route(dns_server, "Example.TEST.")

    assert found == Route(DOMAIN, (Host(DOMAIN, 0, ("192.0.2.9", "2001:db8::9")),))


def test_domain_without_mx_or_address_is_permanent(dns_server: DnsServer) -> None:
    dns_server.record(DOMAIN, "TXT", '"v=spf1 -all"')

    reply = failure(dns_server)

    assert (reply.code, reply.enhanced) == (550, "5.1.2")
    assert "has no MX or address records" in reply.text
    assert verdict(reply) is Verdict.PERMANENT


def test_null_mx_refuses_without_address_lookups(dns_server: DnsServer) -> None:
    dns_server.null_mx(DOMAIN)

    reply = failure(dns_server)

    assert reply == Reply(556, "5.1.10", f"{DOMAIN} does not accept mail (null MX, RFC 7505)")
    assert verdict(reply) is Verdict.PERMANENT
    assert dns_server.queries(".", "A") + dns_server.queries(".", "AAAA") == 0


def test_nxdomain_is_permanent(dns_server: DnsServer) -> None:
    reply = failure(dns_server, "nowhere.test")

    assert reply == Reply(550, "5.1.2", "nowhere.test does not exist (NXDOMAIN)")
    assert verdict(reply) is Verdict.PERMANENT


def test_servfail_is_temporary(dns_server: DnsServer) -> None:
    dns_server.mx(DOMAIN, (10, "mx.test"))
    dns_server.servfail(DOMAIN)

    reply = failure(dns_server)

    assert (reply.code, reply.enhanced) == (451, "4.4.3")
    assert reply.text.startswith(f"DNS lookup for {DOMAIN} failed: ")
    assert verdict(reply) is Verdict.TEMPORARY


def test_silent_nameserver_times_out_as_temporary(dns_server: DnsServer) -> None:
    dns_server.drop(DOMAIN)
    started = time.monotonic()

    reply = failure(dns_server, timeout=0.5)

    assert time.monotonic() - started < 2
    assert (reply.code, reply.enhanced) == (451, "4.4.3")
    assert verdict(reply) is Verdict.TEMPORARY


def test_mx_host_without_address_is_skipped(dns_server: DnsServer) -> None:
    dns_server.mx(DOMAIN, (10, "gone.test"), (20, "empty.test"), (30, "alive.test"))
    dns_server.record("empty.test", "TXT", '"no address here"')
    dns_server.a("alive.test", "192.0.2.1")

    assert route(dns_server).hosts == (Host("alive.test", 30, ("192.0.2.1",)),)


def test_mx_host_whose_lookup_fails_is_skipped_and_not_cached(dns_server: DnsServer) -> None:
    dns_server.mx(DOMAIN, (10, "broken.test"), (20, "alive.test"))
    dns_server.a("broken.test", "192.0.2.1")
    dns_server.servfail("broken.test")
    dns_server.a("alive.test", "192.0.2.2")

    async def twice() -> tuple[Route, Route]:
        cached = resolver(dns_server)
        first = await cached.route(DOMAIN)
        dns_server.clear("broken.test")
        dns_server.a("broken.test", "192.0.2.1")
        return first, await cached.route(DOMAIN)

    first, second = asyncio.run(twice())

    assert names(first) == ["alive.test"]
    assert names(second) == ["broken.test", "alive.test"]


def test_no_address_for_any_mx_host_is_temporary(dns_server: DnsServer) -> None:
    dns_server.mx(DOMAIN, (10, "gone.test"), (20, "also-gone.test"))

    reply = failure(dns_server)

    assert reply == Reply(451, "4.4.4", f"no address for any MX host of {DOMAIN}")
    assert verdict(reply) is Verdict.TEMPORARY


def test_route_is_cached(dns_server: DnsServer) -> None:
    dns_server.mx(DOMAIN, (10, "mx.test"))
    dns_server.a("mx.test", "192.0.2.1")

    async def twice() -> tuple[Route, Route]:
        cached = resolver(dns_server)
        return await cached.route(DOMAIN), await cached.route("EXAMPLE.test.")

    first, second = asyncio.run(twice())

    assert first == second
    assert dns_server.queries(DOMAIN, "MX") == 1
    assert dns_server.queries("mx.test", "A") == 1


@pytest.mark.parametrize(("ttl", "max_cache_ttl"), [(1, 3600.0), (60, 1.0)])
def test_cached_route_expires(dns_server: DnsServer, ttl: int, max_cache_ttl: float) -> None:
    dns_server.mx(DOMAIN, (10, "old.test"), ttl=ttl)
    dns_server.a("old.test", "192.0.2.1", ttl=ttl)

    async def before_and_after() -> tuple[Route, Route]:
        cached = resolver(dns_server, max_cache_ttl=max_cache_ttl)
        before = await cached.route(DOMAIN)
        dns_server.mx(DOMAIN, (10, "new.test"))
        dns_server.a("new.test", "192.0.2.2")
        await asyncio.sleep(1.2)
        return before, await cached.route(DOMAIN)

    before, after = asyncio.run(before_and_after())

    assert (names(before), names(after)) == (["old.test"], ["new.test"])
    assert dns_server.queries(DOMAIN, "MX") == 2


def test_permanent_error_is_cached(dns_server: DnsServer) -> None:
    async def twice() -> list[Reply]:
        cached = resolver(dns_server)
        replies = []
        for _ in range(2):
            with pytest.raises(ResolveError) as info:
                await cached.route("nowhere.test")
            replies.append(info.value.reply)
            dns_server.a("nowhere.test", "192.0.2.1")
        return replies

    first, second = asyncio.run(twice())

    assert first == second
    assert dns_server.queries("nowhere.test", "MX") == 1


def test_temporary_error_is_not_cached(dns_server: DnsServer) -> None:
    dns_server.servfail(DOMAIN)

    async def fail_then_succeed() -> Route:
        cached = resolver(dns_server)
        with pytest.raises(ResolveError):
            await cached.route(DOMAIN)
        dns_server.clear(DOMAIN)
        dns_server.a(DOMAIN, "192.0.2.1")
        return await cached.route(DOMAIN)

    assert names(asyncio.run(fail_then_succeed())) == [DOMAIN]
    assert dns_server.queries(DOMAIN, "MX") == 2


@pytest.mark.parametrize(
    ("literal", "address"),
    [("[127.0.0.2]", "127.0.0.2"), ("[IPv6:::1]", "::1"), ("[ipv6:2001:DB8:0::1]", "2001:db8::1")],
)
def test_address_literal_needs_no_dns(dns_server: DnsServer, literal: str, address: str) -> None:
    assert route(dns_server, literal) == Route(literal, (Host(literal, 0, (address,)),))


@pytest.mark.parametrize(
    "domain",
    ["[300.0.0.1]", "[::1]", "[IPv6:127.0.0.1]", "[mx.example.test]", "[127.0.0.1", "a..test", ""],
)
def test_malformed_domain_is_permanent(dns_server: DnsServer, domain: str) -> None:
    reply = failure(dns_server, domain)

    assert (reply.code, reply.enhanced) == (550, "5.1.2")


def test_many_domains_resolve_through_one_query_slot(dns_server: DnsServer) -> None:
    domains = [f"d{index}.test" for index in range(30)]
    for index, domain in enumerate(domains):
        dns_server.mx(domain, (10, f"mx.{domain}"))
        dns_server.a(f"mx.{domain}", f"192.0.2.{index}")
        dns_server.aaaa(f"mx.{domain}", f"2001:db8::{index + 1}")

    async def all_at_once() -> list[Route]:
        shared = resolver(dns_server, max_queries=1)
        return await asyncio.gather(*(shared.route(domain) for domain in domains))

    routes = asyncio.run(all_at_once())

    assert [found.hosts[0].addresses for found in routes] == [
        (f"192.0.2.{index}", f"2001:db8::{index + 1}") for index in range(len(domains))
    ]


def test_large_mx_set_arrives_over_tcp(dns_server: DnsServer) -> None:
    hosts = [f"mail-exchanger-{index:02}.example-provider.test" for index in range(40)]
    dns_server.mx(DOMAIN, *((index, host) for index, host in enumerate(hosts)))
    for host in hosts:
        dns_server.a(host, "192.0.2.1")

    assert names(route(dns_server)) == hosts
    assert dns_server.queries(DOMAIN, "MX") == 2  # truncated over UDP, then again over TCP


# --- the router: smarthost routes by recipient domain --------------------------------------------

RELAY_IP = Smarthost("127.0.0.3", 2525, "none", False)
RELAY_NAME = Smarthost("smart.test", 587, "starttls", True, "app", "secret")


def router(server: DnsServer, *rules: RouteRule, timeout: float = 2.0) -> Router:
    dns_cfg = DnsConfig(nameservers=((server.host, server.port),), timeout=timeout)
    cfg = Config(delivery=DeliveryConfig(dns=dns_cfg), routes=rules)
    return Router(cfg, Resolver(dns_cfg))


def routed(server: DnsServer, domain: str, *rules: RouteRule) -> Route:
    return asyncio.run(router(server, *rules).route(domain))


def test_router_gives_the_smarthosts_in_order_without_mx_lookups(dns_server: DnsServer) -> None:
    dns_server.a("smart.test", "192.0.2.7")

    found = routed(dns_server, "B.test.", RouteRule(("b.test",), (RELAY_NAME, RELAY_IP)))

    assert found == Route(
        "b.test",
        (
            Host("smart.test", 0, ("192.0.2.7",), RELAY_NAME),
            Host("127.0.0.3", 1, ("127.0.0.3",), RELAY_IP),
        ),
    )
    assert dns_server.queries("b.test", "MX") == 0


@pytest.mark.parametrize(
    ("domain", "rule_domains", "via_smarthost"),
    [
        ("b.test", ("b.test",), True),
        ("a.test", ("b.test",), False),
        ("x.b.test", (".b.test",), True),
        ("b.test", (".b.test",), False),
        ("anything.test", ("*",), True),
    ],
)
def test_router_matches_rules_else_uses_mx(
    dns_server: DnsServer, domain: str, rule_domains: tuple[str, ...], via_smarthost: bool
) -> None:
    dns_server.mx(domain, (10, "mx.example.test"))
    dns_server.a("mx.example.test", "192.0.2.1")

    found = routed(dns_server, domain, RouteRule(rule_domains, (RELAY_IP,)))

    assert [host.smarthost is not None for host in found.hosts] == [via_smarthost]


def test_router_rule_via_mx_comes_first(dns_server: DnsServer) -> None:
    dns_server.mx("b.test", (10, "mx.example.test"))
    dns_server.a("mx.example.test", "192.0.2.1")
    rules = (RouteRule(("b.test",), ()), RouteRule(("*",), (RELAY_IP,)))

    found = routed(dns_server, "b.test", *rules)

    assert names(found) == ["mx.example.test"]


def test_smarthost_without_address_is_skipped(dns_server: DnsServer) -> None:
    gone = Smarthost("gone.test", 25, "none", False)
    dns_server.servfail("failing.test")
    failing = Smarthost("failing.test", 25, "none", False)

    found = routed(dns_server, "b.test", RouteRule(("b.test",), (gone, failing, RELAY_IP)))

    assert [host.name for host in found.hosts] == ["127.0.0.3"]


def test_no_smarthost_with_an_address_is_temporary(dns_server: DnsServer) -> None:
    gone = Smarthost("gone.test", 25, "none", False)

    with pytest.raises(ResolveError) as info:
        routed(dns_server, "b.test", RouteRule(("b.test",), (gone, RELAY_NAME)))

    assert verdict(info.value.reply) is Verdict.TEMPORARY
    assert str(info.value.reply) == (
        "451 4.4.4 no address for any smarthost of b.test (gone.test, smart.test)"
    )


def test_smarthost_addresses_are_cached(dns_server: DnsServer) -> None:
    dns_server.a("smart.test", "192.0.2.7")
    dns_server.aaaa("smart.test", "2001:db8::7")
    routes = router(dns_server, RouteRule(("*",), (RELAY_NAME,)))

    async def twice() -> list[Route]:
        return [await routes.route("one.test"), await routes.route("two.test")]

    first, second = asyncio.run(twice())

    assert first.hosts[0].addresses == second.hosts[0].addresses == ("192.0.2.7", "2001:db8::7")
    assert dns_server.queries("smart.test", "A") == 1


# --- one address query failing: the other's addresses are used -----------------------------------

V4, V6 = "192.0.2.1", "2001:db8::1"
SMART = Smarthost("smart.test", 25, "none", False)
# Where each kind of host gets its addresses: an MX host, the domain itself (implicit MX, no MX
# records), a smarthost.
HOST_OF = {"mx": "mx.test", "implicit": DOMAIN, "smarthost": SMART.host}
# The test server's faults and the reason the dns_query_failed line gives for each.
FAULTS = {"refused": "REFUSED", "servfail": "SERVFAIL", "drop": "timeout", "nxdomain": "NXDOMAIN"}
ONE_FAILS = [
    *((None, fault, (V4,)) for fault in FAULTS),  # A ok, AAAA failing each way
    *((fault, None, (V6,)) for fault in FAULTS),  # AAAA ok, A failing each way
]
BOTH_FAIL = [
    ("refused", "refused"),
    ("servfail", "drop"),
    ("drop", "nxdomain"),
    ("nxdomain", "servfail"),
]


def host_with_faults(
    server: DnsServer, path: str, a_fault: str | None, aaaa_fault: str | None
) -> None:
    """The host of path with an IPv4 and an IPv6 address, and faults on its A and AAAA queries."""
    name = HOST_OF[path]
    if path == "mx":
        server.mx(DOMAIN, (10, name))
    server.a(name, V4)
    server.aaaa(name, V6)
    for rdtype, fault in (("A", a_fault), ("AAAA", aaaa_fault)):
        if fault is not None:
            server.fault(name, fault, rdtype)


def resolve_via(server: DnsServer, path: str) -> Route:
    """DOMAIN's route with a short DNS timeout: through SMART for path "smarthost", else by MX."""
    if path == "smarthost":
        return asyncio.run(router(server, RouteRule(("*",), (SMART,)), timeout=0.5).route(DOMAIN))
    return route(server, timeout=0.5)


def failed_queries(logged: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The logged dns_query_failed lines: query type → reason."""
    return {e["rdtype"]: e["reason"] for e in logged if e["event"] == "dns_query_failed"}


@pytest.mark.parametrize("path", HOST_OF)
@pytest.mark.parametrize(("a_fault", "aaaa_fault", "used"), ONE_FAILS)
def test_host_is_reached_by_the_addresses_that_came_back(
    dns_server: DnsServer,
    path: str,
    a_fault: str | None,
    aaaa_fault: str | None,
    used: tuple[str, ...],
) -> None:
    host_with_faults(dns_server, path, a_fault, aaaa_fault)

    with capture_logs() as logged:
        found = resolve_via(dns_server, path)

    assert [(host.name, host.addresses) for host in found.hosts] == [(HOST_OF[path], used)]
    [line] = [e for e in logged if e["event"] == "dns_query_failed"]
    rdtype, fault = ("A", a_fault) if a_fault else ("AAAA", aaaa_fault)
    assert fault is not None
    assert line["log_level"] == "warning" and line["host"] == HOST_OF[path]
    assert (line["rdtype"], line["reason"], line["addresses"]) == (rdtype, FAULTS[fault], 1)
    assert line["error"]


@pytest.mark.parametrize(("a_fault", "aaaa_fault"), BOTH_FAIL)
@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("mx", f"451 4.4.4 no address for any MX host of {DOMAIN}"),
        ("implicit", f"451 4.4.3 DNS lookup for {DOMAIN} failed: "),
        ("smarthost", f"451 4.4.4 no address for any smarthost of {DOMAIN} (smart.test)"),
    ],
)
def test_host_whose_queries_all_fail_is_a_temporary_failure(
    dns_server: DnsServer, path: str, expected: str, a_fault: str, aaaa_fault: str
) -> None:
    host_with_faults(dns_server, path, a_fault, aaaa_fault)

    with capture_logs() as logged, pytest.raises(ResolveError) as info:
        resolve_via(dns_server, path)

    assert str(info.value.reply).startswith(expected)
    assert verdict(info.value.reply) is Verdict.TEMPORARY
    # An NXDOMAIN nothing contradicts is an answer, not a failed query.
    faults = {"A": a_fault, "AAAA": aaaa_fault}
    assert failed_queries(logged) == {t: FAULTS[f] for t, f in faults.items() if f != "nxdomain"}


@pytest.mark.parametrize(
    ("a_fault", "aaaa_fault", "expected"),
    [
        ("nxdomain", "nxdomain", f"{DOMAIN} has no MX or address records"),
        ("refused", "nxdomain", f"DNS lookup for {DOMAIN} failed: "),
    ],
)
def test_implicit_mx_is_permanent_only_when_both_queries_answer_none(
    dns_server: DnsServer, a_fault: str, aaaa_fault: str, expected: str
) -> None:
    dns_server.record(DOMAIN, "TXT", '"exists"')  # the MX query: NOERROR, no records
    host_with_faults(dns_server, "implicit", a_fault, aaaa_fault)

    reply = failure(dns_server)

    assert reply.text.startswith(expected)
    permanent = a_fault == aaaa_fault == "nxdomain"
    assert verdict(reply) is (Verdict.PERMANENT if permanent else Verdict.TEMPORARY)


def test_partial_answer_is_reused_without_asking_again(dns_server: DnsServer) -> None:
    host_with_faults(dns_server, "mx", None, "drop")

    async def twice() -> tuple[Route, int, Route]:
        cached = resolver(dns_server, timeout=0.5)
        first = await cached.route(DOMAIN)
        asked = dns_server.queries("mx.test", "AAAA")
        return first, asked, await cached.route(DOMAIN)

    first, asked, second = asyncio.run(twice())

    assert first == second and first.hosts[0].addresses == (V4,)
    assert dns_server.queries("mx.test", "AAAA") == asked  # one timeout, not one per message


# --- a name's addresses: what came back, how long it may be reused, which queries failed ---------

AddressSpec = int | str  # a TTL: the address with it; "none": no record of the type; else a fault


def addresses_of(server: DnsServer, a: AddressSpec, aaaa: AddressSpec) -> Addresses:
    """mx.test's addresses as the resolver finds them, its A and AAAA set up as a and aaaa say."""
    name = HOST_OF["mx"]
    server.record(name, "TXT", '"exists"')
    for rdtype, spec, address in (("A", a, V4), ("AAAA", aaaa, V6)):
        if isinstance(spec, int):
            server.record(name, rdtype, address, ttl=spec)
        elif spec != "none":
            server.fault(name, spec, rdtype)
    return asyncio.run(resolver(server, timeout=0.5).addresses(dns.name.from_text(name)))


@pytest.mark.parametrize(
    ("a", "aaaa", "found", "ttl", "failed"),
    [
        # A, AAAA → addresses, seconds they may be reused, failed queries (type, reason)
        (600, 600, (V4, V6), 600.0, ()),
        (30, 600, (V4, V6), 30.0, ()),
        (600, "servfail", (V4,), PARTIAL_ANSWER_TTL, (("AAAA", "SERVFAIL"),)),
        (30, "refused", (V4,), 30.0, (("AAAA", "REFUSED"),)),
        (600, "nxdomain", (V4,), PARTIAL_ANSWER_TTL, (("AAAA", "NXDOMAIN"),)),
        ("drop", 600, (V6,), PARTIAL_ANSWER_TTL, (("A", "timeout"),)),
        ("none", "none", (), NEGATIVE_TTL, ()),
        ("nxdomain", "nxdomain", (), PERMANENT_ERROR_TTL, ()),
        ("nxdomain", "none", (), NEGATIVE_TTL, ()),
        ("drop", "none", (), 0.0, (("A", "timeout"),)),
        ("nxdomain", "servfail", (), 0.0, (("AAAA", "SERVFAIL"),)),
    ],
)
def test_addresses_and_how_long_to_reuse_them(
    dns_server: DnsServer,
    a: AddressSpec,
    aaaa: AddressSpec,
    found: tuple[str, ...],
    ttl: float,
    failed: tuple[tuple[str, str], ...],
) -> None:
    with capture_logs() as logged:
        result = addresses_of(dns_server, a, aaaa)

    assert (result.found, result.ttl) == (found, ttl)
    assert [rdtype for rdtype, _ in result.failed] == [rdtype for rdtype, _ in failed]
    assert failed_queries(logged) == dict(failed)


def test_failed_query_names_what_every_name_server_answered(dns_server: DnsServer) -> None:
    second = DnsServer()
    second.start()
    try:
        dns_server.refuse("mx.test")
        second.servfail("mx.test")
        servers = ((dns_server.host, dns_server.port), (second.host, second.port))
        cfg = DnsConfig(nameservers=servers, timeout=2.0)
        with capture_logs() as logged:
            asyncio.run(Resolver(cfg).addresses(dns.name.from_text("mx.test")))
    finally:
        second.close()

    assert failed_queries(logged) == {"A": "REFUSED, SERVFAIL", "AAAA": "REFUSED, SERVFAIL"}
