"""Suppression, the store: every tenant's suppression list in one SQLite file next to the
message history (WAL). The API process and the CLI write it; the intake and the scheduler read
it, exact addresses by index and patterns from memory, reloaded when a change counter moves
(docs/suppression.md)."""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from relay.mail.events import iso
from relay.spool import cursor
from relay.suppression.patterns import Patterns, is_pattern, matches

FILE = "suppressions.sqlite"  # in the spool's history directory
HARD_BOUNCE, ON_HOLD, BLOCKLIST = "hard_bounce", "on_hold", "blocklist"
MANUAL, UNSUBSCRIBE, COMPLAINT = "manual", "unsubscribe", "complaint"
KINDS = (HARD_BOUNCE, ON_HOLD, BLOCKLIST, MANUAL, UNSUBSCRIBE, COMPLAINT)
AUTOMATIC = (HARD_BOUNCE, ON_HOLD)  # added from the journal; the others by hand
SHARED = "*"  # the tenant of every entry while suppression.shared is on
BUSY_TIMEOUT = 5.0  # seconds a writer waits for another's transaction
MAX_LIMIT = 1000

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    tenant TEXT NOT NULL,                   -- the tenant, or * for the shared list
    address TEXT NOT NULL,                  -- lowercase address, or a pattern with *
    pattern INTEGER NOT NULL,               -- 1: address is a pattern (matched in memory)
    kind TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,                  -- UTC epoch seconds
    expires REAL,                           -- NULL: never
    UNIQUE (tenant, address)
);
CREATE INDEX IF NOT EXISTS entries_patterns ON entries (pattern) WHERE pattern = 1;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('patterns', 0);
"""
COLUMNS = "rowid, tenant, address, kind, reason, created, expires"
LIVE = "(expires IS NULL OR expires > ?)"


@dataclass(frozen=True)
class Entry:
    """One address or pattern on one tenant's list."""

    tenant: str
    address: str
    kind: str
    reason: str
    created: float
    expires: float | None = None
    id: int = 0  # its place in the store: the cursor of a listing

    def live(self, now: float) -> bool:
        return self.expires is None or self.expires > now

    def as_dict(self) -> dict[str, Any]:
        """As the API and `relay suppress list --json` give it."""
        data = asdict(self)
        del data["id"]
        data.update(pattern=is_pattern(self.address), created=iso(self.created),
                    expires=iso(self.expires))  # fmt: skip
        return data


def path_of(history_path: Path) -> Path:
    """The store's file, next to the message history's."""
    return history_path.parent / FILE


def connect(path: Path, *, durable: bool = False, reader: bool = False) -> sqlite3.Connection:
    """The store at path, created if missing (WAL). durable: synchronous=FULL, every commit on
    disk before it returns (what a person adds); reader: query_only."""
    db = cursor.connect(path)
    db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
    db.executescript(SCHEMA)
    if durable:
        db.execute("PRAGMA synchronous=FULL")
    if reader:
        db.execute("PRAGMA query_only=1")
    return db


def put(db: sqlite3.Connection, entry: Entry, *, only_over_automatic: bool, now: float) -> bool:
    """Write entry (in the caller's transaction), replacing the one of its address; with
    only_over_automatic, only where that one is automatic or expired, and never an active
    hard bounce by an on_hold. True if it was written."""
    guard = ""
    args: list[Any] = []
    if only_over_automatic:
        guard = (" WHERE entries.expires <= ? OR (entries.kind IN (?, ?) AND NOT"
                 " (entries.kind = ? AND excluded.kind = ?))")  # fmt: skip
        args = [now, HARD_BOUNCE, ON_HOLD, HARD_BOUNCE, ON_HOLD]
    address = entry.address.lower()
    written = db.execute(
        "INSERT INTO entries (tenant, address, pattern, kind, reason, created, expires)"
        " VALUES (?,?,?,?,?,?,?) ON CONFLICT (tenant, address) DO UPDATE SET"
        " kind=excluded.kind, reason=excluded.reason, created=excluded.created,"
        " expires=excluded.expires" + guard,
        (entry.tenant, address, is_pattern(address), entry.kind, entry.reason, entry.created,
         entry.expires, *args),
    ).rowcount  # fmt: skip
    if written and is_pattern(address):
        db.execute("UPDATE meta SET value = value + 1 WHERE key = 'patterns'")
    return bool(written)


def _entry(row: tuple[Any, ...]) -> Entry:
    rowid, tenant, address, kind, reason, created, expires = row
    return Entry(tenant, address, kind, reason, created, expires, rowid)


