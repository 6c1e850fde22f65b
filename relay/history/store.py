"""History, the store: the one interface to the message history (take in journal events with
their files' offsets, query messages, batches and events, prune by retention), over SQLite
today and replaceable by a server database behind the same methods."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.history import project, schema
from relay.mail.events import DEFAULT_TENANT, iso
from relay.spool.cursor import Reader

MAX_LIMIT = 1000


@dataclass(frozen=True)
class Query:
    """What GET /v1/messages asks for; None is "any". cursor: the last id of the page before
    (ids sort by arrival, so new mail never shifts a later page)."""

    tenant: str | None = None
    status: str | None = None  # pending, or a final status (delivered, bounced, ...)
    recipient: str | None = None
    batch_id: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 100
    cursor: str | None = None


@dataclass(frozen=True)
class EventFilter:
    """Which events GET /v1/events streams; None or empty is "any". recipient matches the
    events about that recipient and the message-wide events of its messages."""

    tenant: str | None = None
    types: frozenset[str] = frozenset()
    message_id: str | None = None
    batch_id: str | None = None
    recipient: str | None = None


@dataclass(frozen=True)
class Stored:
    """One event as the stream sends it: its place in the history, its id and name, and the
    journal's JSON text of it (sent as it is stored)."""

    seq: int
    event_id: str
    event: str
    data: str


class History(Reader):
    """The message history in one SQLite file; one process writes it (the API's), any may read.
    Methods are safe to call from worker threads, one at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(schema.connect(path))

    # --- taking events in ----------------------------------------------------------------------

    def take(self, file: str, events: Sequence[dict[str, Any]], offset: int) -> int:
        """Apply events read from file up to offset, in one transaction with the new offset:
        a crash repeats none and loses none. Returns how many were new. Two callers may take
        the same file at once (the follower and a request catching up): the offset only grows,
        and an event taken twice changes nothing."""
        with self.transaction():
            added = sum(project.apply(self.db, event) for event in events)
            self.advance(file, offset)
        return added

    def prune(self, before: float) -> int:
        """Forget messages that ended before `before` (UTC epoch), with their recipients, and
        every event older than it; returns how many messages went."""
        with self.transaction():
            ids = [r[0] for r in self.db.execute(
                "SELECT id FROM messages WHERE finished_at IS NOT NULL AND finished_at < ?",
                (before,))]  # fmt: skip
            for table in ("messages", "recipients"):
                self.db.executemany(f"DELETE FROM {table} WHERE id=?", [(i,) for i in ids])
            self.db.execute("DELETE FROM events WHERE at < ?", (before,))
        return len(ids)

    # --- queries ---------------------------------------------------------------------------

    def messages(self, query: Query) -> tuple[list[dict[str, Any]], str | None]:
        """A page of messages, newest first, and the cursor of the next page (None: last)."""
        where, args = _where(query)
        limit = max(1, min(query.limit, MAX_LIMIT))
        sql = f"SELECT * FROM messages{where} ORDER BY id DESC LIMIT ?"
        with self.lock:
            rows = self.db.execute(sql, (*args, limit + 1)).fetchall()
            items = [self._item(row) for row in rows[:limit]]
        return items, (items[-1]["id"] if len(rows) > limit else None)

    def count(self) -> int:
        """How many messages the history knows."""
        with self.lock:
            return int(self.db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])

    def message(self, msg_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        """One message with its recipients and its events (None: unknown to this tenant)."""
        with self.lock:
            row = self.db.execute("SELECT * FROM messages WHERE id=?", (msg_id,)).fetchone()
            if row is None or (tenant is not None and row["tenant"] != tenant):
                return None
            item = self._item(row)
            item["events"] = [
                {"seq": seq, **project_json(data)}
                for seq, data in self.db.execute(
                    "SELECT seq, data FROM events WHERE id=? ORDER BY seq", (msg_id,)
                )
            ]
        return item

    def batch(self, batch_id: str, tenant: str | None = None) -> dict[str, int]:
        """How many of a batch's messages are in each status ({} when none is known)."""
        sql = "SELECT status, COUNT(*) FROM messages WHERE batch_id=?"
        args: list[Any] = [batch_id]
        if tenant is not None:
            sql, args = sql + " AND tenant=?", [*args, tenant]
        with self.lock:
            return dict(self.db.execute(sql + " GROUP BY status", args).fetchall())

    def batch_ids(self, batch_id: str, tenant: str | None = None) -> list[str]:
        """The ids of a batch's messages that are still pending."""
        sql = "SELECT id FROM messages WHERE batch_id=? AND status=?"
        args: list[Any] = [batch_id, project.PENDING]
        if tenant is not None:
            sql, args = sql + " AND tenant=?", [*args, tenant]
        with self.lock:
            return [row[0] for row in self.db.execute(sql + " ORDER BY id", args)]

    def last_seq(self) -> int:
        """The place of the newest event taken in (0: none yet)."""
        with self.lock:
            return int(self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])

    def seq_of(self, event_id: str) -> int | None:
        """The place of an event by its id; None when it is not (or no longer) in the history."""
        with self.lock:
            row = self.db.execute("SELECT seq FROM events WHERE event_id=?", (event_id,)).fetchone()
        return None if row is None else int(row[0])

    def events_after(self, after: int, wanted: EventFilter, limit: int) -> tuple[list[Stored], int]:
        """Up to limit events placed after `after` that wanted matches, in the order they were
        taken in (the stream's order), and where the next call starts: the last one's place
        when there may be more, else the newest place looked at, so that events taken in later
        are the next call's and none is seen twice or skipped."""
        where, args = _event_where(wanted)
        sql = f"SELECT seq, event_id, event, data FROM events WHERE seq > ?{where}"
        with self.lock:
            rows = self.db.execute(sql + " ORDER BY seq LIMIT ?", (after, *args, limit))
            found = [Stored(*row) for row in rows]
            if len(found) == limit:
                return found, found[-1].seq
            newest = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
        return found, max(after, int(newest))

    def _item(self, row: sqlite3.Row) -> dict[str, Any]:
        recipients = self.db.execute(
            "SELECT * FROM recipients WHERE id=? ORDER BY rowid", (row["id"],)
        ).fetchall()
        return {
            "id": row["id"], "tenant": row["tenant"], "sender": row["sender"],
            "batch_id": row["batch_id"], "status": row["status"], "held": bool(row["held"]),
            "queued_at": iso(row["queued_at"]), "send_at": iso(row["send_at"]),
            "finished_at": iso(row["finished_at"]), "lane": row["lane"], "size": row["size"],
            "attempts": row["attempts"], "recipients": [_recipient(r) for r in recipients],
        }  # fmt: skip


