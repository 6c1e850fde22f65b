"""Spool, recovery: the start-up repair after a crash, and the quarantine of state files
that cannot be read."""

from __future__ import annotations

import contextlib
import os

from relay.observe import logs
from relay.spool.durable import fsync_dir, unlink
from relay.spool.layout import CORRUPT, DEAD, MSG, QUEUE, TMP, Layout


def quarantine(spool: Layout, msg_id: str, where: str, reason: str) -> None:
    """Move an unreadable state file into corrupt/ with a log line; its content goes too
    unless the other state (queue or dead) still needs it."""
    target = spool.root / CORRUPT
    other = DEAD if where == QUEUE else QUEUE
    paths = [spool.state_path(msg_id, where)]
    if not spool.state_path(msg_id, other).exists():
        paths.append(spool.content_path(msg_id))
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, target / f"{where}.{path.name}")
    fsync_dir(target)
    logs.event("quarantined", level="warning", id=msg_id, where=where, reason=reason)


def recover(spool: Layout) -> dict[str, int]:
    """Start-up repair with no intake running: drop temp files and never-acknowledged
    content, quarantine state whose content is missing. Returns counts for the log.

    It compares directory listings only, so it takes seconds even for a million messages;
    a state file that cannot be parsed is quarantined by whoever reads it first (the
    scheduler's index, or a dead-letter merge)."""
    counts = {"temp_removed": 0, "orphans_removed": 0, "quarantined": 0}
    for name in os.listdir(spool.root / TMP):
        unlink(spool.root / TMP / name)
        counts["temp_removed"] += 1
    queued, dead = set(spool.ids(QUEUE)), set(spool.ids(DEAD))
    contents = set(os.listdir(spool.root / MSG))
    for where, ids in ((QUEUE, queued), (DEAD, dead)):
        for msg_id in sorted(ids - contents):
            missing = f"content file {spool.content_path(msg_id)} is missing"
            quarantine(spool, msg_id, where, missing)
            counts["quarantined"] += 1
    for msg_id in contents - queued - dead:
        # Content without state was never acknowledged: the state is written last.
        unlink(spool.content_path(msg_id))
        counts["orphans_removed"] += 1
    return counts
