"""TLS policy stage: configured modes, the MTA-STS record and policy grammar, and discovery,
fetch and cache against a real DNS server and a real HTTPS policy host on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.config.delivery import DeliveryConfig, DnsConfig, MtaStsConfig, OutboundTlsConfig
from relay.delivery.mtasts import (
    MAX_POLICY_SIZE,
    PolicyError,
    StsPolicy,
    mx_matches,
    parse_policy,
    record_id,
)
from relay.delivery.tlspolicy import Policy, TlsPolicy, configured_mode
from tests.support.dns import DnsServer
from tests.support.sts import Authority, PolicyServer, policy, policy_host, publish

DOMAIN = "example.test"
STS_IP = "127.0.0.20"
ENFORCE = Policy("verify", "mta-sts", ("mx1.example.test", "*.mx.example.test"))


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return Authority.create(tmp_path)


@pytest.fixture
def sts(dns_server: DnsServer, authority: Authority) -> Iterator[PolicyServer]:
    with policy_host(dns_server, authority, DOMAIN, STS_IP) as server:
        server.serve(policy("enforce", "mx1.example.test", "*.mx.example.test"))
        yield server


def config(
    dns_server: DnsServer,
    authority: Authority,
    sts: PolicyServer | None = None,
    *,
    enabled: bool = True,
    fetch_timeout: float = 5.0,
    **tls: Any,
) -> DeliveryConfig:
    return DeliveryConfig(
        dns=DnsConfig(nameservers=((dns_server.host, dns_server.port),), timeout=2.0),
        tls=OutboundTlsConfig(ca_file=authority.file, **tls),
        mta_sts=MtaStsConfig(
            enabled=enabled, port=sts.port if sts else 443, fetch_timeout=fetch_timeout
        ),
    )


def lookups(tls_policy: TlsPolicy, *domains: str) -> list[Policy]:
    """The policies for domains, looked up one after the other in one event loop."""

    async def run() -> list[Policy]:
        return [await tls_policy.for_domain(domain) for domain in domains]

    return asyncio.run(run())


def lookup(tls_policy: TlsPolicy, domain: str = DOMAIN) -> Policy:
    return lookups(tls_policy, domain)[0]


# --- delivery.tls.policies -------------------------------------------------------------------

POLICIES = (
    ("example.com", "verify"),
    (".example.com", "required"),
    (".deep.example.com", "opportunistic"),
    (".org", "required"),
    ("exact.net", "verify"),
)


@pytest.mark.parametrize(
    ("domain", "mode"),
    [
        ("example.com", "verify"),  # exact beats the suffix that also matches it
        ("mx.example.com", "required"),
        ("a.b.example.com", "required"),
        ("deep.example.com", "opportunistic"),  # a dotted key matches the domain itself too
        ("x.deep.example.com", "opportunistic"),  # the longest suffix wins
        ("example.org", "required"),
        ("exact.net", "verify"),
        ("sub.exact.net", None),  # a key without a dot matches only itself
        ("notexample.com", None),  # a suffix matches at a label boundary
        ("example.net", None),
    ],
)
def test_configured_mode(domain: str, mode: str | None) -> None:
    assert configured_mode(POLICIES, domain) == mode


def test_configured_policy_wins_over_mta_sts_and_default(
    dns_server: DnsServer, authority: Authority, sts: PolicyServer
) -> None:
    cfg = config(
        dns_server, authority, sts, default="required", policies=((".example.test", "verify"),)
    )

    found = lookups(TlsPolicy(cfg), "EXAMPLE.test.", "other.test")

    assert found == [Policy("verify", "config"), Policy("required", "default")]
    assert dns_server.queries(f"_mta-sts.{DOMAIN}", "TXT") == 0
    assert sts.count == 0


def test_mta_sts_disabled_asks_nothing(
    dns_server: DnsServer, authority: Authority, sts: PolicyServer
) -> None:
    found = lookup(TlsPolicy(config(dns_server, authority, sts, enabled=False)))

    assert found == Policy("opportunistic", "default")
    assert dns_server.queries(f"_mta-sts.{DOMAIN}", "TXT") == 0


# --- MX patterns, TXT record and policy grammar (RFC 8461 §3.1, §3.2, §4.1) ------------------


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("mail.example.com", "mail.example.com", True),
        ("mail.example.com", "MAIL.Example.COM.", True),
        ("mail.example.com", "mail2.example.com", False),
        ("*.example.com", "mx1.example.com", True),
        ("*.example.com", "example.com", False),  # the wildcard stands for exactly one label
        ("*.example.com", "a.b.example.com", False),
        ("*.example.com", "mx1.example.net", False),
        ("*.example.com", ".example.com", False),
    ],
)
def test_mx_matches(pattern: str, host: str, matches: bool) -> None:
    assert mx_matches(pattern, host) is matches


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),  # the RFC 8461 §3.1 example
        (["v=STSv1; id=20160831085700Z"], "20160831085700Z"),
        (["v = STSv1 ;id = abc ; ext.name=value;"], "abc"),
        (["v=spf1 -all", "v=STSv1; id=1"], "1"),  # other records are discarded
        (["v=STSv1; id=1", "v=STSv1; id=2"], None),  # not exactly one
        ([], None),
        (["v=STSv2; id=1"], None),
        (["v=STSv1"], None),  # no id
        (["v=STSv1;"], None),
        (["v=STSv1; id="], None),
        (["v=STSv1; id=has-dash"], None),
        (["v=STSv1; id=" + "1" * 33], None),  # at most 32 characters
        (["v=STSv1; id=1;; x=y"], None),
        (["v=STSv1; id=1; bad field"], None),
        (["v=STSv1; id=1; x=a=b"], None),
        (["id=1; v=STSv1"], None),  # the version comes first
    ],
)
def test_record_id(records: list[str], expected: str | None) -> None:
    assert record_id(records) == expected


RFC_EXAMPLE = (
    "version: STSv1\r\n"
    "mode: enforce\r\n"
    "mx: mail.example.com\r\n"
    "mx: *.example.net\r\n"
    "mx: backupmx.example.com\r\n"
    "max_age: 604800\r\n"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            RFC_EXAMPLE,
            StsPolicy(
                "enforce", 604800, ("mail.example.com", "*.example.net", "backupmx.example.com")
            ),
        ),
        (
            RFC_EXAMPLE.replace("\r\n", "\n").rstrip("\n"),
            StsPolicy(
                "enforce", 604800, ("mail.example.com", "*.example.net", "backupmx.example.com")
            ),
        ),
        (
            "version: STSv1\nmode: testing\nmx: MX.Example.COM\nmax_age: 86400\n",
            StsPolicy("testing", 86400, ("mx.example.com",)),
        ),
        ("version: STSv1\nmode: none\nmax_age: 0\n", StsPolicy("none", 0, ())),
        (
            "version:STSv1\nmode:\tenforce  \nmx:a.test\nmax_age: 1\n",
            StsPolicy("enforce", 1, ("a.test",)),
        ),
        (
            "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 9999999999\n",
            StsPolicy("enforce", 31557600, ("a.test",)),
        ),
        (
            "version: STSv1\nmode: enforce\nmode: none\nmx: a.test\nmax_age: 1\nmax_age: 2\n",
            StsPolicy("enforce", 1, ("a.test",)),
        ),
        (
            "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1\nfuture_key: x=1; y: z\n",
            StsPolicy("enforce", 1, ("a.test",)),
        ),
        (
            "\nversion: STSv1\n\nmode: enforce\nmx: a.test\nmax_age: 1\n\n",
            StsPolicy("enforce", 1, ("a.test",)),
        ),
    ],
)
def test_parse_policy(text: str, expected: StsPolicy) -> None:
    assert parse_policy(text) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "version"),
        ("mode: enforce\nmx: a.test\nmax_age: 1\n", "version"),
        ("version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n", "version"),
        ("version: stsv1\nmode: enforce\nmx: a.test\nmax_age: 1\n", "version"),
        ("version: STSv1\nmode: Enforce\nmx: a.test\nmax_age: 1\n", "mode"),
        ("version: STSv1\nmode: report\nmx: a.test\nmax_age: 1\n", "mode"),
        ("version: STSv1\nmx: a.test\nmax_age: 1\n", "mode"),
        ("version: STSv1\nmode: enforce\nmx: a.test\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1d\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 12345678901\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmax_age: 1\n", "no mx"),
        ("version: STSv1\nmode: testing\nmax_age: 1\n", "no mx"),
        ("version: STSv1\nmode: enforce\nmx: *.*.a.test\nmax_age: 1\n", "mx"),
        ("version: STSv1\nmode: enforce\nmx: a.test.\nmax_age: 1\n", "mx"),
        ("version: STSv1\nmode: enforce\nmx: mail.*.test\nmax_age: 1\n", "mx"),
        ("version: STSv1\nmode: enforce\nmx: -a.test\nmax_age: 1\n", "mx"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1\nno colon here\n", "line"),
        ("version : STSv1\nmode: enforce\nmx: a.test\nmax_age: 1\n", "line"),
        ("<html>version: STSv1</html>\n", "line"),
    ],
)
def test_parse_policy_refuses(text: str, problem: str) -> None:
    with pytest.raises(PolicyError, match=problem):
        parse_policy(text)


# --- discovery and fetch ---------------------------------------------------------------------


def test_enforce_policy(dns_server: DnsServer, authority: Authority, sts: PolicyServer) -> None:
    found = lookup(TlsPolicy(config(dns_server, authority, sts)))

    assert found == ENFORCE
    assert found.allows("mx1.example.test")
    assert found.allows("b.mx.example.test")
    assert not found.allows("mx2.example.test")
    assert sts.requests == [("/.well-known/mta-sts.txt", f"mta-sts.{DOMAIN}:{sts.port}")]


@pytest.mark.parametrize("default", ["opportunistic", "required"])
def test_testing_policy_keeps_the_default_mode(
    dns_server: DnsServer, authority: Authority, sts: PolicyServer, default: str
) -> None:
    sts.serve(policy("testing", "mx1.example.test"))

    found = lookup(TlsPolicy(config(dns_server, authority, sts, default=default)))

    assert found == Policy(default, "mta-sts", ("mx1.example.test",), testing=True)


def test_none_policy_is_no_policy(
    dns_server: DnsServer, authority: Authority, sts: PolicyServer
) -> None:
    sts.serve(policy("none"))

    assert lookup(TlsPolicy(config(dns_server, authority, sts))) == Policy(
        "opportunistic", "default"
    )
    assert sts.count == 1


@pytest.mark.parametrize("record", [None, "v=spf1 -all", "v=STSv1; id=bad-id"])
def test_no_valid_record_means_no_fetch(
    dns_server: DnsServer, authority: Authority, sts: PolicyServer, record: str | None
) -> None:
    dns_server.record(f"_mta-sts.{DOMAIN}", "TXT", *([f'"{record}"'] if record else []))

    assert lookup(TlsPolicy(config(dns_server, authority, sts))) == Policy(
        "opportunistic", "default"
    )
    assert sts.count == 0


def test_domain_without_any_record(dns_server: DnsServer, authority: Authority) -> None:
    found = lookups(TlsPolicy(config(dns_server, authority)), "nowhere.test", "[192.0.2.1]")

    assert found == [Policy("opportunistic", "default")] * 2
    assert dns_server.queries("_mta-sts.nowhere.test", "TXT") == 1


def test_policy_is_cached_while_the_id_stands(
    dns_server: DnsServer, authority: Authority, sts: PolicyServer
) -> None:
    found = lookups(TlsPolicy(config(dns_server, authority, sts)), DOMAIN, DOMAIN, DOMAIN)

    assert found == [ENFORCE] * 3
    assert sts.count == 1
    assert dns_server.queries(f"_mta-sts.{DOMAIN}", "TXT") == 3  # TTL 0: asked every time


def test_record_ttl_spares_lookups(
    dns_server: DnsServer, authority: Authority, sts: PolicyServer
) -> None:
    publish(dns_server, DOMAIN, "1", ttl=60)

    lookups(TlsPolicy(config(dns_server, authority, sts)), DOMAIN, DOMAIN)

    assert dns_server.queries(f"_mta-sts.{DOMAIN}", "TXT") == 1
    assert sts.count == 1


def test_new_id_fetches_the_new_policy(
    dns_server: DnsServer, authority: Authority, sts: PolicyServer
) -> None:
    tls_policy = TlsPolicy(config(dns_server, authority, sts))
    assert lookup(tls_policy) == ENFORCE

    sts.serve(policy("testing", "mx9.example.test"))
    assert lookup(tls_policy) == ENFORCE  # same id: the cache stands
    publish(dns_server, DOMAIN, "2")

    assert lookup(tls_policy) == Policy("opportunistic", "mta-sts", ("mx9.example.test",), True)
    assert sts.count == 2


def test_vanished_record_keeps_the_cached_policy(
    dns_server: DnsServer, authority: Authority, sts: PolicyServer
) -> None:
    """RFC 8461 §8.3: removing the TXT record does not withdraw a policy before its max_age."""
    tls_policy = TlsPolicy(config(dns_server, authority, sts))
    lookup(tls_policy)
    dns_server.clear(f"_mta-sts.{DOMAIN}")

    assert lookup(tls_policy) == ENFORCE
    assert sts.count == 1


def test_expired_policy_is_fetched_again(
    dns_server: DnsServer, authority: Authority, sts: PolicyServer
) -> None:
    sts.serve(policy("enforce", "mx1.example.test", max_age=0))

    found = lookups(TlsPolicy(config(dns_server, authority, sts)), DOMAIN, DOMAIN)

    assert [p.mode for p in found] == ["verify", "verify"]
    assert sts.count == 2


def test_failed_fetch_uses_the_cached_policy(
    dns_server: DnsServer, authority: Authority, sts: PolicyServer
) -> None:
    tls_policy = TlsPolicy(config(dns_server, authority, sts))
    lookup(tls_policy)
    publish(dns_server, DOMAIN, "2")
    sts.serve("gone", status=500)

    assert lookup(tls_policy) == ENFORCE
    assert sts.count == 2


def test_failed_record_lookup_uses_the_cached_policy(
    dns_server: DnsServer, authority: Authority, sts: PolicyServer
) -> None:
    tls_policy = TlsPolicy(config(dns_server, authority, sts))
    lookup(tls_policy)
    dns_server.servfail(f"_mta-sts.{DOMAIN}")

    assert lookup(tls_policy) == ENFORCE


def test_failed_record_lookup_without_cache_is_no_policy_for_a_while(
    dns_server: DnsServer, authority: Authority, sts: PolicyServer
) -> None:
    dns_server.servfail(f"_mta-sts.{DOMAIN}")

    found = lookups(TlsPolicy(config(dns_server, authority, sts)), DOMAIN, DOMAIN)

    assert found == [Policy("opportunistic", "default")] * 2
    assert dns_server.queries(f"_mta-sts.{DOMAIN}", "TXT") == 1
    assert sts.count == 0


def test_failed_fetch_is_not_retried_at_once(
    dns_server: DnsServer, authority: Authority, sts: PolicyServer
) -> None:
    sts.serve("", status=404)

    found = lookups(TlsPolicy(config(dns_server, authority, sts)), DOMAIN, DOMAIN)

    assert found == [Policy("opportunistic", "default")] * 2
    assert sts.count == 1


def test_concurrent_lookups_fetch_once(
    dns_server: DnsServer, authority: Authority, sts: PolicyServer
) -> None:
    tls_policy = TlsPolicy(config(dns_server, authority, sts))

    async def run() -> list[Policy]:
        return await asyncio.gather(*(tls_policy.for_domain(DOMAIN) for _ in range(5)))

    assert asyncio.run(run()) == [ENFORCE] * 5
    assert sts.count == 1


def test_chunked_answer(dns_server: DnsServer, authority: Authority, sts: PolicyServer) -> None:
    sts.serve(policy("enforce", "mx1.example.test", "*.mx.example.test"), chunked=True)

    assert lookup(TlsPolicy(config(dns_server, authority, sts))) == ENFORCE


FETCH_FAILURES = {
    "not found": {"body": "", "status": 404},
    "redirect": {"body": "", "status": 301},
    "html": {"body": policy("enforce", "a.test"), "content_type": "text/html"},
    "invalid policy": {"body": "version: STSv1\nmode: enforce\n"},
    "too big": {"body": policy("enforce", "a.test") + "x: " + "y" * MAX_POLICY_SIZE + "\n"},
    "too big, chunked": {"body": "y" * (MAX_POLICY_SIZE + 1), "chunked": True},
    "not UTF-8": {"body": b"version: STSv1\nmode: enforce\nmx: \xff.test\nmax_age: 1\n"},
}


@pytest.mark.parametrize("answer", FETCH_FAILURES.values(), ids=FETCH_FAILURES.keys())
def test_fetch_failure_without_cache_is_no_policy(
    dns_server: DnsServer, authority: Authority, sts: PolicyServer, answer: dict[str, Any]
) -> None:
    sts.serve(**answer)

    assert lookup(TlsPolicy(config(dns_server, authority, sts))) == Policy(
        "opportunistic", "default"
    )
    assert sts.count == 1


def test_untrusted_policy_host_is_no_policy(
    dns_server: DnsServer, authority: Authority, sts: PolicyServer, tmp_path: Path
) -> None:
    """The policy host's certificate must verify (RFC 8461 §3.3): here ca_file is another CA."""
    (tmp_path / "other").mkdir()
    stranger = Authority.create(tmp_path / "other")

    found = lookup(TlsPolicy(config(dns_server, stranger, sts)))

    assert found == Policy("opportunistic", "default")
    assert sts.count == 0  # the handshake failed before any request


