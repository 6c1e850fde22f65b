"""Webhook payloads, in process: which events an endpoint gets, the body, signatures a
`standardwebhooks` receiver verifies (each of several secrets), what each answer means, and
the retry schedule."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from relay.hooks import payload
from relay.mail.events import NAMES

SECRET_A = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SECRET_B = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"
EVENT = {"event_id": "0001764583200000000-intake.0001-1", "event": "delivered",
         "timestamp": "2026-12-01T10:00:00.000000Z", "id": "019ad1c3e5f24b1e8a07",
         "rcpt": "ann@example.org", "tenant": "shop", "status": "delivered",
         "code": 250, "enhanced": "2.0.0", "reply": "ok"}  # fmt: skip


@pytest.mark.parametrize(
    ("event", "kinds", "tenants", "final_only", "expected"),
    [
        ("delivered", NAMES, ["*"], False, True),
        ("deferred", NAMES, ["*"], False, True),
        ("deferred", NAMES, ["*"], True, False),  # final_only: never a deferral
        ("received", NAMES, ["*"], True, False),
        ("bounced", NAMES, ["*"], True, True),
        ("bounced", ["delivered"], ["*"], False, False),
        ("delivered", NAMES, ["shop"], False, True),
        ("delivered", NAMES, ["other"], False, False),  # another tenant's hook
    ],
)
def test_which_events_an_endpoint_gets(
    event: str, kinds: Any, tenants: list[str], final_only: bool, expected: bool
) -> None:
    assert payload.wanted({**EVENT, "event": event}, kinds, tenants, final_only) is expected


def test_the_body_wraps_the_journal_event() -> None:
    document = json.loads(payload.body(EVENT))
    assert document == {"id": EVENT["event_id"], "type": "message.delivered",
                        "created_at": EVENT["timestamp"], "data": EVENT}  # fmt: skip


def test_a_standard_webhooks_receiver_verifies_each_secret() -> None:
    data = payload.body(EVENT)
    headers = payload.headers(EVENT["event_id"], time.time(), data, [SECRET_A, SECRET_B])
    assert headers["webhook-id"] == EVENT["event_id"]
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (SECRET_A, SECRET_B):  # either key verifies: rotation without a gap
        assert Webhook(secret).verify(data, headers) == json.loads(data)
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "A" * 32).verify(data, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_A).verify(data.replace(b"ann", b"bob"), headers)
    stale = payload.headers(EVENT["event_id"], time.time() - 3600, data, [SECRET_A])
    with pytest.raises(WebhookVerificationError):  # the timestamp is signed: no replay
        Webhook(SECRET_A).verify(data, stale)


NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("status", "retry_after", "outcome", "after"),
    [
        (200, None, payload.DONE, None),
        (204, None, payload.DONE, None),
        (410, None, payload.GONE, None),
        (None, None, payload.RETRY, None),  # timeout, refused connection
        (500, None, payload.RETRY, None),
        (502, "30", payload.RETRY, None),  # Retry-After is honoured on 429 and 503 only
        (503, "120", payload.RETRY, 120.0),
        (429, "7", payload.RETRY, 7.0),
        (429, "Fri, 15 Jan 2027 08:01:40 GMT", payload.RETRY, 100.0),
        (429, "999999", payload.RETRY, 86400.0),
        (429, "soon", payload.RETRY, None),
        (400, None, payload.FAILED, None),
        (404, None, payload.FAILED, None),
        (301, None, payload.FAILED, None),
    ],
)
def test_what_an_answer_means(
    status: int | None, retry_after: str | None, outcome: str, after: float | None
) -> None:
    assert payload.verdict(status, retry_after, NOW) == payload.Verdict(outcome, after)


def test_the_schedule_then_parked() -> None:
    rng = random.Random(7)
    delays = [payload.next_delay(n, rng) for n in range(1, len(payload.SCHEDULE) + 2)]
    assert delays[-1] is None
    for delay, base in zip(delays, payload.SCHEDULE, strict=False):
        assert delay is not None and base * 0.9 <= delay <= base * 1.1
    assert payload.SCHEDULE[:3] == (5.0, 300.0, 1800.0) and payload.SCHEDULE[-1] == 86400.0
