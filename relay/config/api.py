"""Configuration, the api section: where the HTTP API listens, the file of its tokens, and how
many event streams one token may hold open."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.config.schema import option
from relay.config.values import HostPort, host_port, optional_path, positive_int


def optional_host_port(value: Any) -> HostPort | None:
    """`host:port`, or "" / null for "off"."""
    return None if value in ("", None) else host_port(value)


@dataclass(frozen=True)
class ApiConfig:
    # The HTTP API's listener (its own process); "" = no API. Restart to change it.
    listen: HostPort | None = option(optional_host_port, ("127.0.0.1", 8025))
    # The API's bearer tokens (`relay token add`); empty = no token, every /v1 call is 401.
    tokens_file: Path | None = option(optional_path, None)
    # Open GET /v1/events streams one token may hold; the next one is answered 429.
    max_streams_per_token: int = option(positive_int, 5)
