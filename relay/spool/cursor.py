"""Spool, journal readers' databases: a reader of the event journal (the message history, each
webhook's outbox) keeps how far it has taken in each journal file in its own SQLite database
(WAL), in the same transaction as what it made of the events, so a crash repeats events and
never skips one."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from relay.spool import journal

# take(file name, events read, the offset after them) -> how many were new
Take = Callable[[str, list[dict[str, Any]], int], int]

OFFSETS = """
CREATE TABLE IF NOT EXISTS offsets (
    file TEXT PRIMARY KEY,                  -- a journal file's name
    offset INTEGER NOT NULL                 -- how far its events are taken in
);
"""


def connect(path: Path) -> sqlite3.Connection:
    """The database at path (0600, its directory 0700), created if missing, in WAL mode with
    synchronous=NORMAL: a power cut may lose the last transactions, offsets with them, and
    their events are taken in again."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    path.chmod(0o600)
    return db


class Reader:
    """The database of one reader of the journal; its methods may be called from worker
    threads, one at a time (self.lock)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.lock = threading.Lock()
        db.executescript(OFFSETS)

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def offset(self, file: str) -> int:
        """How far the events of a journal file are taken in (0 for a new file)."""
        with self.lock:
            row = self.db.execute("SELECT offset FROM offsets WHERE file=?", (file,)).fetchone()
        return int(row[0]) if row else 0

    def advance(self, file: str, offset: int) -> None:
        """Record file's new offset (in the caller's transaction); it only ever grows, so two
        callers taking the same file at once leave the furthest."""
        self.db.execute(
            "INSERT INTO offsets (file, offset) VALUES (?, ?)"
            " ON CONFLICT (file) DO UPDATE SET offset=MAX(offset, excluded.offset)",
            (file, offset),
        )

    def forget_files(self, kept: Sequence[str]) -> None:
        """Drop the offsets of journal files that are gone (pruned)."""
        with self.lock:
            known = [row[0] for row in self.db.execute("SELECT file FROM offsets")]
            gone = [(name,) for name in known if name not in set(kept)]
            self.db.executemany("DELETE FROM offsets WHERE file=?", gone)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE … COMMIT under the lock, or ROLLBACK on an exception."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")


def catch_up(reader: Reader, directory: Path, take: Take) -> int:
    """Read every complete event of the journal in directory that reader has not taken in,
    file by file from its offsets, handing each read to take; how many were new."""
    added = 0
    for path in journal.files(directory):
        offset = reader.offset(path.name)
        while True:
            try:
                events, after = journal.read(path, offset)
            except FileNotFoundError:  # pruned meanwhile
                break
            if after == offset:
                break
            added += take(path.name, events, after)
            offset = after
    return added


POLL = 0.2  # seconds between looks at the journal when it had nothing new
PRUNE_EVERY = 3600.0


async def follow(
    catch_up: Callable[[], int],
    prune: Callable[[], bool | None],
    stop: asyncio.Event,
    taken: Callable[[], None] = lambda: None,
) -> None:
    """A journal reader's loop until stop is set: catch_up() (in a thread; how many events
    were new), taken() after new ones, prune() at the start and once an hour (again at the next
    look when it answers False), and a wait of POLL when nothing was new."""
    next_prune = 0.0
    while not stop.is_set():
        added = await asyncio.to_thread(catch_up)
        if added:
            taken()
        due = time.monotonic() >= next_prune
        if due and await asyncio.to_thread(prune) is not False:
            next_prune = time.monotonic() + PRUNE_EVERY
        if not added:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL)


def wanted_by_others(readers: Path, file: str, size: int, since: float) -> bool:
    """Whether a reader database in the directory readers (each webhook's outbox) has not yet
    taken in file up to size. A reader not written to since `since` (an endpoint removed
    from the configuration long ago) no longer counts."""
    for path in readers.glob("*.sqlite"):
        written = max(f.stat().st_mtime for f in (path, Path(f"{path}-wal")) if f.exists())
        if written < since:
            continue
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT offset FROM offsets WHERE file=?", (file,)).fetchone()
        if row is None or int(row[0]) < size:
            return True
    return False