def reply(code: int | None, enhanced: str | None, text: str | None) -> dict[str, Any] | None:
    """A reply as the API and `relay queue show` give it: {code, enhanced, text}, the text
    without the code and enhanced code the events' `reply` starts with."""
    if code is None and text is None:
        return None
    words = (text or "").split(" ")
    for part in (str(code) if code is not None else None, enhanced):
        if part is not None and words and words[0] == part:
            words = words[1:]
    return {"code": code, "enhanced": enhanced, "text": " ".join(words)}


def _recipient(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "address": row["address"], "status": row["status"], "attempts": row["attempts"],
        "reply": reply(row["code"], row["enhanced"], row["text"]), "mx": row["mx"],
        "next_attempt": iso(row["next_attempt"]),
        "updated_at": iso(row["updated_at"]),
    }  # fmt: skip


def _where(query: Query) -> tuple[str, list[Any]]:
    """The WHERE clause of a messages query and its arguments."""
    clauses: list[str] = []
    args: list[Any] = []
    for column, value in (("tenant", query.tenant), ("status", query.status),
                          ("batch_id", query.batch_id)):  # fmt: skip
        if value is not None:
            clauses.append(f"{column}=?")
            args.append(value)
    if query.recipient is not None:
        clauses.append("id IN (SELECT id FROM recipients WHERE address=? COLLATE NOCASE)")
        args.append(query.recipient)
    for op, moment in ((">=", query.since), ("<", query.until)):
        if moment is not None:
            clauses.append(f"queued_at {op} ?")
            args.append(moment)
    if query.cursor is not None:
        clauses.append("id < ?")
        args.append(query.cursor)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), args


def _event_where(wanted: EventFilter) -> tuple[str, list[Any]]:
    """The clauses (each starting with AND) of an events query and their arguments."""
    clauses: list[str] = []
    args: list[Any] = []
    if wanted.tenant is not None:
        clauses.append("COALESCE(NULLIF(json_extract(data, '$.tenant'), ''), ?) = ?")
        args += [DEFAULT_TENANT, wanted.tenant]
    if wanted.types:
        clauses.append(f"event IN ({','.join('?' * len(wanted.types))})")
        args += sorted(wanted.types)
    if wanted.message_id is not None:
        clauses.append("id = ?")
        args.append(wanted.message_id)
    if wanted.batch_id is not None:
        clauses.append("json_extract(data, '$.batch_id') = ?")
        args.append(wanted.batch_id)
    if wanted.recipient is not None:
        clauses.append(
            "(rcpt = ? COLLATE NOCASE OR (rcpt IS NULL AND id IN"
            " (SELECT id FROM recipients WHERE address = ? COLLATE NOCASE)))"
        )
        args += [wanted.recipient, wanted.recipient]
    return "".join(f" AND {clause}" for clause in clauses), args


def project_json(data: str) -> dict[str, Any]:
    """An event as stored (the journal's JSON object)."""
    value = json.loads(data)
    return value if isinstance(value, dict) else {}
