"""RFC 3461 (DSN) parameters against the real daemon: EHLO lists DSN; MAIL takes RET and ENVID,
RCPT takes NOTIFY and ORCPT, kept decoded in the spool, shown by `relay queue show` and carried
by the `received` event; malformed ones get 501 naming the parameter, unknown ones 555; and the
next hop gets them when it offers DSN (across a kill -9), none when it does not."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.api import add_token
from tests.support.daemon import Relay, RelayFactory, api_on, eventually
from tests.support.dns import DnsServer
from tests.support.mx import MxNet, MxSink
from tests.support.smtp import RawClient

MAIL = b"MAIL FROM:<a@x.test> RET=HDRS ENVID=abc+2Bd\r\n"
RCPT = b"RCPT TO:<b@a.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;b@a.test\r\n"
MAIL_OK = b"250 2.1.0 Ok"
RCPT_OK = b"250 2.1.5 Ok"
QUEUED = b"250 2.0.0 queued as "
BODY = b"DATA\r\n", b"Subject: dsn\r\n\r\nhello\r\n.\r\n"
PASSED_ON_MAIL = ["RET=HDRS", "ENVID=abc+2Bd"]
PASSED_ON_RCPT = ["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;b@a.test"]


def client(daemon: Relay) -> RawClient:
    """A client past the greeting and EHLO."""
    raw = RawClient(daemon.port)
    assert raw.reply().startswith(b"220 ")
    assert raw.ask(b"EHLO client.test\r\n")[0].startswith(b"250 ")
    return raw


def submit(daemon: Relay, mail: bytes = MAIL, rcpt: bytes = RCPT) -> str:
    """One message with these MAIL and RCPT commands; its queue id."""
    with client(daemon) as raw:
        assert raw.ask(mail, rcpt) == [MAIL_OK, RCPT_OK]
        [start, queued] = raw.ask(*BODY)
    assert start.startswith(b"354 ") and queued.startswith(QUEUED), queued
    return queued.rsplit(b" ", 1)[1].decode()


def received_events(daemon: Relay) -> list[dict[str, Any]]:
    """The `received` events of the journal."""
    lines = [line for path in sorted((daemon.spool / "events").glob("*.jsonl"))
             for line in path.read_text().splitlines()]  # fmt: skip
    return [e for e in map(json.loads, lines) if e.get("event") == "received"]


def test_ehlo_lists_dsn(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay()
    with RawClient(daemon.port) as raw:
        raw.reply()
        raw.sock.sendall(b"EHLO client.test\r\n")
        lines = raw.lines_of_reply()
    assert b"250-DSN\r\n" in lines, lines


def test_parameters_are_kept_shown_and_carried_by_the_received_event(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    sink.script_rcpt("b@a.test", "451 4.2.0 later")  # so that the message stays in the queue
    settings = api_on(tokens_file=str(tmp_path / "tokens"))
    daemon = relay({**settings, "delivery": {"retry": {"schedule": ["1h"]}}})
    token = add_token(daemon, "app")
    queue_id = submit(daemon)
    daemon.wait_event("retry_scheduled", id=queue_id)
    shown = json.loads(daemon.cli("queue", "show", queue_id).stdout)
    assert (shown["ret"], shown["envid"]) == ("HDRS", "abc+d")
    [rcpt] = shown["recipients"]
    assert (rcpt["notify"], rcpt["orcpt"]) == (["FAILURE", "DELAY"], "rfc822;b@a.test")
    [event] = [e for e in received_events(daemon) if e["id"] == queue_id]
    assert event["dsn"] == {
        "ret": "HDRS",
        "envid": "abc+d",
        "recipients": {"b@a.test": {"notify": ["FAILURE", "DELAY"], "orcpt": "rfc822;b@a.test"}},
    }

    def in_the_api() -> bool:  # once the API worker has taken the event in
        status, _, body = daemon.api("GET", f"/v1/messages/{queue_id}", token)
        return status == 200 and any(e.get("dsn") == event["dsn"] for e in body["events"])

    eventually(in_the_api, timeout=10)


def test_mail_without_parameters_has_none(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay()
    queue_id = submit(daemon, b"MAIL FROM:<a@x.test>\r\n", b"RCPT TO:<b@a.test>\r\n")
    daemon.wait_event("delivered", id=queue_id)
    [event] = [e for e in received_events(daemon) if e["id"] == queue_id]
    assert "dsn" not in event
    assert sink.wait_for(1)[0].rcpt_tos == ["b@a.test"]


PLAIN_MAIL = b"MAIL FROM:<a@x.test>\r\n"
# A command after EHLO (a plain MAIL first where it is RCPT's turn), and its exact reply.
REFUSED = {
    b"MAIL FROM:<a@x.test> RET=BODY\r\n": b"501 5.5.4 Malformed RET parameter: must be FULL or HDRS",
    b"MAIL FROM:<a@x.test> RET=HDRS ret=FULL\r\n": b"501 5.5.4 RET parameter given twice",
    b"MAIL FROM:<a@x.test> ENVID=a+zz\r\n": b'501 5.5.4 Malformed ENVID parameter: not xtext ("+" not followed by two hex digits)',
    b"MAIL FROM:<a@x.test> ENVID=" + b"x" * 101 + b"\r\n": b"501 5.5.4 Malformed ENVID parameter: longer than 100 characters",
    b"MAIL FROM:<a@x.test> FOO=bar\r\n": b"555 5.5.4 MAIL FROM parameter FOO not recognized",
    b"MAIL FROM:<a@x.test> SIZE=10 NOTIFY=NEVER\r\n": b"555 5.5.4 MAIL FROM parameter NOTIFY not recognized",
    b"RCPT TO:<b@a.test> NOTIFY=NEVER,SUCCESS\r\n": b"501 5.5.4 Malformed NOTIFY parameter: NEVER must stand alone",
    b"RCPT TO:<b@a.test> NOTIFY=DELAY,DELAY\r\n": b"501 5.5.4 Malformed NOTIFY parameter: a value is repeated",
    b"RCPT TO:<b@a.test> NOTIFY=FAILURE NOTIFY=DELAY\r\n": b"501 5.5.4 NOTIFY parameter given twice",
    b"RCPT TO:<b@a.test> ORCPT=b@a.test\r\n": b"501 5.5.4 Malformed ORCPT parameter: must be addr-type;address",
    b"RCPT TO:<b@a.test> FOO=bar\r\n": b"555 5.5.4 RCPT TO parameter FOO not recognized",
    b"RCPT TO:<b@a.test> RET=HDRS\r\n": b"555 5.5.4 RCPT TO parameter RET not recognized",
}  # fmt: skip


def test_malformed_parameters_get_501_and_unknown_ones_555(
    relay: RelayFactory, sink: MxSink
) -> None:
    daemon = relay()
    replies = {}
    for command, expected in REFUSED.items():
        with client(daemon) as raw:
            before = [PLAIN_MAIL] if command.startswith(b"RCPT") else []
            answers = raw.ask(*before, command)
            replies[command] = answers[-1]
            # The transaction goes on after the refusal, as after any refused command.
            after = [RCPT] if before else [PLAIN_MAIL]
            assert raw.ask(*after) == [RCPT_OK if before else MAIL_OK], (command, expected)
    assert {c: r for c, r in replies.items() if r != REFUSED[c]} == {}
    assert list(daemon.spool.joinpath("queue").iterdir()) == []


def test_after_helo_parameters_are_a_syntax_error(relay: RelayFactory, sink: MxSink) -> None:
    """RFC 5321 §4.1.1.2: no parameters without EHLO; aiosmtpd's 501 stands."""
    daemon = relay()
    with RawClient(daemon.port) as raw:
        raw.reply()
        assert raw.ask(b"HELO client.test\r\n")[0].startswith(b"250 ")
        assert raw.ask(MAIL)[0].startswith(b"501 5.5.4 Syntax: MAIL FROM:")