def test_policy_host_with_a_certificate_for_another_name(
    dns_server: DnsServer, authority: Authority
) -> None:
    with policy_host(dns_server, authority, "other.test", STS_IP) as server:
        # The certificate is for mta-sts.other.test; example.test's name points at it too.
        dns_server.a(f"mta-sts.{DOMAIN}", STS_IP)
        publish(dns_server, DOMAIN, "1")

        found = lookup(TlsPolicy(config(dns_server, authority, server)))

        assert found == Policy("opportunistic", "default")
        assert server.count == 0


def test_silent_policy_host_times_out(
    dns_server: DnsServer, authority: Authority, sts: PolicyServer
) -> None:
    sts.hang()

    found = lookup(TlsPolicy(config(dns_server, authority, sts, fetch_timeout=0.5)))

    assert found == Policy("opportunistic", "default")
    assert sts.count == 1


def test_policy_host_without_address_is_no_policy(
    dns_server: DnsServer, authority: Authority, sts: PolicyServer
) -> None:
    dns_server.clear(f"mta-sts.{DOMAIN}")

    assert lookup(TlsPolicy(config(dns_server, authority, sts))) == Policy(
        "opportunistic", "default"
    )
    assert sts.count == 0


@pytest.mark.parametrize("fault", ["refuse", "servfail", "drop"])
def test_policy_host_whose_a_query_fails_is_reached_over_ipv6(
    dns_server: DnsServer, authority: Authority, fault: str
) -> None:
    """RFC 4074: a failing A query does not hide the AAAA answer (nor the reverse)."""
    name = f"mta-sts.{DOMAIN}"
    server = PolicyServer("::1", authority.server_tls(name))
    try:
        server.serve(policy("enforce", "mx1.example.test"))
        publish(dns_server, DOMAIN, "1")
        dns_server.a(name, STS_IP)  # an address that would refuse the connection
        dns_server.aaaa(name, "::1")
        getattr(dns_server, fault)(name, "A")
        found = lookup(TlsPolicy(config(dns_server, authority, server)))
    finally:
        server.close()
    assert found.allows("mx1.example.test") and not found.allows("mx2.example.test")
    assert server.count == 1
