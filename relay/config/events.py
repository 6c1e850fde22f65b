"""Configuration, the events section: how long the event journal and the message history keep
what happened (docs/events.md)."""

from __future__ import annotations

from dataclasses import dataclass

from relay.config.schema import option
from relay.config.values import duration


@dataclass(frozen=True)
class EventsConfig:
    # Events, and messages that ended, are kept this long in the journal and the history.
    retention: float = option(duration, 7 * 86400.0)