@pytest.fixture
def dsn_sink(dns_server: DnsServer, mx: MxNet) -> MxSink:
    """The MX of a.test, offering DSN."""
    sink = mx.sink("127.0.0.2", dsn=True)
    dns_server.mx("a.test", (10, "mx.a.test"))
    dns_server.a("mx.a.test", "127.0.0.2")
    return sink


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
def test_passed_on_to_a_next_hop_that_offers_dsn_after_a_kill9(
    relay: RelayFactory, dns_server: DnsServer, mx: MxNet, pipelining: bool
) -> None:
    """Kept in the state file with the message: a kill -9 after the first (deferred) attempt
    loses none of them, and the retry passes them on, xtext-encoded again."""
    sink = mx.sink("127.0.0.2", dsn=True, pipelining=pipelining)
    dns_server.mx("a.test", (10, "mx.a.test"))
    dns_server.a("mx.a.test", "127.0.0.2")
    sink.script_rcpt("b@a.test", "451 4.2.0 later", "250 2.1.5 ok")
    daemon = relay({"delivery": {"retry": {"schedule": ["1s"]}}})
    queue_id = submit(daemon)
    daemon.wait_event("retry_scheduled", id=queue_id)
    daemon.kill9()
    daemon.start()
    [got] = sink.wait_for(1, timeout=20)
    assert [o for o in got.mail_options if o.split("=")[0] in ("RET", "ENVID")] == PASSED_ON_MAIL
    assert got.rcpt_options == {"b@a.test": PASSED_ON_RCPT}


def test_none_passed_to_a_next_hop_without_dsn(relay: RelayFactory, sink: MxSink) -> None:
    """A next hop that does not offer DSN would refuse the parameters (aiosmtpd's 555): the
    message is delivered, without them."""
    daemon = relay()
    queue_id = submit(daemon)
    daemon.wait_event("delivered", id=queue_id)
    [got] = sink.wait_for(1)
    assert not [o for o in got.mail_options if o.split("=")[0] in ("RET", "ENVID")]
    assert got.rcpt_options == {"b@a.test": []}
