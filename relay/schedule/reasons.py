"""Schedule, status reasons: what each queued message and each destination waits for, read from
the index and the destinations for the control server."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from relay.config.throttle import ThrottleConfig
from relay.schedule.destinations import Destinations
from relay.schedule.index import Entry, Index
from relay.schedule.shaping import Destination, Ready


def reasons(
    index: Index, destinations: Destinations, ids: Iterable[str] | None = None
) -> dict[str, list[Any]]:
    """Per queued message (or only those of ids the index holds: one page of the API's):
    [reason, expected attempt (UTC epoch) or None, detail or None]; reasons are active, held,
    queued, scheduled, quota, deferred, throttled, suspended."""
    now, wall_now = time.monotonic(), time.time()
    out: dict[str, list[Any]] = {}
    chosen = index.entries.items() if ids is None else _known(index, ids)
    for msg_id, entry in chosen:
        reason, at, detail = _reason(entry, destinations, now)
        out[msg_id] = [reason, None if at is None else round(wall_now + at - now, 3), detail]
    return out


def _known(index: Index, ids: Iterable[str]) -> list[tuple[str, Entry]]:
    return [(i, e) for i in ids if (e := index.get(i)) is not None]


def _reason(
    entry: Entry, destinations: Destinations, now: float
) -> tuple[str, float | None, str | None]:
    if entry.running:
        return "active", now, None
    if entry.held:
        return "held", None, None
    if not entry.ready:
        return entry.state, entry.due, None
    dests = [destinations.get(name) for name in entry.dests]
    if not dests:
        return "queued", now, None  # its MX is being looked up
    dest = max(dests, key=lambda d: (d.suspended_until, d.opens_at(now), d.level))
    reason = dest.waits_for(now)
    opens = dest.opens_at(now)
    at = opens if opens != float("inf") else max(now, dest.next_slot)
    return reason, at, None if reason == "queued" else describe(dest, now)


def destination_report(
    destinations: Destinations, ready: Ready, throttle: ThrottleConfig
) -> list[dict[str, Any]]:
    """Destinations that are busy, throttled, suspended or have mail waiting (summary)."""
    now, wall_now = time.monotonic(), time.time()
    waiting = dict(ready.waiting())
    rows = []
    for name, dest in sorted(destinations.live.items()):
        if dest.idle(now) and not waiting.get(name):
            continue
        interval = dest.interval(throttle)
        rows.append({
            "destination": name, "state": dest.waits_for(now), "busy": dest.busy,
            "connections": dest.connections(), "limit": dest.limits.connections,
            "rate": round(1 / interval, 3) if interval else None, "level": dest.level,
            "waiting": waiting.get(name, 0),
            "suspended_until": (
                round(wall_now + dest.suspended_until - now, 3) if dest.suspended(now) else None
            ),
            "last_reply": None if dest.last_reply is None else str(dest.last_reply),
        })  # fmt: skip
    return rows


def describe(dest: Destination, now: float) -> str:
    """One line on why a destination holds mail back."""
    if dest.suspended(now):
        what = f"{dest.name} suspended for {dest.suspended_until - now:.0f}s"
    elif dest.level:
        what = f"{dest.name} throttled (level {dest.level}, {connections(dest.connections())})"
    else:
        what = f"{dest.name} at its limit ({connections(dest.limits.connections)})"
    return what if dest.last_reply is None else f"{what} after: {dest.last_reply}"


def connections(count: int) -> str:
    return f"{count} connection{'s' * (count != 1)}"
