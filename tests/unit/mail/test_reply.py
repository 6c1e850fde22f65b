"""Table-driven tests of the pure reply policy: parsing a reply and classifying it."""

from __future__ import annotations

import pytest

from relay.mail.reply import Classification, Reply, Verdict, classify

D, T, P = Verdict.DELIVERED, Verdict.TEMPORARY, Verdict.PERMANENT


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (Reply(250, "2.0.0", "ok"), Classification(D)),
        (Reply(251, None, "will forward"), Classification(D)),
        (Reply(450, "4.2.0", "mailbox busy"), Classification(T)),
        (Reply(451, "4.3.0", "try later"), Classification(T)),
        (Reply(452, "4.2.2", "mailbox full"), Classification(T)),
        (Reply(421, "4.3.2", "shutting down"), Classification(T, throttle=True)),
        (Reply(451, "4.7.28", "policy"), Classification(T, throttle=True)),
        (Reply(450, "4.7.0", "Too many connections from your IP"), Classification(T, True)),
        (Reply(451, None, "Rate limit exceeded"), Classification(T, throttle=True)),
        (Reply(550, "5.1.1", "no such user"), Classification(P)),
        (Reply(554, "5.7.1", "relay denied"), Classification(P)),
        (Reply(556, "5.1.10", "null MX"), Classification(P)),
        (Reply(550, "5.7.0", "rate limit"), Classification(P)),  # 5xx stays permanent
        (Reply(None, None, "connection refused"), Classification(T)),
        (Reply(None, "5.1.1", "no code"), Classification(T)),  # unknown → temporary
        (Reply(354, None, "go ahead"), Classification(T)),  # not a final answer → temporary
        (Reply(199, None, "odd"), Classification(T)),
        (Reply(699, None, "odd"), Classification(T)),
        (ConnectionResetError("reset"), Classification(T)),
        (TimeoutError(), Classification(T)),
    ],
)
def test_classify(reply: Reply | BaseException, expected: Classification) -> None:
    assert classify(reply) == expected


@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [
        (250, "2.0.0 Ok: queued as X", Reply(250, "2.0.0", "Ok: queued as X")),
        (550, "5.1.1 <a@b>: Recipient\n address rejected", Reply(550, "5.1.1", "<a@b>: Recipient address rejected")),
        (451, "try again", Reply(451, None, "try again")),
        (556, "5.1.10 null MX", Reply(556, "5.1.10", "null MX")),
    ],
)  # fmt: skip
def test_reply_parse(code: int, message: str, expected: Reply) -> None:
    assert Reply.parse(code, message) == expected
