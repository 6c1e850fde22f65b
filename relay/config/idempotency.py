"""Configuration, the idempotency section: how long the intake remembers an idempotency key
(X-Relay-Idempotency-Key, the API's Idempotency-Key) and the message it made."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relay.config.schema import option
from relay.config.values import duration


def window(value: Any) -> float:
    """A duration of at least one second."""
    seconds = duration(value)
    if seconds < 1:
        raise ValueError(f"{value!r} is shorter than 1s")
    return seconds


@dataclass(frozen=True)
class IdempotencyConfig:
    # A key is remembered this long after the message it made was accepted (at most
    # events.retention: keys of finished messages are rebuilt from the event journal).
    window: float = option(window, 86400.0)
