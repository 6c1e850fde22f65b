"""End to end through `relay serve`: smarthost routes with AUTH and failover, and outbound
connections reused across messages."""

from __future__ import annotations

from typing import Any

from tests.support.daemon import RelayFactory
from tests.support.mx import MxNet, MxSink

USERS = {"u": "p"}


def smarthost(ip: str, port: int, **options: Any) -> dict[str, Any]:
    return {"host": ip, "port": port, "tls": "none", "username": "u", "password": "p", **options}


def routes(mx: MxNet, *domains: str) -> dict[str, Any]:
    """Mail for domains goes through 127.0.0.3, then 127.0.0.4, with AUTH as u/p in clear."""
    via = [smarthost("127.0.0.3", mx.port), smarthost("127.0.0.4", mx.port)]
    return {"routes": [{"domains": list(domains), "via": via}]}


def smarthosts(mx: MxNet, first: dict[str, str] | None = None) -> tuple[MxSink, MxSink]:
    """The two smarthosts, accepting AUTH without TLS; first: the first one's users."""
    one = mx.sink("127.0.0.3", auth=first or USERS, auth_require_tls=False)
    two = mx.sink("127.0.0.4", auth=USERS, auth_require_tls=False)
    return one, two


def test_route_through_a_smarthost_with_auth(relay: RelayFactory, mx: MxNet) -> None:
    one, two = smarthosts(mx)
    daemon = relay(routes(mx, "b.test"))  # b.test has no DNS records at all
    queue_id = daemon.send(["user@b.test"])
    [message] = one.wait_for(1)
    assert (message.user, message.rcpt_tos) == ("u", ["user@b.test"])
    [delivered] = daemon.wait_event("delivered", id=queue_id)
    assert (delivered["mx"], delivered["ip"]) == ("127.0.0.3", "127.0.0.3")
    assert two.connections == 0


def test_first_smarthost_down_the_second_gets_it(relay: RelayFactory, mx: MxNet) -> None:
    one, two = smarthosts(mx)
    one.stop()
    daemon = relay(routes(mx, "b.test"))
    queue_id = daemon.send(["user@b.test"])
    assert two.wait_for(1)[0].user == "u"
    [delivered] = daemon.wait_event("delivered", id=queue_id)
    assert delivered["mx"] == "127.0.0.4"
    assert len(daemon.events("attempt", id=queue_id)) == 1  # failover within one attempt


def test_wrong_password_at_the_first_smarthost_the_second_gets_it(
    relay: RelayFactory, mx: MxNet
) -> None:
    one, two = smarthosts(mx, first={"u": "not p"})
    daemon = relay(routes(mx, "b.test"))
    queue_id = daemon.send(["user@b.test"])
    assert two.wait_for(1)[0].user == "u"
    daemon.wait_event("delivered", id=queue_id)
    assert one.received == [] and "AUTH" in one.commands and "MAIL" not in one.commands


def test_auth_refused_everywhere_is_deferred_not_bounced(relay: RelayFactory, mx: MxNet) -> None:
    one, two = (
        mx.sink(ip, auth={"u": "not p"}, auth_require_tls=False)
        for ip in ("127.0.0.3", "127.0.0.4")
    )
    daemon = relay(routes(mx, "b.test"))
    queue_id = daemon.send(["user@b.test"])
    [deferred] = daemon.wait_event("deferred", id=queue_id)
    assert deferred["enhanced"] == "4.7.0" and "authentication" in deferred["reply"]
    assert daemon.cli_json("dlq", "list") == []
    assert one.received == two.received == []


def test_catch_all_route_takes_every_domain(relay: RelayFactory, mx: MxNet) -> None:
    one, _ = smarthosts(mx)
    daemon = relay(routes(mx, "*"))
    queue_id = daemon.send(["someone@c.test", "else@d.test"])
    daemon.wait_event("delivered", count=2, id=queue_id)
    assert sorted(one.recipients()) == ["else@d.test", "someone@c.test"]


def test_messages_to_one_domain_share_a_connection(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay()
    for n in range(4):
        queue_id = daemon.send([f"user{n}@a.test"])
        daemon.wait_event("delivered", id=queue_id)
    assert len(sink.wait_for(4)) == 4
    assert sink.connections < 4
    assert "RSET" in sink.commands
