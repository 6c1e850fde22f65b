"""End to end through `relay serve`: an MX host whose AAAA (or A) query fails still gets its mail
on the first attempt over the address family that answered; a host with no address at all is
deferred with 451 4.4.4 until DNS gives it one."""

from __future__ import annotations

import pytest

from tests.support.daemon import RelayFactory
from tests.support.dns import DnsServer
from tests.support.mx import MxNet

MX_HOST = "mx.a.test"


def mx_host_with_both_families(dns_server: DnsServer) -> None:
    """a.test's one MX host with an IPv4 (127.0.0.2) and an IPv6 (::1) loopback address."""
    dns_server.mx("a.test", (10, MX_HOST))
    dns_server.a(MX_HOST, "127.0.0.2")
    dns_server.aaaa(MX_HOST, "::1")


@pytest.mark.parametrize(("fault", "reason"), [("refused", "REFUSED"), ("drop", "timeout")])
def test_mx_host_whose_aaaa_query_fails_gets_the_mail_over_ipv4_at_once(
    relay: RelayFactory, dns_server: DnsServer, mx: MxNet, fault: str, reason: str
) -> None:
    sink = mx.sink("127.0.0.2")
    mx_host_with_both_families(dns_server)
    dns_server.fault(MX_HOST, fault, "AAAA")  # RFC 4074 §4.3, §4.1: refused, or ignored
    daemon = relay()
    queue_id = daemon.send(["user@a.test"])
    assert sink.wait_for(1)[0].rcpt_tos == ["user@a.test"]
    [delivered] = daemon.wait_event("delivered", id=queue_id)
    assert (delivered["mx"], delivered["ip"], delivered["attempt"]) == (MX_HOST, "127.0.0.2", 1)
    assert daemon.events("deferred", id=queue_id) == []
    failed = daemon.wait_event("dns_query_failed", host=MX_HOST)[0]
    assert (failed["rdtype"], failed["reason"], failed["addresses"]) == ("AAAA", reason, 1)
    assert (failed["level"], failed["process"]) == ("warning", "scheduler")
    assert daemon.events("error") == []


def test_mx_host_whose_a_query_fails_gets_the_mail_over_ipv6_at_once(
    relay: RelayFactory, dns_server: DnsServer, mx: MxNet
) -> None:
    sink = mx.sink("::1")
    mx_host_with_both_families(dns_server)
    dns_server.servfail(MX_HOST, "A")
    daemon = relay()
    queue_id = daemon.send(["user@a.test"])
    assert sink.wait_for(1)[0].peer_ip == "::1"
    [delivered] = daemon.wait_event("delivered", id=queue_id)
    assert (delivered["ip"], delivered["attempt"]) == ("::1", 1)
    failed = daemon.wait_event("dns_query_failed", host=MX_HOST)[0]
    assert (failed["rdtype"], failed["reason"]) == ("A", "SERVFAIL")


@pytest.mark.parametrize("fault", ["refused", None])
def test_mx_host_without_any_address_is_deferred_until_it_has_one(
    relay: RelayFactory, dns_server: DnsServer, mx: MxNet, fault: str | None
) -> None:
    """Both queries refused, or both answered with no record: deferred as before."""
    sink = mx.sink("127.0.0.2")
    dns_server.mx("a.test", (10, MX_HOST))
    dns_server.record(MX_HOST, "TXT", '"no address here"')
    if fault is not None:
        dns_server.fault(MX_HOST, fault)
    daemon = relay()
    queue_id = daemon.send(["user@a.test"])
    [deferred] = daemon.wait_event("deferred", id=queue_id)
    assert deferred["reply"] == "451 4.4.4 no address for any MX host of a.test"
    assert sink.connections == 0
    dns_server.clear(MX_HOST)
    dns_server.a(MX_HOST, "127.0.0.2")
    sink.wait_for(1)
    [delivered] = daemon.wait_event("delivered", id=queue_id)
    assert delivered["attempt"] >= 2
