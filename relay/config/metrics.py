"""Configuration, the metrics section: where the supervisor's HTTP endpoint listens."""

from __future__ import annotations

from dataclasses import dataclass

from relay.config.schema import option
from relay.config.values import HostPort, host_port


@dataclass(frozen=True)
class MetricsConfig:
    listen: HostPort = option(host_port, ("127.0.0.1", 9025))
