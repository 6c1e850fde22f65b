"""The SMTP dialogue of the intake, as an application's client sees it: extensions, relay policy,
limits, and the precise reply for each bad input."""

from __future__ import annotations

import pytest

from tests.support.daemon import Relay, RelayFactory
from tests.support.dns import DnsServer
from tests.support.mx import MxNet, MxSink
from tests.support.smtp import RawClient


def converse(daemon: Relay, *lines: bytes) -> list[bytes]:
    """Send raw lines (after EHLO) and return every reply line the server wrote, in order."""
    with RawClient(daemon.port) as client:
        replies = [client.line()]
        for line in (b"EHLO client.test\r\n", *lines):
            client.send(line)
            replies += client.lines_of_reply()
        return replies


def test_ehlo_advertises_the_extensions(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay({"smtp": {"max_message_size": 123456}})
    with daemon.smtp() as client:
        code, text = client.ehlo()
        greeting = client.sock.getpeername()
    assert code == 250 and greeting
    extensions = text.decode().splitlines()
    assert extensions[0] == "relay.test"
    for ext in ("SIZE 123456", "8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES", "SMTPUTF8"):
        assert ext in extensions


def test_queued_reply_and_enhanced_codes(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay()
    replies = converse(
        daemon,
        b"MAIL FROM:<app@sender.test>\r\n",
        b"RCPT TO:<user@a.test>\r\n",
        b"DATA\r\n",
        b"Subject: x\r\n\r\nhello\r\n.\r\n",
        b"RSET\r\n",
        b"NOOP\r\n",
        b"QUIT\r\n",
    )
    assert replies[0].startswith(b"220 relay.test ")
    tail = [r.rstrip(b"\r\n") for r in replies[-7:]]
    assert tail[0] == b"250 2.1.0 Ok"
    assert tail[1] == b"250 2.1.5 Ok"
    assert tail[2].startswith(b"354 ")
    assert tail[3].startswith(b"250 2.0.0 queued as ")
    assert tail[4:6] == [b"250 2.0.0 OK", b"250 2.0.0 OK"]
    assert tail[6].startswith(b"221 2.0.0 ")
    queue_id = tail[3].rsplit(b" ", 1)[1].decode()
    sink.wait_for(1)
    daemon.wait_event("delivered", id=queue_id)


def test_relay_denied_outside_relay_networks(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay({"smtp": {"relay_networks": ["10.0.0.0/8", "::1/128"]}})
    replies = converse(daemon, b"MAIL FROM:<spammer@evil.test>\r\n", b"RCPT TO:<victim@a.test>\r\n")
    assert replies[-1].startswith(b"554 5.7.1 <victim@a.test>: Relay access denied")
    [rejected] = daemon.wait_event("rejected", reason="relay_denied")
    assert rejected["client"] == "127.0.0.1"
    assert rejected["reply"] == "554 5.7.1 <victim@a.test>: Relay access denied"
    assert list((daemon.spool / "queue").iterdir()) == []


def test_too_many_recipients(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay({"smtp": {"max_recipients": 2}})
    replies = converse(
        daemon,
        b"MAIL FROM:<app@sender.test>\r\n",
        b"RCPT TO:<one@a.test>\r\n",
        b"RCPT TO:<two@a.test>\r\n",
        b"RCPT TO:<three@a.test>\r\n",
        b"DATA\r\n",
        b"Subject: x\r\n\r\nhi\r\n.\r\n",
    )
    assert replies[-3].startswith(b"452 4.5.3 Too many recipients")
    assert replies[-1].startswith(b"250 2.0.0 queued as ")
    [message] = sink.wait_for(1)
    assert sorted(message.rcpt_tos) == ["one@a.test", "two@a.test"]


def test_oversized_message_refused_at_mail_and_at_data(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay({"smtp": {"max_message_size": 1000}})
    replies = converse(daemon, b"MAIL FROM:<app@sender.test> SIZE=5000\r\n")
    assert replies[-1].startswith(b"552 5.3.4 ")
    big = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n"
    replies = converse(
        daemon,
        b"MAIL FROM:<app@sender.test>\r\n",
        b"RCPT TO:<user@a.test>\r\n",
        b"DATA\r\n",
        big * 20 + b".\r\n",
        b"NOOP\r\n",
    )
    assert replies[-2].startswith(b"552 5.3.4 ")
    assert replies[-1].startswith(b"250 ")  # the session goes on
    assert list((daemon.spool / "queue").iterdir()) == []


@pytest.mark.parametrize(
    "content",
    [
        b"Subject: x\r\n\r\nbare\nline feed\r\n.\r\n",
        b"Subject: x\r\n\r\nbare\rcarriage return\r\n.\r\n",
        b"Subject: x\r\n\r\nsmuggle\n.\r\nMAIL FROM:<x@y>\r\n.\r\n",
    ],
)
def test_bare_line_ends_refused(relay: RelayFactory, sink: MxSink, content: bytes) -> None:
    daemon = relay()
    replies = converse(
        daemon,
        b"MAIL FROM:<app@sender.test>\r\n",
        b"RCPT TO:<user@a.test>\r\n",
        b"DATA\r\n",
        content,
    )
    assert replies[-1].startswith(b"550 5.6.0 ")
    assert list((daemon.spool / "queue").iterdir()) == []


def test_commands_out_of_order(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay()
    replies = converse(daemon, b"RCPT TO:<user@a.test>\r\n", b"DATA\r\n")
    assert replies[-2].startswith(b"503 5.5.1 ")
    assert replies[-1].startswith(b"503 5.5.1 ")


def test_null_sender_and_utf8_address_are_delivered(
    relay: RelayFactory, sink: MxSink, dns_server: DnsServer, mx: MxNet
) -> None:
    utf8_sink = mx.sink("127.0.0.3", smtputf8=True)
    dns_server.mx("u.test", (10, "mx.u.test"))
    dns_server.a("mx.u.test", "127.0.0.3")
    daemon = relay()
    replies = converse(
        daemon,
        b"MAIL FROM:<>\r\n",
        b"RCPT TO:<bounce@a.test>\r\n",
        b"DATA\r\n",
        b"Subject: bounce\r\n\r\nhi\r\n.\r\n",
        b"MAIL FROM:<j\xc3\xb6rg@sender.test> SMTPUTF8\r\n",
        b"RCPT TO:<us\xc3\xa9r@u.test>\r\n",
        b"DATA\r\n",
        b"Subject: utf8\r\n\r\nhi\r\n.\r\n",
    )
    assert replies[-5].startswith(b"250 2.0.0 queued as ")
    assert replies[-1].startswith(b"250 2.0.0 queued as ")
    [first] = sink.wait_for(1)
    assert first.mail_from == "" and first.rcpt_tos == ["bounce@a.test"]
    [second] = utf8_sink.wait_for(1)
    assert second.mail_from == "jörg@sender.test" and second.rcpt_tos == ["usér@u.test"]
    assert "SMTPUTF8" in second.mail_options
    assert b"with UTF8SMTP id" in second.data


def test_utf8_mail_is_not_downgraded_to_a_server_without_smtputf8(
    relay: RelayFactory, sink: MxSink
) -> None:
    daemon = relay()
    replies = converse(
        daemon,
        b"MAIL FROM:<j\xc3\xb6rg@sender.test> SMTPUTF8\r\n",
        b"RCPT TO:<user@a.test>\r\n",
        b"DATA\r\n",
        b"Subject: utf8\r\n\r\nhi\r\n.\r\n",
    )
    queue_id = replies[-1].rstrip().rsplit(b" ", 1)[1].decode()
    daemon.wait_event("dead_lettered", id=queue_id)
    [entry] = daemon.cli_json("dlq", "list")
    assert entry["recipients"][0]["reply"]["enhanced"] == "5.6.7"
    assert sink.received == []


def test_every_log_line_is_json_even_for_hostile_commands(
    relay: RelayFactory, sink: MxSink
) -> None:
    """aiosmtpd's own log lines would carry the client's raw bytes; none reaches the log."""
    daemon = relay()
    converse(daemon, b"X\rY\r\n", b"\x1b[2J\r\n", b"VRFY <<\x80>\r\n")
    daemon.send(["user@a.test"])
    sink.wait_for(1)
    assert [e for e in daemon.lines if e.get("event") == "raw"] == []