class Suppressions:
    """The store; safe to call from worker threads (one at a time)."""

    def __init__(self, path: Path, *, durable: bool = False, reader: bool = False) -> None:
        self.path = path
        self.db = connect(path, durable=durable, reader=reader)
        self.lock = threading.Lock()
        self.version = -1  # the pattern counter self.patterns was loaded at
        self.patterns: Patterns[Entry] = Patterns()

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def find(self, tenant: str, address: str, now: float) -> Entry | None:
        """The live entry that suppresses address for tenant: its own, else a pattern's."""
        with self.lock:
            row = self.db.execute(
                f"SELECT {COLUMNS} FROM entries WHERE tenant=? AND address=? AND {LIVE}",
                (tenant, address.lower(), now),
            ).fetchone()
            if row is not None:
                return _entry(row)
            self._fresh_patterns()
            found = [e for e in self.patterns.find(address) if e.tenant == tenant and e.live(now)]
        return min(found, key=lambda e: e.created) if found else None

    def _fresh_patterns(self) -> None:
        """Reload the patterns if a writer changed them since they were loaded."""
        (version,) = self.db.execute("SELECT value FROM meta WHERE key='patterns'").fetchone()
        if version != self.version:
            rows = self.db.execute(f"SELECT {COLUMNS} FROM entries WHERE pattern = 1")
            self.patterns = Patterns.of((e.address, e) for e in map(_entry, rows))
            self.version = version

    def add(self, entry: Entry) -> Entry:
        """Put entry on its tenant's list, replacing the address's entry there; returns it as
        stored. On disk when this returns if the store is durable."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                put(self.db, entry, only_over_automatic=False, now=entry.created)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
            row = self.db.execute(
                f"SELECT {COLUMNS} FROM entries WHERE tenant=? AND address=?",
                (entry.tenant, entry.address.lower()),
            ).fetchone()
        return _entry(row)

    def delete(self, tenant: str, address: str) -> bool:
        """Take address (or a pattern, written as it was added) off tenant's list; False if
        it was not on it."""
        address = address.lower()
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            gone = self.db.execute(
                "DELETE FROM entries WHERE tenant=? AND address=?", (tenant, address)
            ).rowcount
            if gone and is_pattern(address):
                self.db.execute("UPDATE meta SET value = value + 1 WHERE key = 'patterns'")
            self.db.execute("COMMIT")
        return bool(gone)

    def entries(
        self,
        tenant: str | None,
        now: float,
        kind: str | None = None,
        address: str | None = None,
        limit: int = 100,
        after: int = 0,
    ) -> tuple[list[Entry], int | None]:
        """A page of live entries (tenant None: every tenant's) in the order they were first
        added, and the cursor of the next page (None: the last). address: its own entry and
        the patterns that match it."""
        clauses: list[str] = ["rowid > ?", LIVE]
        args: list[Any] = [after, now]
        for column, value in (("tenant", tenant), ("kind", kind)):
            if value is not None:
                clauses.append(f"{column}=?")
                args.append(value)
        if address is not None:
            clauses.append("(address=? OR pattern=1)")
            args.append(address.lower())
        limit = max(1, min(limit, MAX_LIMIT))
        sql = f"SELECT {COLUMNS} FROM entries WHERE {' AND '.join(clauses)} ORDER BY rowid"
        if address is None:
            sql += f" LIMIT {limit + 1}"
        with self.lock:
            rows = self.db.execute(sql, args)
            found = [e for e in map(_entry, rows) if address is None or _names(e, address)]
        page = found[:limit]
        return page, (page[-1].id if len(found) > limit else None)

    def prune(self, now: float) -> int:
        """Delete expired entries; how many went."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            gone = self.db.execute("DELETE FROM entries WHERE expires <= ?", (now,)).rowcount
            self.db.execute("UPDATE meta SET value = value + 1 WHERE key = 'patterns'")
            self.db.execute("COMMIT")
        return int(gone)


def _names(entry: Entry, address: str) -> bool:
    """Whether entry is address's own or a pattern it matches."""
    if is_pattern(entry.address):
        return matches(entry.address, address)
    return entry.address == address.lower()


MANUAL_KINDS = (BLOCKLIST, MANUAL, UNSUBSCRIBE, COMPLAINT)  # what a person may add


def checked(address: str, kind: str) -> str:
    """address (lowercase) fit for a person's entry of kind; ValueError saying why not: a
    mailbox-like address, a pattern only on the blocklist."""
    if kind not in MANUAL_KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(MANUAL_KINDS)}")
    address = address.strip().lower()
    local, at, domain = address.rpartition("@")
    if not address or len(address) > 254 or any(c.isspace() or c in "<>" for c in address):
        raise ValueError(f"{address!r} is not an address")
    if is_pattern(address):
        if kind != BLOCKLIST:
            raise ValueError("patterns (with *) are for the blocklist only")
        return address
    if not (at and local and domain):
        raise ValueError(f"{address!r} is not an address (local@domain)")
    return address
