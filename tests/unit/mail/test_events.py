"""The event vocabulary and the pure builder of one event (docs/events.md), table-driven."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from relay.mail import events
from relay.mail.reply import Reply
from relay.observe import logs
from relay.spool.message import Message, Recipient

NOW = 1_800_000_000.0


@dataclass(frozen=True)
class Result:
    reply: Reply
    mx: str | None
    ip: str | None
    tls: bool


def message(*statuses: str, **fields: object) -> Message:
    rcpts = [Recipient(f"u{n}@a.test", status=s) for n, s in enumerate(statuses or ("queued",))]
    msg = Message("0" * 20, "app@s.test", rcpts, NOW - 60, NOW - 60, size=321)
    for name, value in fields.items():
        setattr(msg, name, value)
    return msg


def test_the_log_vocabulary_holds_every_event_and_no_old_name() -> None:
    assert events.NAMES <= logs.EVENTS
    assert {"failed", "deleted"}.isdisjoint(logs.EVENTS)


@pytest.mark.parametrize(
    ("statuses", "fields", "status"),
    [
        (("queued",), {}, "queued"),
        (("queued",), {"send_at": NOW + 10}, "scheduled"),
        (("queued",), {"send_at": NOW - 10}, "queued"),
        (("queued",), {"quota_until": NOW + 10}, "quota"),
        (("queued", "delivered"), {"attempts": 1}, "deferred"),
        (("deferred",), {"held": True, "send_at": NOW + 10}, "held"),
        (("delivered", "delivered"), {}, "delivered"),
        (("failed",), {}, "bounced"),
        (("expired", "expired"), {}, "expired"),
        (("deleted",), {}, "cancelled"),
        (("delivered", "failed"), {}, "partial"),
        (("deleted", "expired"), {}, "partial"),
    ],
)
def test_a_message_status(
    statuses: tuple[str, ...], fields: dict[str, object], status: str
) -> None:
    assert events.message_status(message(*statuses, **fields), NOW) == status


def test_received_carries_the_envelope() -> None:
    msg = message("queued", "queued", tenant="alice", batch_id="b-1", send_at=NOW + 5, lane="low")
    assert events.record(events.RECEIVED, msg, NOW) == {
        "event": "received", "id": msg.id, "tenant": "alice", "batch_id": "b-1",
        "sender": "app@s.test", "status": "scheduled", "rcpts": ["u0@a.test", "u1@a.test"],
        "size": 321, "lane": "low", "send_at": NOW + 5,
    }  # fmt: skip


def test_an_attempt_carries_the_reply_and_where_it_came_from() -> None:
    msg = message("deferred")
    rcpt = msg.recipients[0]
    rcpt.attempts = 2
    result = Result(Reply(451, "4.7.1", "greylisted"), "mx.a.test", "192.0.2.1", True)
    got = events.record(events.DEFERRED, msg, NOW, rcpt, result, next_attempt=events.iso(NOW))
    assert got == {
        "event": "deferred", "id": msg.id, "tenant": "default", "batch_id": None,
        "sender": "app@s.test", "rcpt": "u0@a.test", "status": "pending", "attempt": 2,
        "reply": "451 4.7.1 greylisted", "code": 451, "enhanced": "4.7.1", "mx": "mx.a.test",
        "ip": "192.0.2.1", "tls": True, "category": "policy",
        "next_attempt": "2027-01-15T08:00:00.000000Z",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("status", "reply", "extra"),
    [
        ("expired", Reply(451, None, "later"), {"reply": "451 later", "code": 451,
                                               "enhanced": None, "mx": "mx", "ip": None}),
        ("expired", None, {}),
        ("deleted", None, {}),
    ],
)  # fmt: skip
def test_a_recipient_event_without_an_attempt_keeps_its_last_reply(
    status: str, reply: Reply | None, extra: dict[str, object]
) -> None:
    msg = message(status)
    msg.recipients[0].reply, msg.recipients[0].mx = reply, "mx" if reply else None
    got = events.record(events.EXPIRED, msg, NOW, msg.recipients[0])
    assert got == {
        "event": "expired", "id": msg.id, "tenant": "default", "batch_id": None,
        "sender": "app@s.test", "rcpt": "u0@a.test", "status": status, **extra,
        "category": "unknown",  # no reply, or one that says nothing more
    }  # fmt: skip


def test_a_name_outside_the_vocabulary_is_refused() -> None:
    with pytest.raises(ValueError, match="vocabulary"):
        events.record("failed", message(), NOW)


@pytest.mark.parametrize(
    ("status", "shown"),
    [("queued", "pending"), ("deferred", "pending"), ("delivered", "delivered"),
     ("failed", "failed"), ("expired", "expired"), ("deleted", "deleted")],
)  # fmt: skip
def test_a_recipient_status(status: str, shown: str) -> None:
    assert events.recipient_status(status) == shown


def test_received_carries_the_dsn_parameters_only_when_given() -> None:
    """RFC 3461: RET and ENVID on the message, NOTIFY and ORCPT per recipient that had any."""
    plain = events.record(events.RECEIVED, message("queued", "queued"), NOW)
    assert "dsn" not in plain
    msg = message("queued", "queued", ret="HDRS", envid="abc+d")
    msg.recipients[1].notify, msg.recipients[1].orcpt = ["FAILURE", "DELAY"], "rfc822;u1@a.test"
    dsn = events.record(events.RECEIVED, msg, NOW)["dsn"]
    assert dsn == {
        "ret": "HDRS",
        "envid": "abc+d",
        "recipients": {"u1@a.test": {"notify": ["FAILURE", "DELAY"], "orcpt": "rfc822;u1@a.test"}},
    }
    msg = message("queued")
    msg.recipients[0].notify = ["NEVER"]
    assert events.record(events.RECEIVED, msg, NOW)["dsn"] == {
        "ret": None, "envid": None, "recipients": {"u0@a.test": {"notify": ["NEVER"], "orcpt": None}},
    }  # fmt: skip
