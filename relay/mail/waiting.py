"""Mail, why a message waits: the one order of the reasons, shared by the scheduler's live
index and the CLI's reading of a stopped spool."""

from __future__ import annotations


def waiting_state(
    *,
    held: bool,
    scheduled: bool,
    quota: bool,
    attempted: bool,
    running: bool = False,
    ready: bool = False,
) -> str:
    """active, held, ready, scheduled, quota, deferred or queued: the first that holds."""
    if running:
        return "active"
    if held:
        return "held"
    if ready:
        return "ready"
    if scheduled:
        return "scheduled"
    if quota:
        return "quota"
    return "deferred" if attempted else "queued"
