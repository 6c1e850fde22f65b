"""Configuration, the spool section: where the spool lives and how much of its file system
is kept free (the reserve itself is the spool's policy, relay.spool.reserve)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.config.schema import option
from relay.config.values import path


def min_free_bytes(value: Any) -> int | None:
    """Bytes (0 = no reserve), or "auto" (None: computed from the file system's size)."""
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a number of bytes (0 or more) nor auto")
    return value


@dataclass(frozen=True)
class SpoolConfig:
    path: Path = option(path, Path("/var/spool/relay"))
    # Below this many free bytes on the spool's file system, MAIL FROM gets 452 4.3.1.
    min_free: int | None = option(min_free_bytes, None)
