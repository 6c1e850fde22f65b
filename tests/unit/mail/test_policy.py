"""Table-driven tests of the pure policy: reply classification and retry backoff."""

from __future__ import annotations

import random

import pytest

from relay.config.delivery import RetryConfig
from relay.mail.reply import Classification, Reply, Verdict, classify
from relay.schedule.backoff import next_delay

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


RETRY = RetryConfig(schedule=(300.0, 1800.0, 7200.0), max_age=86400.0, jitter=0.0)


@pytest.mark.parametrize(
    ("attempts", "age", "expected"),
    [
        (1, 0.0, 300.0),  # delay before attempt 2
        (2, 400.0, 1800.0),
        (3, 3000.0, 7200.0),
        (4, 10000.0, 7200.0),  # the last entry repeats
        (9, 50000.0, 7200.0),
        (5, 86000.0, 400.0),  # one last attempt at the deadline
        (5, 86400.0, None),  # expired
        (5, 90000.0, None),
    ],
)
def test_next_delay(attempts: int, age: float, expected: float | None) -> None:
    assert next_delay(attempts, age, RETRY, random.Random(1)) == expected


def test_jitter_spreads_within_fraction() -> None:
    retry = RetryConfig(schedule=(100.0,), max_age=1e9, jitter=0.1)
    rng = random.Random(7)
    delays = [next_delay(1, 0.0, retry, rng) for _ in range(500)]
    assert all(d is not None and 90.0 <= d <= 110.0 for d in delays)
    assert len({round(d or 0, 3) for d in delays}) > 100  # actually spread, not constant


def test_next_delay_needs_a_failed_attempt() -> None:
    with pytest.raises(ValueError, match="at least one failed attempt"):
        next_delay(0, 0.0, RETRY, random.Random())
