"""The DSN as a mail reader sees it: composed from a message and its recipients, then parsed
back with the stdlib `email` package, every field of RFC 3464 checked; which part returns the
original (headers, the whole message within bounces.max_returned) and the RFC 6533 types of
SMTPUTF8 mail."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest

from relay.bounces.compose import Report, Returned, compose, status_of
from relay.bounces.returned import read_returned
from relay.mail.reply import Reply
from relay.spool.message import Message, Recipient

ARRIVED = 1_790_000_000.0
TRIED = ARRIVED + 60
NOW = ARRIVED + 120
UNTIL = ARRIVED + 86_400
HEADERS = b"Received: from client.test\r\nSubject: hello\r\nFrom: a@x.test\r\n"
CONTENT = HEADERS + b"\r\nthe body\r\n"


def rcpt(address: str, reply: str | None, **fields: Any) -> Recipient:
    parsed = None
    if reply is not None:
        code, _, text = reply.partition(" ")
        parsed = Reply.parse(int(code), text)
    return Recipient(address, reply=parsed, mx=fields.pop("mx", "mx.y.test"), last_attempt=TRIED,
                     **fields)  # fmt: skip


def message(rcpts: list[Recipient], **fields: Any) -> Message:
    return Message("0190aa00bb11cc22dd33", "a@x.test", rcpts, ARRIVED, ARRIVED, size=len(CONTENT),
                   **fields)  # fmt: skip


def parse(data: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def when(date: str) -> float:
    return parsedate_to_datetime(date).timestamp()


def blocks(dsn: EmailMessage) -> list[dict[str, str]]:
    """The delivery-status part's field blocks: the message's, then one per recipient."""
    status = list(dsn.iter_parts())[1]
    return [dict(block.items()) for block in status.get_payload()]


FAILED_5 = rcpt("b@y.test", "550 5.1.1 no such user", status="failed")
FAILED_NO_CODE = rcpt("c@y.test", "554 mailbox disabled", status="failed")
EXPIRED_4 = rcpt("d@z.test", "451 4.2.0 greylisted", status="expired", mx="mx.z.test")
EXPIRED_NONE = Recipient("e@z.test", status="expired", last_attempt=TRIED,
                         reply=Reply(None, None, "connection refused"))  # fmt: skip
DEFERRED = rcpt("f@y.test", "452 4.2.2 mailbox full", status="deferred")
SENT = rcpt("g@y.test", "250 2.0.0 ok", status="delivered", notify=["SUCCESS"])
ORCPT = rcpt("h@y.test", "550 5.1.1 gone", status="failed", orcpt="rfc822;H@y.test")


@pytest.mark.parametrize(
    ("action", "rcpts", "subject", "expected"),
    [
        (
            "failed", [FAILED_5], "Undelivered Mail Returned to Sender",
            [{"Final-Recipient": "rfc822;b@y.test", "Status": "5.1.1", "Remote-MTA": "dns; mx.y.test",
              "Diagnostic-Code": "smtp; 550 5.1.1 no such user"}],
        ),
        # No enhanced code: the reply's class; an expired recipient: its last 4.x.x, else 4.4.7.
        (
            "failed", [FAILED_NO_CODE, EXPIRED_4, EXPIRED_NONE], "Undelivered Mail Returned to Sender",
            [{"Status": "5.0.0", "Diagnostic-Code": "smtp; 554 mailbox disabled"},
             {"Status": "4.2.0", "Remote-MTA": "dns; mx.z.test"},
             {"Status": "4.4.7", "Remote-MTA": None, "Diagnostic-Code": None}],
        ),
        (
            "delayed", [DEFERRED], "Delayed Mail (still being retried)",
            [{"Status": "4.2.2"}],
        ),
        (
            "relayed", [SENT], "Relayed mail: no DSN support at the next hop",
            [{"Status": "2.0.0", "Diagnostic-Code": "smtp; 250 2.0.0 ok"}],
        ),
        (
            "failed", [ORCPT], "Undelivered Mail Returned to Sender",
            [{"Original-Recipient": "rfc822;H@y.test", "Final-Recipient": "rfc822;h@y.test"}],
        ),
    ],
)  # fmt: skip
def test_every_field_of_a_dsn(
    action: str, rcpts: list[Recipient], subject: str, expected: list[dict[str, str | None]]
) -> None:
    msg = message(rcpts)
    report = Report(msg, rcpts, action, "a@x.test", "relay.test", NOW, UNTIL)
    dsn = parse(compose(report, Returned(HEADERS)))
    assert dsn["From"] == "Mail Delivery System <MAILER-DAEMON@relay.test>"
    assert dsn["To"] == "a@x.test" and dsn["Subject"] == subject
    assert dsn["Auto-Submitted"] == "auto-replied" and dsn["MIME-Version"] == "1.0"
    assert when(dsn["Date"]) == NOW
    assert dsn["Message-ID"].endswith("@relay.test>")
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    human, _, returned = dsn.iter_parts()
    assert [p.get_content_type() for p in dsn.iter_parts()] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"
    ]  # fmt: skip
    text = human.get_content()
    for r in rcpts:
        assert f"<{r.address}>" in text and str(r.reply) in text
    assert returned.get_payload().encode() == HEADERS
    first, *per_rcpt = blocks(dsn)
    assert sorted(first) == ["Arrival-Date", "Reporting-MTA"]
    assert first["Reporting-MTA"] == "dns; relay.test" and when(first["Arrival-Date"]) == ARRIVED
    assert len(per_rcpt) == len(rcpts)
    for block, r, want in zip(per_rcpt, rcpts, expected, strict=True):
        assert block["Action"] == action
        assert block["Final-Recipient"] == f"rfc822;{r.address}"
        assert when(block["Last-Attempt-Date"]) == TRIED
        assert ("Original-Recipient" in block) == (r.orcpt is not None)
        if action == "delayed":
            assert when(block["Will-Retry-Until"]) == UNTIL
        else:
            assert "Will-Retry-Until" not in block
        for name, value in want.items():
            assert block.get(name) == value, (name, block)


def test_envid_goes_back_as_original_envelope_id() -> None:
    msg = message([FAILED_5], envid="abc+123")
    dsn = parse(
        compose(Report(msg, [FAILED_5], "failed", "a@x.test", "relay.test", NOW), Returned(HEADERS))
    )
    assert blocks(dsn)[0]["Original-Envelope-Id"] == "abc+123"


@pytest.mark.parametrize(
    ("ret", "max_returned", "kind", "payload"),
    [
        (None, 1 << 20, "text/rfc822-headers", HEADERS),  # RET not given: headers
        ("HDRS", 1 << 20, "text/rfc822-headers", HEADERS),
        ("FULL", len(CONTENT), "message/rfc822", CONTENT),  # fits exactly
        ("FULL", len(CONTENT) - 1, "text/rfc822-headers", HEADERS),  # one byte too many
    ],
)
def test_what_goes_back(
    tmp_path: Path, ret: str | None, max_returned: int, kind: str, payload: bytes
) -> None:
    path = tmp_path / "content"
    path.write_bytes(CONTENT)
    msg = message([FAILED_5], ret=ret)
    returned = read_returned(path, len(CONTENT), ret, max_returned)
    dsn = parse(compose(Report(msg, [FAILED_5], "failed", "a@x.test", "relay.test", NOW), returned))
    part = list(dsn.iter_parts())[2]
    assert part.get_content_type() == kind
    if kind == "message/rfc822":
        [inner] = part.get_payload()
        assert inner["Subject"] == "hello" and inner.get_content().strip() == "the body"
    else:
        assert part.get_payload().encode() == payload


def test_smtputf8_mail_gets_the_global_types() -> None:
    utf8 = rcpt("jörg@y.test", "550 5.1.1 unbekannt", status="failed")
    msg = message([utf8], smtputf8=True)
    headers = "Subject: grüße\r\n".encode()
    data = compose(Report(msg, [utf8], "failed", "a@x.test", "relay.test", NOW), Returned(headers))
    dsn = parse(data)
    assert [p.get_content_type() for p in dsn.iter_parts()] == [
        "text/plain", "message/global-delivery-status", "message/global-headers"
    ]  # fmt: skip
    # email reads a global-delivery-status as one message: the first block its header, the rest
    # its body.
    status = list(dsn.iter_parts())[1].as_bytes(policy=email.policy.SMTPUTF8).decode()
    assert "Final-Recipient: utf-8;jörg@y.test" in status and "Status: 5.1.1" in status
    assert "grüße".encode() in data


def test_a_returned_dsn_does_not_break_the_boundary() -> None:
    msg = message([FAILED_5])
    report = Report(msg, [FAILED_5], "failed", "a@x.test", "relay.test", NOW)
    first = compose(report, Returned(HEADERS))
    # The postmaster's copy of a double bounce returns the first DSN, boundary and all.
    second = parse(compose(report, Returned(first)))
    assert len(list(second.iter_parts())) == 3
    assert list(second.iter_parts())[2].get_payload().encode() == first


@pytest.mark.parametrize(
    ("status", "enhanced", "action", "expected"),
    [
        ("failed", "5.7.1", "failed", "5.7.1"),
        ("failed", None, "failed", "5.0.0"),
        ("expired", "4.4.1", "failed", "4.4.1"),
        ("expired", "5.1.1", "failed", "4.4.7"),
        ("expired", None, "failed", "4.4.7"),
        ("deferred", "4.2.2", "delayed", "4.2.2"),
        ("deferred", None, "delayed", "4.0.0"),
        ("delivered", None, "relayed", "2.0.0"),
    ],
)
def test_status_of(status: str, enhanced: str | None, action: str, expected: str) -> None:
    r = Recipient("b@y.test", status=status, reply=Reply(450, enhanced, "x"))
    assert status_of(r, action) == expected
