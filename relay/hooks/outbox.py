"""Webhooks, the outbox: one SQLite file per endpoint in the spool (`hooks/<name>.sqlite`, WAL)
holding how far it has read each journal file and the events it still owes the endpoint.
Events are taken in with the files' new offsets in one transaction and deleted only once the
endpoint took them, so a crash repeats deliveries (same webhook-id) and never skips one."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.hooks.payload import body
from relay.mail.events import seconds
from relay.spool.cursor import Reader, connect

READY, PARKED = "ready", "parked"
TABLES = """
CREATE TABLE IF NOT EXISTS pending (
    event_id TEXT PRIMARY KEY,              -- orders deliveries; the webhook-id
    message TEXT NOT NULL,                  -- its message's id: one message's events in order
    created REAL NOT NULL,                  -- when the event happened (lag), UTC epoch
    body BLOB NOT NULL,                     -- the request body, made once
    failures INTEGER NOT NULL DEFAULT 0,
    due REAL NOT NULL,                      -- next try, UTC epoch
    state TEXT NOT NULL,                    -- ready, or parked once the schedule is spent
    error TEXT                              -- the last failure, for `relay webhook list`
);
CREATE INDEX IF NOT EXISTS pending_by_due ON pending (state, due, event_id);
CREATE INDEX IF NOT EXISTS pending_by_message ON pending (message, event_id);
CREATE TABLE IF NOT EXISTS flags (
    name TEXT PRIMARY KEY,                  -- disabled (a 410), last_error
    value TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Owed:
    """One event owed to the endpoint."""

    event_id: str
    body: bytes
    failures: int
    created: float


@dataclass(frozen=True)
class Backlog:
    """For metrics and the CLI: events ready and parked, and the oldest ready one's time."""

    ready: int
    parked: int
    oldest: float | None


class Outbox(Reader):
    """One endpoint's outbox; its methods may be called from worker threads, one at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(connect(path))
        self.db.executescript(TABLES)

    def take(
        self,
        file: str,
        events: Sequence[Mapping[str, Any]],
        offset: int,
        wanted: Callable[[Mapping[str, Any]], bool],
    ) -> int:
        """Owe the wanted events read from file up to offset, in one transaction with the new
        offset; how many were new (one already owed, or delivered and taken again after a
        crash, changes nothing but a repeat)."""
        now = time.time()
        rows = [
            (e["event_id"], str(e.get("id", "")), created(e, now), body(e), now, READY)
            for e in events
            if wanted(e)
        ]
        with self.transaction():
            before = self.db.total_changes
            self.db.executemany(
                "INSERT OR IGNORE INTO pending (event_id, message, created, body, due, state)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            added = self.db.total_changes - before
            self.advance(file, offset)
        return added

    def due(self, now: float, limit: int, skip: Sequence[str] = ()) -> list[Owed]:
        """The ready events due by now, oldest event first, but those in skip (in flight) and
        those whose message has an earlier event still owed (in flight, or waiting for its
        retry): one message's events reach the endpoint in order. A parked event holds back
        nothing."""
        with self.lock:
            rows = self.db.execute(
                "SELECT event_id, body, failures, created FROM pending AS p"
                " WHERE state=? AND due<=? AND NOT EXISTS (SELECT 1 FROM pending AS q"
                "  WHERE q.message=p.message AND q.state=? AND q.event_id<p.event_id)"
                " ORDER BY event_id LIMIT ?",
                (READY, now, READY, limit + len(skip)),
            ).fetchall()
        out = [Owed(r[0], bytes(r[1]), r[2], r[3]) for r in rows if r[0] not in set(skip)]
        return out[:limit]

    def next_due(self) -> float | None:
        with self.lock:
            row = self.db.execute("SELECT MIN(due) FROM pending WHERE state=?", (READY,)).fetchone()
        return None if row[0] is None else float(row[0])

    def done(self, event_id: str) -> None:
        """The endpoint took it (or refused it for good): owed no more."""
        with self.lock:
            self.db.execute("DELETE FROM pending WHERE event_id=?", (event_id,))

    def again(self, event_id: str, due: float | None, error: str) -> None:
        """A failure: try again at due, or park it (None: the schedule is spent)."""
        with self.transaction():
            if due is None:
                self.db.execute(
                    "UPDATE pending SET failures=failures+1, state=?, error=? WHERE event_id=?",
                    (PARKED, error, event_id),
                )
            else:
                self.db.execute(
                    "UPDATE pending SET failures=failures+1, due=?, error=? WHERE event_id=?",
                    (due, error, event_id),
                )
            self._set("last_error", error)

    def backlog(self) -> Backlog:
        with self.lock:
            ready, oldest = self.db.execute(
                "SELECT COUNT(*), MIN(created) FROM pending WHERE state=?", (READY,)
            ).fetchone()
            (parked,) = self.db.execute(
                "SELECT COUNT(*) FROM pending WHERE state=?", (PARKED,)
            ).fetchone()
        return Backlog(ready, parked, oldest)

    def flag(self, name: str) -> str | None:
        with self.lock:
            row = self.db.execute("SELECT value FROM flags WHERE name=?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def set_flag(self, name: str, value: str | None) -> None:
        """Set a flag (disabled: why), or clear it with None."""
        with self.lock:
            self._set(name, value)

    def requeue(self, since: float) -> int:
        """`relay webhook replay`: every owed event since `since`, parked ones too, due now."""
        with self.lock:
            cursor = self.db.execute(
                "UPDATE pending SET state=?, due=? WHERE created>=?", (READY, time.time(), since)
            )
        return cursor.rowcount

    def _set(self, name: str, value: str | None) -> None:
        if value is None:
            self.db.execute("DELETE FROM flags WHERE name=?", (name,))
        else:
            self.db.execute(
                "INSERT INTO flags (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value=excluded.value",
                (name, value),
            )


def created(event: Mapping[str, Any], default: float) -> float:
    """The event's time (its ISO 8601 timestamp) as UTC epoch seconds."""
    try:
        at = seconds(str(event["timestamp"]))
    except (KeyError, ValueError):
        return default
    return default if at is None else at
