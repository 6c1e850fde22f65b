"""Bounce categories: real replies from the big providers and from the relay's own delivery
stage, each mapped to the word an application acts on (the enhanced code first, then the
text)."""

from __future__ import annotations

import pytest

from relay.mail import category as c
from relay.mail.category import categorize
from relay.mail.reply import Reply

CASES = [
    # the enhanced code says it
    ("550 5.1.1 The email account that you tried to reach does not exist.", c.INVALID_RECIPIENT),
    ("550 5.1.1 <x@a.test>: Recipient address rejected: User unknown", c.INVALID_RECIPIENT),
    ("550 5.2.1 The email account that you tried to reach is disabled.", c.INVALID_RECIPIENT),
    ("550 5.1.6 Recipient addresses in this domain no longer accepted", c.INVALID_RECIPIENT),
    ("550 5.1.2 nowhere.test does not exist (NXDOMAIN)", c.BAD_DOMAIN),
    ("556 5.1.10 a.test does not accept mail (null MX)", c.BAD_DOMAIN),
    ("452 4.2.2 The email account that you tried to reach is over quota.", c.MAILBOX_FULL),
    ("552 5.2.2 Mailbox full", c.MAILBOX_FULL),
    ("452 4.3.1 Insufficient system storage", c.MAILBOX_FULL),
    ("552 5.3.4 Message size exceeds fixed limit", c.POLICY),
    ("553 5.6.7 message needs SMTPUTF8, which the receiving server lacks", c.POLICY),
    ("451 4.4.3 DNS lookup for a.test failed: SERVFAIL", c.DNS_FAILURE),
    ("451 4.4.4 no address for any MX host of a.test", c.DNS_FAILURE),
    ("421 4.7.28 Gmail has detected an unusual rate of unsolicited mail", c.RATE_LIMITED),
    ("421 4.4.5 Server busy, try again later", c.RATE_LIMITED),
    ("4.7.5 TLS handshake with mx.a.test failed: certificate verify failed", c.TLS_FAILURE),
    ("530 5.7.10 Must issue a STARTTLS command first", c.TLS_FAILURE),
    ("535 5.7.8 Username and Password not accepted", c.AUTH_FAILURE),
    (
        "550 5.7.26 Unauthenticated email from a.test is not accepted due to DMARC policy",
        c.AUTH_FAILURE,
    ),
    (
        "550 5.7.23 The message was rejected because of Sender Policy Framework violation",
        c.AUTH_FAILURE,
    ),
    ("451 4.4.7 Delivery time expired", c.TIMEOUT),
    # a generic code: the text decides
    ("550 5.7.1 Service unavailable; client [192.0.2.1] blocked using Spamhaus", c.SPAM_BLOCK),
    ("554 5.7.1 Message rejected as spam by Content Filtering.", c.SPAM_BLOCK),
    ("550 5.7.1 Relaying denied", c.POLICY),
    ("550 5.7.1 Delivery not authorized, message refused", c.POLICY),
    (
        "550 5.7.1 [IPTS04] Messages from 192.0.2.1 weren't sent. Please contact your Internet"
        " service provider since part of their network is on our block list",
        c.SPAM_BLOCK,
    ),
    ("451 4.7.0 Temporary server error. Please try again later.", c.RATE_LIMITED),
    ("550 5.0.0 Requested action not taken: mailbox unavailable", c.INVALID_RECIPIENT),
    ("452 4.0.0 Too many recipients", c.RATE_LIMITED),
    ("550 5.7.0 Policy rejection on the target address", c.POLICY),
    ("554 5.7.9 Message not accepted for policy reasons", c.AUTH_FAILURE),
    # no enhanced code
    ("550 No such user here", c.INVALID_RECIPIENT),
    ("550 Requested action not taken: mailbox unavailable (user unknown)", c.INVALID_RECIPIENT),
    ("552 Quota exceeded", c.MAILBOX_FULL),
    ("421 Too many concurrent SMTP connections; please try again later", c.RATE_LIMITED),
    (
        "554 Your access to this mail system has been rejected due to the sending MTA's poor"
        " reputation",
        c.SPAM_BLOCK,
    ),
    ("451 Requested action aborted: local error in processing", c.UNKNOWN),
    ("554 Transaction failed", c.UNKNOWN),
    ("550 5.7.12 The sender was not authenticated by organization", c.POLICY),
]


def reply_of(text: str) -> Reply:
    code, _, rest = text.partition(" ")
    if code.isdigit():
        return Reply.parse(int(code), rest)
    return Reply(None, code, rest)  # a reply the relay made up: an enhanced code, no SMTP code


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_a_reply_gets_its_category(text: str, expected: str) -> None:
    assert categorize(reply_of(text)) == expected


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (None, c.UNKNOWN),
        (Reply(None, None, "mx.a.test:25: timed out"), c.TIMEOUT),
        (Reply(None, None, "mx.a.test:25: Connection refused"), c.UNKNOWN),
        (Reply(None, None, "no MX to try for a.test"), c.BAD_DOMAIN),
        (Reply(None, None, "mx.a.test:25: [Errno -2] Name or service not known"), c.DNS_FAILURE),
    ],
)
def test_errors_without_a_reply(reply: Reply | None, expected: str) -> None:
    assert categorize(reply) == expected


def test_every_category_is_reachable_and_the_set_is_closed() -> None:
    found = {categorize(reply_of(text)) for text, _ in CASES}
    assert found == set(c.CATEGORIES)
