"""History, the status page's view of it: outcomes counted per minute from the events table (the
chart of the last hour), and the pending messages with their lanes and ages (the queue by lane,
its oldest message, and why each waits when the scheduler cannot say)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relay.history.project import PENDING
from relay.history.store import History
from relay.mail import events as names
from relay.mail.waiting import waiting_state

OUTCOMES = (names.DELIVERED, names.DEFERRED, names.BOUNCED)  # the chart's series


def per_minute(
    history: History, since: float, tenant: str | None = None
) -> dict[int, dict[str, int]]:
    """{minute (UTC epoch seconds // 60): {outcome: events}} of every outcome event at or after
    since, of one tenant's messages when given; a quiet minute is absent."""
    sql = (
        "SELECT CAST(at / 60 AS INT) AS minute, event, COUNT(*) FROM events"
        f" WHERE at >= ? AND event IN ({', '.join('?' * len(OUTCOMES))})"
    )
    args: list[Any] = [since, *OUTCOMES]
    if tenant is not None:
        sql += " AND json_extract(data, '$.tenant') = ?"
        args.append(tenant)
    out: dict[int, dict[str, int]] = {}
    with history.lock:
        for minute, event, count in history.db.execute(sql + " GROUP BY minute, event", args):
            out.setdefault(int(minute), {})[event] = int(count)
    return out


@dataclass(frozen=True)
class Backlog:
    """The pending messages counted by lane and by the history's reason for their wait (held,
    scheduled, deferred or queued; the scheduler alone knows the others), and since when the
    oldest one due waits to be sent: its arrival, or its X-Relay-Send-At time when later (the
    queue's age as the scheduler counts it; mail scheduled ahead is not due)."""

    counts: dict[tuple[str, str], int]
    oldest: float | None


def backlog(history: History, now: float, tenant: str | None = None) -> Backlog:
    """The pending messages (of one tenant's when given) by lane and reason, in one grouped
    query: a large queue costs the database a scan, not Python a row each."""
    born = "MAX(queued_at, COALESCE(send_at, 0))"
    sql = (
        "SELECT COALESCE(lane, 'normal'), held, COALESCE(send_at, 0) > ?, attempts > 0,"
        f" COUNT(*), MIN(CASE WHEN {born} <= ? THEN {born} END) FROM messages WHERE status=?"
    )
    args: list[Any] = [now, now, PENDING]
    if tenant is not None:
        sql, args = sql + " AND tenant=?", [*args, tenant]
    with history.lock:
        rows = history.db.execute(sql + " GROUP BY 1, 2, 3, 4", args).fetchall()
    counts: dict[tuple[str, str], int] = {}
    since: list[float] = []
    for lane, held, scheduled, attempted, count, oldest in rows:
        why = waiting_state(held=bool(held), scheduled=bool(scheduled), quota=False,
                            attempted=bool(attempted))  # fmt: skip
        counts[lane, why] = counts.get((lane, why), 0) + count
        since += [] if oldest is None else [oldest]
    return Backlog(counts, min(since, default=None))


def lanes(history: History, tenant: str | None = None) -> dict[str, str]:
    """{id: lane} of every pending message (of one tenant's when given)."""
    sql = "SELECT id, COALESCE(lane, 'normal') FROM messages WHERE status=?"
    args: list[Any] = [PENDING]
    if tenant is not None:
        sql, args = sql + " AND tenant=?", [*args, tenant]
    with history.lock:
        return dict(history.db.execute(sql, args).fetchall())
