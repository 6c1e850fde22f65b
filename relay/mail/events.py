"""Mail, events: the names of what happens to a message or a recipient (one vocabulary for the
event journal and the log lines, docs/events.md) and the pure function that builds one event."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from relay.mail.category import categorize
from relay.mail.reply import Reply
from relay.mail.waiting import waiting_state

RECEIVED = "received"
DEFERRED = "deferred"
DELIVERED = "delivered"
BOUNCED = "bounced"  # a permanent failure
EXPIRED = "expired"
CANCELLED = "cancelled"
HELD = "held"
RELEASED = "released"
REQUEUED = "requeued"
DEAD_LETTERED = "dead_lettered"
SUPPRESSED = "suppressed"  # a recipient on its tenant's suppression list, dropped unsent
NAMES = frozenset(
    {RECEIVED, DEFERRED, DELIVERED, BOUNCED, EXPIRED, CANCELLED, HELD, RELEASED, REQUEUED,
     DEAD_LETTERED, SUPPRESSED}
)  # fmt: skip
# An event's type where applications see it (webhook bodies, the event stream): message.<event>.
TYPE_PREFIX = "message."
# The events that carry a recipient's bounce category (relay.mail.category).
CATEGORIZED = frozenset({DEFERRED, BOUNCED, EXPIRED})
ABOUT_RECIPIENT = frozenset({DEFERRED, DELIVERED, BOUNCED, EXPIRED, CANCELLED, SUPPRESSED})
# The event of an attempt's result, by the recipient's status after it (the state file's words).
OF_ATTEMPT = {"deferred": DEFERRED, "delivered": DELIVERED, "failed": BOUNCED}
DEFAULT_TENANT = "default"  # the tenant of mail submitted without SMTP AUTH (or an API token)
# A recipient's status in an event: the state file's, with queued and deferred as "pending".
PENDING = "pending"
# A finished message's status, when all its recipients ended alike (else "partial").
FINISHED = {"delivered": "delivered", "failed": "bounced", "expired": "expired",
            "deleted": "cancelled"}  # fmt: skip
PARTIAL = "partial"


class Recipient(Protocol):
    """What an event reads of a recipient (relay.spool.message.Recipient)."""

    @property
    def address(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def attempts(self) -> int: ...
    @property
    def reply(self) -> Reply | None: ...
    @property
    def mx(self) -> str | None: ...
    @property
    def ip(self) -> str | None: ...
    @property
    def notify(self) -> list[str] | None: ...
    @property
    def orcpt(self) -> str | None: ...


class Envelope(Protocol):
    """What an event reads of a message (relay.spool.message.Message)."""

    @property
    def id(self) -> str: ...
    @property
    def sender(self) -> str: ...
    @property
    def tenant(self) -> str: ...
    @property
    def batch_id(self) -> str | None: ...
    @property
    def size(self) -> int: ...
    @property
    def lane(self) -> str: ...
    @property
    def send_at(self) -> float | None: ...
    @property
    def held(self) -> bool: ...
    @property
    def attempts(self) -> int: ...
    @property
    def quota_until(self) -> float | None: ...
    @property
    def ret(self) -> str | None: ...
    @property
    def envid(self) -> str | None: ...
    @property
    def recipients(self) -> Sequence[Recipient]: ...


class Result(Protocol):
    """What an event reads of one attempt's result for a recipient (the delivery's report)."""

    @property
    def reply(self) -> Reply: ...
    @property
    def mx(self) -> str | None: ...
    @property
    def ip(self) -> str | None: ...
    @property
    def tls(self) -> bool: ...


def record(
    name: str,
    msg: Envelope,
    now: float,
    rcpt: Recipient | None = None,
    result: Result | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """One event (docs/events.md "One event") without the `event_id` and `timestamp` the
    journal gives it when it is written. now is the time of the change (a message's status
    depends on it); fields add the event's own (next_attempt, rcpts, reason)."""
    if name not in NAMES:
        raise ValueError(f"event {name!r} is not in the vocabulary")
    out: dict[str, Any] = {
        "event": name, "id": msg.id, "tenant": msg.tenant, "batch_id": msg.batch_id,
        "sender": msg.sender,
    }  # fmt: skip
    if rcpt is None:
        out["status"] = message_status(msg, now)
    else:
        out.update(rcpt=rcpt.address, status=recipient_status(rcpt.status))
        out.update(_attempt(rcpt, result) if result is not None else _last(rcpt))
        if name in CATEGORIZED:
            out["category"] = categorize(result.reply if result is not None else rcpt.reply)
    if name == RECEIVED:
        out.update(rcpts=[r.address for r in msg.recipients], size=msg.size, lane=msg.lane,
                   send_at=msg.send_at)  # fmt: skip
        out.update(dsn_fields(msg))
    out.update(fields)
    return out


def dsn_fields(msg: Envelope) -> dict[str, Any]:
    """A `received` event's RFC 3461 parameters, only when the client gave any: {"dsn": {"ret",
    "envid", "recipients": {address: {"notify", "orcpt"}}}}, the recipients without any left
    out."""
    rcpts = {
        r.address: {"notify": r.notify, "orcpt": r.orcpt}
        for r in msg.recipients
        if r.notify is not None or r.orcpt is not None
    }
    if msg.ret is None and msg.envid is None and not rcpts:
        return {}
    return {"dsn": {"ret": msg.ret, "envid": msg.envid, "recipients": rcpts}}


def _attempt(rcpt: Recipient, result: Result) -> dict[str, Any]:
    """The attempt's number, the remote reply and where it came from."""
    return {"attempt": rcpt.attempts, **reply_fields(result.reply), "mx": result.mx,
            "ip": result.ip, "tls": result.tls}  # fmt: skip


def _last(rcpt: Recipient) -> dict[str, Any]:
    """The recipient's last reply and the host that gave it, where it had one (expired)."""
    if rcpt.reply is None:
        return {}
    return {**reply_fields(rcpt.reply), "mx": rcpt.mx, "ip": rcpt.ip}


def reply_fields(reply: Reply) -> dict[str, Any]:
    """A reply as the log lines carry it: its whole text, code and enhanced code."""
    return {"reply": str(reply), "code": reply.code, "enhanced": reply.enhanced}


def recipient_status(status: str) -> str:
    """pending (queued, deferred), delivered, failed, expired or deleted."""
    return PENDING if status in ("queued", "deferred") else status


def message_status(msg: Envelope, now: float) -> str:
    """While a recipient is pending, why the message waits (held, scheduled, quota, deferred,
    queued); once none is: delivered, bounced, expired or cancelled when all ended alike,
    else partial."""
    ended = {r.status for r in msg.recipients}
    if ended & {"queued", "deferred"}:
        return waiting_state(
            held=msg.held,
            scheduled=msg.send_at is not None and msg.send_at > now,
            quota=msg.quota_until is not None and msg.quota_until > now,
            attempted=msg.attempts > 0 or any(r.attempts for r in msg.recipients),
        )
    return FINISHED.get(ended.pop(), PARTIAL) if len(ended) == 1 else PARTIAL


def seconds(timestamp: str | None) -> float | None:
    """UTC epoch seconds of an event's ISO 8601 time (iso's inverse; None stays None)."""
    if timestamp is None:
        return None
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def iso(moment: float | None) -> str | None:
    """UTC ISO 8601 with microseconds and Z, as events carry times."""
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
