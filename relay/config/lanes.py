"""Configuration, the lanes section: priority lanes of mail by SMTP user, listener and
header, and the share of dispatches low-priority mail is sure to get."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relay.config.schema import option
from relay.config.values import boolean, choice, keyed

LANES = ("high", "normal", "low")
LISTENERS = ("relay", "submission", "smtps")


def lane(value: Any) -> str:
    return choice(*LANES)(value)


def share(value: Any) -> float:
    """A share of capacity above 0 (0 would starve the lane) and at most 0.5."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 0.5:
        raise ValueError(f"{value!r} is not a share above 0 and at most 0.5")
    return float(value)


def user_lanes(value: Any) -> tuple[tuple[str, str], ...]:
    return keyed(value, "SMTP user to lane", str, lane)


def listener_lanes(value: Any) -> tuple[tuple[str, str], ...]:
    return keyed(value, "listener to lane", choice(*LISTENERS), lane)


@dataclass(frozen=True)
class LanesConfig:
    # While low-priority mail waits, it gets at least this share of dispatches, however busy
    # the high and normal lanes are (high otherwise always goes first, then normal).
    low_share: float = option(share, 0.1)
    # Lane of mail from these SMTP users, and from these listeners (relay, submission, smtps);
    # X-Relay-Priority (high, normal, low) in the message overrides both when header is true.
    users: tuple[tuple[str, str], ...] = option(user_lanes, ())
    listeners: tuple[tuple[str, str], ...] = option(listener_lanes, ())
    header: bool = option(boolean, True)
