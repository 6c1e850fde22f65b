"""Configuration, the throttle section: which replies count as throttling, how far the
adaptive throttle slows a destination and how it recovers, and replies that suspend one."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from relay.config.schema import option
from relay.config.values import as_list, duration, indexed, positive_int


def pattern(value: Any) -> re.Pattern[str]:
    try:
        return re.compile(str(value), re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"{value!r} is not a regular expression: {exc}") from None


def patterns(value: Any) -> tuple[re.Pattern[str], ...]:
    return tuple(indexed(pattern, as_list(value)))


def suspensions(value: Any) -> tuple[tuple[re.Pattern[str], float], ...]:
    """[{pattern: REGEX, for: DURATION}, …]: replies that suspend their destination."""

    def suspension(item: Any) -> tuple[re.Pattern[str], float]:
        if not isinstance(item, Mapping) or set(item) != {"pattern", "for"}:
            raise ValueError(f"{item!r} needs exactly pattern and for")
        return pattern(item["pattern"]), duration(item["for"])

    return tuple(indexed(suspension, as_list(value)))


@dataclass(frozen=True)
class ThrottleConfig:
    # Replies that count as throttling besides 421, 4.7.28 and 4xx rate wording (regexes,
    # case-insensitive, searched in "code enhanced text"); Yahoo's [TSnn] codes by default.
    patterns: tuple[re.Pattern[str], ...] = option(patterns, (pattern(r"\[?TSS?0\d\]?"),))
    # Each throttle signal halves the destination's connections (at least 1) and rate (or,
    # with no rate, spaces messages `interval`, doubling per level) up to max_level;
    # recover_after clean deliveries in a row undo one level.
    max_level: int = option(positive_int, 4)
    recover_after: int = option(positive_int, 3)
    interval: float = option(duration, 1.0)
    # Replies that suspend the destination (nothing sent to it) for a while.
    suspend: tuple[tuple[re.Pattern[str], float], ...] = option(suspensions, ())
