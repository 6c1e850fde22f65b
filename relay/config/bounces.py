"""Configuration, the bounces section: whether the relay tells senders what became of their
mail (delivery status notifications, RFC 3464; docs/bounces.md), how much of a message goes
back, who gets double bounces, and when a delay warning is sent."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from relay.config.idempotency import window
from relay.config.schema import option
from relay.config.values import boolean, count
from relay.mail.address import MAILBOX

MAILBOX_RE = re.compile(rf"^{MAILBOX}$")  # what a DSN can be sent to


def mailbox(value: Any) -> str:
    """An address (local@domain), or "" / null for none."""
    if value in ("", None):
        return ""
    if not isinstance(value, str) or len(value) > 254 or not MAILBOX_RE.match(value):
        raise ValueError(f"{value!r} is not an address (local@domain) nor empty")
    return value


def optional_duration(value: Any) -> float | None:
    """A duration of at least one second, or "" / null / 0 for off."""
    return None if value in ("", None, 0) else window(value)


@dataclass(frozen=True)
class BouncesConfig:
    # Send delivery status notifications to envelope senders; false: events only.
    enabled: bool = option(boolean, True)
    # RET=FULL returns the whole message up to this many bytes; a larger one, its headers.
    max_returned: int = option(count, 256 * 1024)
    # Gets a copy of double bounces (a failure of mail from <>); "" = nobody.
    postmaster: str = option(mailbox, "")
    # One "delayed" notice per message once it has waited this long; None = off.
    delay_warning: float | None = option(optional_duration, None)
