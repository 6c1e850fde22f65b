"""Delivery status notifications end to end: the real daemon, a sink that is both the
recipients' MX and the sender's, and what the sender's MX receives, read with the stdlib `email`
parser: one DSN for what failed together, the expiry and the delay warning, and none where the
sender asked for none, the mail came from <> or bounces are off."""

from __future__ import annotations

import email
import email.policy
import json
import time
from datetime import datetime
from email.message import EmailMessage
from typing import Any

import pytest

from tests.support.daemon import Relay, RelayFactory, merge
from tests.support.dns import DnsServer
from tests.support.load import journal
from tests.support.mx import ACCEPT, MxSink, Received

SENDER = "app@sender.test"
ON = {"bounces": {"enabled": True}}  # tests/support/daemon.py turns them off by default
BODY = b"Subject: quarterly report\r\nFrom: app@sender.test\r\n\r\nthe numbers\r\n"


@pytest.fixture
def both(sink: MxSink, dns_server: DnsServer) -> MxSink:
    """The sink as a.test's MX and sender.test's, where the DSNs go."""
    dns_server.mx("sender.test", (10, "mx.a.test"))
    return sink


def dsns(sink: MxSink) -> list[Received]:
    return [got for got in sink.received if got.mail_from == ""]


def parse(got: Received) -> EmailMessage:
    parsed = email.message_from_bytes(got.data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def report(got: Received) -> tuple[EmailMessage, dict[str, str], list[dict[str, str]]]:
    """The DSN, its per-message fields and its per-recipient fields."""
    dsn = parse(got)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    assert dsn["From"] == "Mail Delivery System <MAILER-DAEMON@relay.test>"
    assert dsn["Auto-Submitted"] == "auto-replied"
    status = list(dsn.iter_parts())[1]
    assert status.get_content_type() == "message/delivery-status"
    first, *rcpts = [dict(block.items()) for block in status.get_payload()]
    return dsn, first, rcpts


def quiet(daemon: Relay, sink: MxSink, seconds: float = 1.5) -> None:
    """No DSN arrives for a while, and none was queued."""
    time.sleep(seconds)
    assert dsns(sink) == [] and daemon.events("dsn_queued") == []


def test_one_of_three_refused_sends_one_dsn_naming_it(relay: RelayFactory, both: MxSink) -> None:
    both.script_rcpt("no@a.test", "550 5.1.1 no such user")
    daemon = relay(ON)
    with daemon.smtp() as client:
        assert client.mail(SENDER, ["RET=HDRS", "ENVID=abc"])[0] == 250
        assert client.rcpt("ok1@a.test")[0] == 250
        assert client.rcpt("no@a.test", ["NOTIFY=FAILURE", "ORCPT=rfc822;No@a.test"])[0] == 250
        assert client.rcpt("ok2@a.test")[0] == 250
        code, text = client.data(BODY)
    assert code == 250, text
    queue_id = text.decode().rsplit(" ", 1)[1]
    both.wait_for(2)
    [original] = [got for got in both.received if got.mail_from == SENDER]
    assert sorted(original.rcpt_tos) == ["ok1@a.test", "ok2@a.test"]
    [got] = dsns(both)
    assert got.rcpt_tos == [SENDER]
    dsn, first, [rcpt] = report(got)
    assert dsn["To"] == SENDER and dsn["Subject"] == "Undelivered Mail Returned to Sender"
    assert first["Reporting-MTA"] == "dns; relay.test" and first["Original-Envelope-Id"] == "abc"
    assert rcpt["Final-Recipient"] == "rfc822;no@a.test"
    assert rcpt["Original-Recipient"] == "rfc822;No@a.test"
    assert (rcpt["Action"], rcpt["Status"]) == ("failed", "5.1.1")
    assert rcpt["Remote-MTA"] == "dns; mx.a.test"
    assert rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    human, _, headers = dsn.iter_parts()
    assert "<no@a.test>: host mx.a.test said: 550 5.1.1 no such user" in human.get_content()
    assert headers.get_content_type() == "text/rfc822-headers"
    assert b"Subject: quarterly report\r\n" in headers.get_payload().encode()
    [queued] = daemon.wait_event("dsn_queued", dsn_of=queue_id)
    # The DSN is a message of its own: received, then delivered, with its own events.
    daemon.wait_event("delivered", id=queued["id"], rcpt=SENDER)
    journaled = [e for e in journal(daemon) if e["id"] == queued["id"]]
    assert [e["event"] for e in journaled] == ["received", "delivered"]
    assert journaled[0]["sender"] == "" and journaled[0]["rcpts"] == [SENDER]


def test_a_delay_warning_once_then_the_expiry(relay: RelayFactory, both: MxSink) -> None:
    both.script_rcpt("later@a.test", "451 4.2.0 greylisted")
    retry = {"schedule": ["0.5s"], "max_age": "4s", "jitter": 0}
    daemon = relay(
        {"delivery": {"retry": retry}, "bounces": {"enabled": True, "delay_warning": "1s"}}
    )
    queue_id = daemon.send(["later@a.test"], BODY, SENDER)
    daemon.wait_event("dead_lettered", timeout=15, id=queue_id, reason="expired")
    both.wait_for(2)
    delayed, failed = (report(got) for got in dsns(both))
    dsn, _, [rcpt] = delayed
    assert dsn["Subject"] == "Delayed Mail (still being retried)"
    assert (rcpt["Action"], rcpt["Status"]) == ("delayed", "4.2.0")
    assert "Will-Retry-Until" in rcpt
    dsn, _, [rcpt] = failed
    assert dsn["Subject"] == "Undelivered Mail Returned to Sender"
    assert (rcpt["Action"], rcpt["Status"]) == ("failed", "4.2.0")
    assert rcpt["Diagnostic-Code"] == "smtp; 451 4.2.0 greylisted"
    [warned] = daemon.wait_event("dsn_queued", dsn_of=queue_id, action="delayed")
    [queued] = [e for e in journal(daemon) if e["id"] == queue_id and e["event"] == "received"]
    age = stamp(warned) - stamp(queued)
    assert 1.0 <= age < 3.0, age
    assert len(daemon.events("dsn_queued", dsn_of=queue_id)) == 2  # once each


def stamp(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


@pytest.mark.parametrize(
    ("settings", "sender", "notify"),
    [
        ({}, SENDER, ["NOTIFY=NEVER"]),
        ({}, SENDER, ["NOTIFY=SUCCESS,DELAY"]),  # no FAILURE
        ({}, "", []),  # a bounce never bounces
        ({"bounces": {"enabled": False}}, SENDER, []),
    ],
)
def test_no_dsn(
    relay: RelayFactory, both: MxSink, settings: dict[str, Any], sender: str, notify: list[str]
) -> None:
    both.script_rcpt("no@a.test", "550 5.1.1 no such user")
    daemon = relay(merge(ON, settings))
    with daemon.smtp() as client:
        assert client.mail(sender)[0] == 250
        assert client.rcpt("no@a.test", notify)[0] == 250
        code, text = client.data(BODY)
    assert code == 250, text
    queue_id = text.decode().rsplit(" ", 1)[1]
    daemon.wait_event("dead_lettered", id=queue_id, reason="permanent")
    quiet(daemon, both)
    assert [entry["id"] for entry in daemon.cli_json("dlq", "list")] == [queue_id]


def test_a_double_bounce_goes_to_the_postmaster(relay: RelayFactory, both: MxSink) -> None:
    both.script_rcpt("no@a.test", "550 5.1.1 no such user")
    daemon = relay({"bounces": {"enabled": True, "postmaster": "postmaster@sender.test"}})
    queue_id = daemon.send(["no@a.test"], BODY, "")
    [got] = both.wait_for(1)
    assert (got.mail_from, got.rcpt_tos) == ("", ["postmaster@sender.test"])
    dsn, _, [rcpt] = report(got)
    assert dsn["To"] == "postmaster@sender.test"
    assert (rcpt["Final-Recipient"], rcpt["Status"]) == ("rfc822;no@a.test", "5.1.1")
    daemon.wait_event("dsn_queued", dsn_of=queue_id)


def test_a_failure_saved_but_not_reported_at_a_kill_is_reported_after(
    relay: RelayFactory, both: MxSink
) -> None:
    both.script_rcpt("no@a.test", "451 4.3.0 later")
    daemon = relay({**ON, "delivery": {"retry": {"schedule": ["1h"]}}})
    queue_id = daemon.send(["no@a.test"], BODY, SENDER)
    daemon.wait_event("retry_scheduled", id=queue_id)
    daemon.kill9()
    # What a kill -9 right after a permanent failure was saved leaves (docs/bounces.md "Crash
    # safety"): the failure in the state file, no DSN queued, nothing in dead/.
    path = daemon.spool / "queue" / f"{queue_id}.json"
    state = json.loads(path.read_text())
    reply = {"code": 550, "enhanced": "5.1.1", "text": "no such user"}
    state["recipients"][0].update(status="failed", reply=reply)
    path.write_text(json.dumps(state))
    both.script_rcpt("no@a.test", ACCEPT)  # were it attempted again, it would be delivered
    daemon.start()
    [got] = both.wait_for(1)
    assert (got.mail_from, got.rcpt_tos) == ("", [SENDER])
    _, _, [rcpt] = report(got)
    assert (rcpt["Final-Recipient"], rcpt["Status"]) == ("rfc822;no@a.test", "5.1.1")
    daemon.wait_event("dead_lettered", id=queue_id, reason="permanent")
    assert [entry["id"] for entry in daemon.cli_json("dlq", "list")] == [queue_id]
    assert daemon.cli_json("queue", "list") == []
