"""Suppression, the automatic entries: the event journal read like the history reads it (each
file's offset stored in the transaction that applies its events, so a crash neither loses nor
counts twice), a hard bounce put on the list at once and repeated soft bounces counted toward
an on_hold (docs/suppression.md "Automatic entries")."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.config.suppression import SuppressionConfig
from relay.mail import events as names
from relay.mail.category import BAD_DOMAIN, INVALID_RECIPIENT, categorize
from relay.mail.reply import Reply
from relay.observe import logs
from relay.spool import cursor, journal
from relay.suppression import store
from relay.suppression.store import HARD_BOUNCE, ON_HOLD, SHARED, Entry

# What a permanent failure must say to suppress its address: it or its domain does not exist
# (policy and spam blocks say nothing about the address).
HARD = frozenset({INVALID_RECIPIENT, BAD_DOMAIN})
FAILURES = """
CREATE TABLE IF NOT EXISTS failures (
    tenant TEXT NOT NULL,
    address TEXT NOT NULL,
    count INTEGER NOT NULL,                 -- temporary failures counted toward on_hold
    first REAL NOT NULL,                    -- the first one counted (the window starts there)
    last REAL NOT NULL,                     -- the last one counted (the spacing runs from it)
    PRIMARY KEY (tenant, address)
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class Count:
    """An address's temporary failures counted so far."""

    failures: int
    first: float
    last: float


def counted(prior: Count | None, at: float, cfg: SuppressionConfig) -> tuple[Count | None, bool]:
    """A temporary failure at `at` after prior: the new count, and whether the address goes
    on hold now (the count then starts afresh). One closer than on_hold_spacing to the last
    counted is not counted; a count whose first is older than on_hold_window starts again."""
    if cfg.on_hold == 0:
        return prior, False
    if prior is not None and at - prior.first > cfg.on_hold_window:
        prior = None
    if prior is not None and at - prior.last < cfg.on_hold_spacing:
        return prior, False
    now = Count(1, at, at) if prior is None else Count(prior.failures + 1, prior.first, at)
    return (None, True) if now.failures >= cfg.on_hold else (now, False)


def tenant_of(event: dict[str, Any], cfg: SuppressionConfig) -> str:
    """Whose list an event's recipient goes on."""
    return SHARED if cfg.shared else str(event.get("tenant") or names.DEFAULT_TENANT)


def category_of(event: dict[str, Any]) -> str:
    """The event's bounce category, or the one its reply gives (events written before
    categories existed)."""
    if event.get("category"):
        return str(event["category"])
    text = str(event.get("reply") or "")
    return categorize(Reply(event.get("code"), event.get("enhanced"), text))


class Feed(cursor.Reader):
    """The journal's reader that keeps the automatic entries, in the store's own file."""

    def __init__(self, path: Path, settings: Callable[[], SuppressionConfig]) -> None:
        db = store.connect(path)
        db.executescript(FAILURES)
        super().__init__(db)
        self.settings = settings

    def take(self, file: str, events: Sequence[dict[str, Any]], offset: int) -> int:
        """Apply events read from file up to offset, in one transaction with the new offset;
        returns how many were read."""
        cfg = self.settings()
        with self.transaction():
            added = [e for e in (self._apply(event, cfg) for event in events) if e is not None]
            self.advance(file, offset)
        for entry in added:
            logs.event("suppression_added", tenant=entry.tenant, address=entry.address,
                       kind=entry.kind, reason=entry.reason, expires=entry.expires)  # fmt: skip
        return len(events)

    def _apply(self, event: dict[str, Any], cfg: SuppressionConfig) -> Entry | None:
        name, rcpt = event.get("event"), event.get("rcpt")
        if name not in (names.BOUNCED, names.DEFERRED, names.DELIVERED) or not rcpt:
            return None
        key = (tenant_of(event, cfg), str(rcpt).lower())
        at = _seconds(event)
        if name == names.DELIVERED:
            self.db.execute("DELETE FROM failures WHERE tenant=? AND address=?", key)
            return None
        if name == names.BOUNCED:
            if category_of(event) not in HARD:
                return None
            return self._put(event, key, HARD_BOUNCE, at + cfg.hard_bounce_for, at)
        prior = self._count(key)
        now, hold = counted(prior, at, cfg)
        if now != prior:
            self._store_count(key, now)
        return self._put(event, key, ON_HOLD, at + cfg.on_hold_for, at) if hold else None

    def _put(
        self, event: dict[str, Any], key: tuple[str, str], kind: str, expires: float, at: float
    ) -> Entry | None:
        self.db.execute("DELETE FROM failures WHERE tenant=? AND address=?", key)
        entry = Entry(key[0], key[1], kind, str(event.get("reply") or ""), at, expires)
        written = store.put(self.db, entry, only_over_automatic=True, now=at)
        return entry if written else None

    def _count(self, key: tuple[str, str]) -> Count | None:
        row = self.db.execute(
            "SELECT count, first, last FROM failures WHERE tenant=? AND address=?", key
        ).fetchone()
        return None if row is None else Count(*row)

    def _store_count(self, key: tuple[str, str], count: Count | None) -> None:
        if count is None:
            self.db.execute("DELETE FROM failures WHERE tenant=? AND address=?", key)
            return
        self.db.execute(
            "INSERT OR REPLACE INTO failures (tenant, address, count, first, last)"
            " VALUES (?,?,?,?,?)",
            (*key, count.failures, count.first, count.last),
        )

    def prune(self, directory: Path, now: float) -> None:
        """Forget expired entries, counts past their window, and the offsets of journal files
        that are gone."""
        window = self.settings().on_hold_window
        with self.transaction():
            self.db.execute("DELETE FROM entries WHERE expires <= ?", (now,))
            self.db.execute("UPDATE meta SET value = value + 1 WHERE key = 'patterns'")
            self.db.execute("DELETE FROM failures WHERE first < ?", (now - window,))
        self.forget_files([path.name for path in journal.files(directory)])


def _seconds(event: dict[str, Any]) -> float:
    """The event's time, UTC epoch seconds (its ISO 8601 timestamp)."""
    stamp = event.get("timestamp")
    at = names.seconds(stamp) if isinstance(stamp, str) else None
    return time.time() if at is None else at


async def follow(feed: Feed, directory: Path, stop: asyncio.Event) -> None:
    """Keep the automatic entries caught up with the journal until stop is set; prune at the
    start and once an hour. A writer that held the file too long is logged and tried again
    at the next look."""

    def catch_up() -> int:
        try:
            return cursor.catch_up(feed, directory, feed.take)
        except sqlite3.Error as exc:
            logs.failure("suppression", exc)
            return 0

    def prune() -> bool:
        try:
            feed.prune(directory, time.time())
        except sqlite3.Error as exc:
            logs.failure("suppression", exc)
            return False
        return True

    await cursor.follow(catch_up, prune, stop)
