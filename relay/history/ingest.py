"""History, taking events in: the journal's files read from where the history left each one,
their events applied with the new offsets in one transaction, and files past the retention
deleted once taken in."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

from relay.history.store import History
from relay.spool import cursor, journal
from relay.spool.layout import HOOKS


def catch_up(history: History, directory: Path) -> int:
    """Take in every complete event not yet taken in; how many were new."""
    return cursor.catch_up(history, directory, history.take)


def prune(history: History, directory: Path, retention: float, now: float | None = None) -> None:
    """Forget what ended before the retention window, and delete journal files that are no
    longer written, fully taken in (by the history, every webhook's outbox and the suppression
    feed), and last written before it."""
    before = (time.time() if now is None else now) - retention
    history.prune(before)
    kept = []
    # the other readers: each webhook's outbox, and beside the history the suppression feed
    readers = (directory.parent / HOOKS, history.path.parent)
    for path in journal.files(directory):
        with contextlib.suppress(FileNotFoundError):
            size = path.stat().st_size
            done = history.offset(path.name) >= size
            done = done and not any(
                cursor.wanted_by_others(r, path.name, size, before) for r in readers
            )
            if done and path.stat().st_mtime < before and journal.finished(path):
                path.unlink()
                continue
            kept.append(path.name)
    history.forget_files(kept)


async def follow(
    history: History,
    directory: Path,
    retention: Callable[[], float],
    stop: asyncio.Event,
    taken: Callable[[], None] = lambda: None,
) -> None:
    """Keep the history caught up with the journal until stop is set, calling taken() after
    new events are in; prune at the start and once an hour (retention() read each time: a
    reload may change it)."""
    await cursor.follow(
        lambda: catch_up(history, directory),
        lambda: prune(history, directory, retention()),
        stop,
        taken,
    )
