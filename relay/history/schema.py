"""History, the schema: the SQLite tables the journal's events are projected into, opened in
WAL mode (one writer, the API process; readers never block it)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from relay.spool import cursor

VERSION = 1
TABLES = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- the cursor: the order events were taken in
    event_id TEXT NOT NULL UNIQUE,          -- the writer's id: a duplicate is dropped
    event TEXT NOT NULL,
    id TEXT NOT NULL,
    rcpt TEXT,
    at REAL NOT NULL,                       -- the event's time, UTC epoch seconds
    data TEXT NOT NULL                      -- the whole event as the journal has it
);
CREATE INDEX IF NOT EXISTS events_by_message ON events (id, seq);
CREATE INDEX IF NOT EXISTS events_by_time ON events (at);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,                    -- queue ids sort by arrival: newest first is DESC
    tenant TEXT NOT NULL,
    sender TEXT NOT NULL,
    batch_id TEXT,
    queued_at REAL,
    send_at REAL,
    lane TEXT,
    size INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    held INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL,                   -- pending, or how it ended
    finished_at REAL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_tenant ON messages (tenant, id);
CREATE INDEX IF NOT EXISTS messages_by_batch ON messages (batch_id, id);
CREATE INDEX IF NOT EXISTS messages_by_status ON messages (status, id);
CREATE INDEX IF NOT EXISTS messages_by_finish ON messages (finished_at);
CREATE TABLE IF NOT EXISTS recipients (
    id TEXT NOT NULL,
    address TEXT NOT NULL,
    status TEXT NOT NULL,                   -- pending, delivered, bounced, expired, cancelled
    attempts INTEGER NOT NULL DEFAULT 0,
    code INTEGER,
    enhanced TEXT,
    text TEXT,
    mx TEXT,
    ip TEXT,
    tls TEXT,
    next_attempt REAL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (id, address)
);
CREATE INDEX IF NOT EXISTS recipients_by_address ON recipients (address COLLATE NOCASE, id);
"""


def connect(path: Path) -> sqlite3.Connection:
    """The history database at path, created if missing, in WAL mode. synchronous=NORMAL: a
    power cut may lose the last transactions, which are taken in again from the journal
    (their offsets are in the same transactions)."""
    db = cursor.connect(path)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA foreign_keys=OFF")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version not in (0, VERSION):
        db.close()
        raise ValueError(f"{path}: history format {version}, this relay reads {VERSION}")
    db.executescript(TABLES)
    db.execute(f"PRAGMA user_version={VERSION}")
    return db
