"""Schedule, the backoff: pure policy turning attempts, age and the retry config into the next
delay or "give up"."""

from __future__ import annotations

import random

from relay.config.delivery import RetryConfig


def next_delay(attempts: int, age: float, retry: RetryConfig, rng: random.Random) -> float | None:
    """Seconds until the next attempt after `attempts` failed rounds, or None once expired.

    The schedule gives the delay before attempt 2, 3, …; its last entry repeats. Jitter spreads
    retries by ± that fraction. A message that would pass max_age gets one last attempt at its
    deadline, so `max_age` is when it is dead-lettered, not when its last attempt happened.
    """
    if attempts < 1:
        raise ValueError("next_delay needs at least one failed attempt")
    remaining = retry.max_age - age
    if remaining <= 0:
        return None
    base = retry.schedule[min(attempts, len(retry.schedule)) - 1]
    delay = base * (1 + rng.uniform(-retry.jitter, retry.jitter)) if retry.jitter else base
    return min(delay, remaining)
