"""Table-driven tests of the pure retry backoff: the next delay from attempts and age."""

from __future__ import annotations

import random

import pytest

from relay.config.delivery import RetryConfig
from relay.schedule.backoff import next_delay

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
