"""Webhooks, the payload: which journal events an endpoint gets, the body and signed headers of
one delivery (Standard Webhooks), and what its answer means: done, again later (when), the
event failed for good, or the endpoint is gone."""

from __future__ import annotations

import json
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from standardwebhooks import Webhook

from relay.mail import events as names

ALL_TENANTS = "*"
# final_only: one event per recipient's end, never a deferral.
FINAL = frozenset(
    {names.DELIVERED, names.BOUNCED, names.EXPIRED, names.CANCELLED, names.SUPPRESSED}
)
# The retry schedule: after the first failure 5 s, then 5 min, ... 24 h; then parked.
SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 50400.0, 72000.0, 86400.0)
JITTER = 0.1  # a delay varies by up to this share either way, so endpoints are not hit in step
MAX_RETRY_AFTER = 86400.0
DONE, RETRY, FAILED, GONE = "done", "retry", "failed", "gone"


@dataclass(frozen=True)
class Verdict:
    """What an answer (or its absence) means for the event: DONE, RETRY (at `after` seconds
    from now, None: by the schedule), FAILED (a 4xx: never again) or GONE (410: stop the
    endpoint)."""

    outcome: str
    after: float | None = None


def wanted(
    event: Mapping[str, Any], kinds: Collection[str], tenants: Collection[str], final_only: bool
) -> bool:
    """Whether an endpoint with these settings gets this journal event."""
    name = event.get("event")
    if name not in kinds or (final_only and name not in FINAL):
        return False
    return ALL_TENANTS in tenants or event.get("tenant") in tenants


def body(event: Mapping[str, Any]) -> bytes:
    """`{"id", "type": "message.<event>", "created_at", "data"}`: data is the journal's event."""
    document = {
        "id": event["event_id"],
        "type": names.TYPE_PREFIX + str(event["event"]),
        "created_at": event["timestamp"],
        "data": dict(event),
    }
    return json.dumps(document, separators=(",", ":")).encode()


def headers(event_id: str, sent_at: float, data: bytes, secrets: Sequence[str]) -> dict[str, str]:
    """The Standard Webhooks headers: webhook-id (the event id, the same on every retry),
    webhook-timestamp, and webhook-signature with one `v1,` signature per secret, so keys
    rotate without a gap."""
    moment = datetime.fromtimestamp(int(sent_at), UTC)
    text = data.decode()
    signatures = [Webhook(secret).sign(event_id, moment, text) for secret in secrets]
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(int(sent_at)),
        "webhook-signature": " ".join(signatures),
        "content-type": "application/json",
    }


def verdict(status: int | None, retry_after: str | None = None, now: float = 0.0) -> Verdict:
    """The meaning of an HTTP status (None: a timeout or a connection that failed)."""
    if status is not None and 200 <= status < 300:
        return Verdict(DONE)
    if status == 410:
        return Verdict(GONE)
    if status is None or status == 429 or status >= 500:
        return Verdict(RETRY, waited(retry_after, now) if status in (429, 503) else None)
    return Verdict(FAILED)


def waited(retry_after: str | None, now: float) -> float | None:
    """Retry-After as seconds from now (RFC 9110 §10.2.3: seconds or an HTTP date); None when
    absent or unreadable, at most a day."""
    if not retry_after:
        return None
    text = retry_after.strip()
    if text.isdigit():
        return min(float(text), MAX_RETRY_AFTER)
    try:
        when = parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError):
        return None
    return min(max(0.0, when - now), MAX_RETRY_AFTER)


def next_delay(failures: int, rng: random.Random | None = None) -> float | None:
    """The delay after the failures-th failure (1-based), with jitter; None once the schedule
    is spent (the event is parked)."""
    if failures > len(SCHEDULE):
        return None
    base = SCHEDULE[failures - 1]
    return base * (1 + JITTER * (2 * (rng or random).random() - 1))
