"""Configuration, the destinations section: limits per destination (a recipient domain,
or a provider and all domains whose MX matches it), connections and messages a second."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from relay.config.schema import option
from relay.config.values import hostname, keyed, mapping, positive_int

RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour|d|day)\s*$")
RATE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def rate(value: Any) -> float:
    """`10/s`, `600/min`, `5000/h`, `20000/d` as messages per second; 0 or null: no limit."""
    if value in (0, None):
        return 0.0
    match = RATE_RE.match(str(value)) if not isinstance(value, bool) else None
    if match is None:
        raise ValueError(f"{value!r} is not a rate (use 10/s, 600/min, 5000/h or 0)")
    per_second = float(match.group(1)) / RATE_UNITS[match.group(2)[0]]
    if per_second <= 0:
        raise ValueError(f"{value!r}: a rate above 0, or 0 for no limit")
    return per_second


@dataclass(frozen=True)
class Limits:
    """One destination's limits: open connections (idle reused ones count) and messages/s."""

    connections: int = option(positive_int, 20)
    rate: float = option(rate, 0.0)  # messages per second; 0 = no limit


# Starting points for the big providers (their published guidance is "keep it modest and
# back off on 421"); "default" applies to every other destination, domain by domain.
DEFAULT_LIMITS = (
    ("default", Limits(20, 0.0)),
    ("gmail", Limits(10, 0.0)),
    ("outlook", Limits(10, 0.0)),
    ("yahoo", Limits(5, 0.0)),
    ("icloud", Limits(5, 0.0)),
)
LIMIT_KEYS = ("connections", "rate")


def destination_name(value: Any) -> str:
    """`default`, a provider name (from `providers`), or a recipient domain."""
    name = str(value).lower().rstrip(".")
    if "." in name:
        hostname(name)
    elif not re.match(r"^[a-z][a-z0-9_]*$", name):
        raise ValueError("not a provider name or a domain")
    return name


def destinations(value: Any) -> tuple[tuple[str, Limits], ...]:
    """{name: {connections, rate}} merged over DEFAULT_LIMITS, key by key."""
    merged = dict(DEFAULT_LIMITS)

    def limits(item: Any) -> Any:
        item = mapping(item, "connections and rate")
        unknown = sorted(set(map(str, item)) - set(LIMIT_KEYS))
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown key (known: {', '.join(LIMIT_KEYS)})")
        return item

    for name, item in keyed(value, "destination to limits", destination_name, limits):
        base = merged.get(name, merged["default"])
        try:
            merged[name] = Limits(
                positive_int(item.get("connections", base.connections)),
                rate(item.get("rate", base.rate if base.rate else 0)),
            )
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return tuple(merged.items())
