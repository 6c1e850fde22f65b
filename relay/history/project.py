"""History, the projection: each journal event applied to the messages and recipients tables,
in the transaction that stores it (a duplicate event_id changes nothing)."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from relay.mail import events as names
from relay.mail.events import seconds

# A recipient's status in the history: the state file's words, as the API says them.
RECIPIENT_STATUS = {"pending": "pending", "delivered": "delivered", "failed": "bounced",
                    "expired": "expired", "deleted": "cancelled"}  # fmt: skip
FINAL = frozenset({"delivered", "bounced", "expired", "cancelled"})
PARTIAL = "partial"
PENDING = "pending"


def apply(db: sqlite3.Connection, event: dict[str, Any]) -> bool:
    """Store event and bring its message and recipient up to date; False if it was stored
    already (a writer's retry after a crash repeats events, never their ids)."""
    at = seconds(event["timestamp"]) or 0.0
    added = db.execute(
        "INSERT OR IGNORE INTO events (event_id, event, id, rcpt, at, data) VALUES (?,?,?,?,?,?)",
        (event["event_id"], event["event"], event["id"], event.get("rcpt"), at,
         json.dumps(event, separators=(",", ":"))),
    ).rowcount  # fmt: skip
    if not added:
        return False
    _message(db, event, at)
    name = event["event"]
    if name == names.RECEIVED:
        _received(db, event, at)
    elif name in names.ABOUT_RECIPIENT and event.get("rcpt"):
        _recipient(db, event, at)
    elif name in (names.HELD, names.RELEASED):
        db.execute("UPDATE messages SET held=? WHERE id=?", (name == names.HELD, event["id"]))
    elif name == names.REQUEUED:
        _requeued(db, event, at)
    _settle(db, event["id"], at)
    return True


def _message(db: sqlite3.Connection, event: dict[str, Any], at: float) -> None:
    """The message's row, made from whichever of its events comes first (every event names
    its tenant, sender and batch)."""
    db.execute(
        "INSERT OR IGNORE INTO messages (id, tenant, sender, batch_id, status, updated_at)"
        " VALUES (?,?,?,?,?,?)",
        (event["id"], event.get("tenant") or names.DEFAULT_TENANT, event.get("sender", ""),
         event.get("batch_id"), PENDING, at),
    )  # fmt: skip


def _received(db: sqlite3.Connection, event: dict[str, Any], at: float) -> None:
    db.execute(
        "UPDATE messages SET queued_at=?, send_at=?, lane=?, size=? WHERE id=?",
        (at, seconds(event.get("send_at")) if isinstance(event.get("send_at"), str)
         else event.get("send_at"), event.get("lane"), event.get("size"), event["id"]),
    )  # fmt: skip
    db.executemany(
        "INSERT OR IGNORE INTO recipients (id, address, status, updated_at) VALUES (?,?,?,?)",
        [(event["id"], address, PENDING, at) for address in event.get("rcpts", [])],
    )


def _recipient(db: sqlite3.Connection, event: dict[str, Any], at: float) -> None:
    status = RECIPIENT_STATUS.get(event.get("status", ""), PENDING)
    row = (
        event["id"], event["rcpt"], status, event.get("attempt") or 0, event.get("code"),
        event.get("enhanced"), event.get("reply"), event.get("mx"), event.get("ip"),
        _tls(event.get("tls")), seconds(event.get("next_attempt")), at,
    )  # fmt: skip
    db.execute(
        "INSERT INTO recipients (id, address, status, attempts, code, enhanced, text, mx, ip,"
        " tls, next_attempt, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
        " ON CONFLICT (id, address) DO UPDATE SET status=excluded.status,"
        " attempts=MAX(attempts, excluded.attempts), updated_at=excluded.updated_at,"
        " next_attempt=excluded.next_attempt,"
        " code=COALESCE(excluded.code, code), enhanced=COALESCE(excluded.enhanced, enhanced),"
        " text=COALESCE(excluded.text, text), mx=COALESCE(excluded.mx, mx),"
        " ip=COALESCE(excluded.ip, ip), tls=COALESCE(excluded.tls, tls)",
        row,
    )
    if event.get("attempt"):
        db.execute(
            "UPDATE messages SET attempts=MAX(attempts, ?) WHERE id=?",
            (event["attempt"], event["id"]),
        )


def _requeued(db: sqlite3.Connection, event: dict[str, Any], at: float) -> None:
    """Back from the dead letters: its failed and expired recipients are pending again."""
    db.execute(
        "UPDATE recipients SET status=?, updated_at=? WHERE id=? AND status IN (?, ?)",
        (PENDING, at, event["id"], "bounced", "expired"),
    )


def _settle(db: sqlite3.Connection, msg_id: str, at: float) -> None:
    """The message's status from its recipients': pending while one is, else how they all
    ended (partial when not alike), with the time it ended."""
    ended = {row[0] for row in db.execute("SELECT status FROM recipients WHERE id=?", (msg_id,))}
    if not ended or PENDING in ended:
        status, finished = PENDING, None
    else:
        status, finished = (ended.pop() if len(ended) == 1 else PARTIAL), at
    db.execute(
        "UPDATE messages SET status=?, finished_at=?, updated_at=? WHERE id=?",
        (status, finished, at, msg_id),
    )


def _tls(value: Any) -> str | None:
    """The TLS an attempt used as the history keeps it: a version, or None for none."""
    if value in (None, False, ""):
        return None
    return "TLS" if value is True else str(value)
