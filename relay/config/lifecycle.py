"""Configuration, the lifecycle section: how long a stop waits for work in flight."""

from __future__ import annotations

from dataclasses import dataclass

from relay.config.schema import option
from relay.config.values import duration


@dataclass(frozen=True)
class LifecycleConfig:
    # SIGTERM: how long SMTP sessions and deliveries in flight may take to finish.
    grace: float = option(duration, 30.0)
