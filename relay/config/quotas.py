"""Configuration, the quotas section: sending quotas per SMTP user and per sender domain,
each a message count per window, and what happens to mail over one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relay.config.schema import option
from relay.config.values import DURATION_RE, choice, duration, keyed, positive_int

QUOTA_WINDOWS = {"hourly": 3600.0, "daily": 86400.0}


def quota_windows(value: Any) -> tuple[tuple[float, int], ...]:
    """{hourly: N, daily: N, "10m": N, …}: at most N messages per window of that length."""

    def window(key: Any) -> float:
        text = str(key)
        if text in QUOTA_WINDOWS:
            return QUOTA_WINDOWS[text]
        if not DURATION_RE.match(text) or duration(text) < 1:
            raise ValueError("not hourly, daily or a duration of 1s or more")
        return duration(text)

    windows = keyed(value, "window to message count", window, positive_int)
    if not windows:
        raise ValueError("give at least one window (hourly, daily, or a duration)")
    return tuple(sorted(windows))


def quota_table(value: Any) -> tuple[tuple[str, tuple[tuple[float, int], ...]], ...]:
    return keyed(value, "name to quota windows", lambda k: str(k).lower(), quota_windows)


@dataclass(frozen=True)
class QuotasConfig:
    # Over quota: hold (accept; wait with reason quota until the window has room) or refuse
    # (452 4.7.1 at DATA).
    action: str = option(choice("hold", "refuse"), "hold")
    users: tuple[tuple[str, tuple[tuple[float, int], ...]], ...] = option(quota_table, ())
    sender_domains: tuple[tuple[str, tuple[tuple[float, int], ...]], ...] = option(quota_table, ())
