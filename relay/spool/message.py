"""Spool, the state model: a message's envelope and the delivery state of each recipient,
their ids, and the JSON form of a state file (format version 1, docs/spool.md)."""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from relay.mail.events import DEFAULT_TENANT
from relay.mail.reply import Reply

FORMAT_VERSION = 1
ID_RE = re.compile(r"^[0-9a-f]{20}$")
FINAL = frozenset({"delivered", "failed", "expired", "deleted"})
HISTORY_LIMIT = 100  # attempts kept per recipient (the oldest are dropped beyond that)
FAILED = frozenset({"failed", "expired"})


def new_id() -> str:
    """Sortable by arrival (48-bit milliseconds) and unique (32 random bits); safe as file name."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(4)}"


def is_id(text: str) -> bool:
    return ID_RE.match(text) is not None


@dataclass
class Recipient:
    """One envelope recipient and everything known about its delivery."""

    address: str
    status: str = "queued"  # queued | deferred | delivered | failed | expired | deleted
    attempts: int = 0
    first_attempt: float | None = None
    last_attempt: float | None = None
    reply: Reply | None = None
    mx: str | None = None
    ip: str | None = None
    # One entry per attempt: {"at", "outcome", "reply", "mx", "ip", "tls"}.
    history: list[dict[str, Any]] = field(default_factory=list)
    # RFC 3461 RCPT parameters: NOTIFY (None: not given, the default: FAILURE and DELAY at
    # the relay's discretion; else ["NEVER"] or some of SUCCESS, FAILURE, DELAY) and ORCPT
    # as "addr-type;address", xtext decoded ("rfc822;b@y"); None when not given.
    notify: list[str] | None = None
    orcpt: str | None = None

    def record(self, at: float, outcome: str, reply: Reply, mx: str | None, ip: str | None,
               tls: bool) -> None:  # fmt: skip
        """Apply one attempt's result: status, counters, last reply and the history line."""
        self.status = outcome
        self.attempts += 1
        self.first_attempt = self.first_attempt or at
        self.last_attempt = at
        self.reply, self.mx, self.ip = reply, mx, ip
        entry = {"at": at, "outcome": outcome, "reply": reply.as_dict(), "mx": mx, "ip": ip}
        self.history = [*self.history, {**entry, "tls": tls}][-HISTORY_LIMIT:]

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def as_dict(self) -> dict[str, Any]:
        data = dict(vars(self))
        data["domain"] = self.domain
        data["reply"] = self.reply.as_dict() if self.reply else None
        if self.status in FAILED:
            data["reason"] = "permanent" if self.status == "failed" else "expired"
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipient:
        reply = data.get("reply")
        return cls(
            address=str(data["address"]),
            status=str(data.get("status", "queued")),
            attempts=int(data.get("attempts", 0)),
            first_attempt=data.get("first_attempt"),
            last_attempt=data.get("last_attempt"),
            reply=Reply.from_dict(reply) if reply else None,
            mx=data.get("mx"),
            ip=data.get("ip"),
            history=list(data.get("history") or []),
            notify=data.get("notify"),
            orcpt=data.get("orcpt"),
        )


@dataclass
class Message:
    """The envelope and delivery state of one queued message (never its content)."""

    id: str
    sender: str
    recipients: list[Recipient]
    queued_at: float
    next_attempt: float
    size: int = 0
    attempts: int = 0
    smtputf8: bool = False
    client: dict[str, str] = field(default_factory=dict)
    dead_at: float | None = None
    requeued_at: float | None = None  # a requeue from the dead letters starts a fresh max_age
    held: bool = False  # `relay queue hold`: never attempted until released
    send_at: float | None = None  # X-Relay-Send-At: not attempted before this UTC time
    lane: str = "normal"  # priority lane: high | normal | low
    quota_until: float | None = None  # over its sending quota: not attempted before this time
    tenant: str = DEFAULT_TENANT  # the SMTP AUTH user that submitted it, else "default"
    batch_id: str | None = None  # X-Relay-Batch-Id: the application's batch
    # X-Relay-Idempotency-Key (the API's Idempotency-Key) and the hash of the content it
    # was given with (docs/spool.md "Idempotency keys"); None without a key.
    idempotency_key: str | None = None
    content_hash: str | None = None
    # RFC 3461 MAIL parameters: RET (FULL or HDRS; None: not given, HDRS is the default) and
    # ENVID, xtext decoded; None when not given.
    ret: str | None = None
    envid: str | None = None
    # dsn_of: the queue id of the message a delivery status notification the relay made
    # reports on (docs/bounces.md); None for mail from clients. delay_warned: when the one
    # delay warning for this message was queued (None: not yet).
    dsn_of: str | None = None
    delay_warned: float | None = None

    @property
    def born(self) -> float:
        """Start of the message's max_age window: its arrival, its scheduled time, the end of
        its quota wait, or its requeue from the dead letters."""
        return self.requeued_at or max(self.queued_at, self.send_at or 0.0, self.quota_until or 0.0)

    def scheduled(self, now: float) -> bool:
        """Waiting for its X-Relay-Send-At time."""
        return self.send_at is not None and self.send_at > now

    def over_quota(self, now: float) -> bool:
        """Waiting for room in its sending quota."""
        return self.quota_until is not None and self.quota_until > now

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if not r.final]

    def failed(self) -> list[Recipient]:
        return [r for r in self.recipients if r.status in FAILED]

    def as_dict(self) -> dict[str, Any]:
        data = dict(vars(self))
        data["version"] = FORMAT_VERSION
        data["recipients"] = [r.as_dict() for r in self.recipients]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Message:
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"unknown format version {data.get('version')!r}")
        recipients = [Recipient.from_dict(r) for r in data["recipients"]]
        if not recipients:
            raise ValueError("no recipients")
        return cls(
            id=str(data["id"]),
            sender=str(data["sender"]),
            recipients=recipients,
            queued_at=float(data["queued_at"]),
            next_attempt=float(data["next_attempt"]),
            size=int(data.get("size", 0)),
            attempts=int(data.get("attempts", 0)),
            smtputf8=bool(data.get("smtputf8", False)),
            client=dict(data.get("client") or {}),
            dead_at=data.get("dead_at"),
            requeued_at=data.get("requeued_at"),
            held=bool(data.get("held", False)),
            send_at=data.get("send_at"),
            lane=str(data.get("lane", "normal")),
            quota_until=data.get("quota_until"),
            tenant=str(data.get("tenant") or DEFAULT_TENANT),
            batch_id=data.get("batch_id"),
            idempotency_key=data.get("idempotency_key"),
            content_hash=data.get("content_hash"),
            ret=data.get("ret"),
            envid=data.get("envid"),
            dsn_of=data.get("dsn_of"),
            delay_warned=data.get("delay_warned"),
        )


def encode(msg: Message) -> bytes:
    """A state file's bytes: the message as compact JSON."""
    return json.dumps(msg.as_dict(), separators=(",", ":")).encode()
