"""Operations, the summary: a Postfix qshape-like summary of the queue, counting queued messages by
recipient domain and age bucket, as pure functions over already loaded messages.

Semantics follow qshape (Postfix QSHAPE_README):

- A message counts once under each recipient domain that still has a pending (non-final)
  recipient in it; the TOTAL row counts each message once, so domain rows may add up to more.
- Age is now - queued_at in minutes; bucket i holds ages <= BUCKETS_MINUTES[i] (and above the
  previous bound), the last bucket everything older. A negative age (clock skew) counts as 0.
- Domains are lowercase, so none can be mistaken for the TOTAL row; a message with no pending
  recipient is not counted at all.
- `top` keeps only the largest domain rows (ties broken by name); TOTAL still counts everything.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from relay.spool.message import Message

BUCKETS_MINUTES = (5, 10, 20, 40, 80, 160, 320, 640, 1280)
LABELS = (*(str(m) for m in BUCKETS_MINUTES), f"{BUCKETS_MINUTES[-1]}+")
TOTAL = "TOTAL"
MIN_DOMAIN_WIDTH = 20
# Bounds compared in whole seconds, so an age of exactly 5 minutes never rounds past 5.
_BOUNDS_SECONDS = tuple(m * 60 for m in BUCKETS_MINUTES)


@dataclass(frozen=True)
class Row:
    """Messages waiting for one domain (or TOTAL): in all, and per age bucket."""

    domain: str
    total: int
    buckets: tuple[int, ...]  # len(BUCKETS_MINUTES) + 1; the last is "older than 1280 minutes"

    def as_json(self) -> dict[str, Any]:
        buckets = dict(zip(LABELS, self.buckets, strict=True))
        return {"domain": self.domain, "total": self.total, "buckets": buckets}


@dataclass(frozen=True)
class Summary:
    """The TOTAL row first, then domains by total descending, then name."""

    rows: tuple[Row, ...]

    def as_json(self) -> dict[str, Any]:
        return {"buckets_minutes": list(BUCKETS_MINUTES), "rows": [r.as_json() for r in self.rows]}


def bucket(age_seconds: float) -> int:
    """Index of the age bucket; a negative age (clock skew) counts as 0."""
    return bisect_left(_BOUNDS_SECONDS, max(age_seconds, 0.0))


def summarize(messages: Iterable[Message], now: float, *, top: int | None = None) -> Summary:
    """Count the messages with a pending recipient by domain and age (see the module doc)."""
    return count(((m.queued_at, {r.domain for r in m.pending()}) for m in messages), now, top=top)


Shape = tuple[float, Iterable[str]]  # a queued message's arrival and pending recipient domains


def count(shapes: Iterable[Shape], now: float, *, top: int | None = None) -> Summary:
    """summarize() over (queued_at, pending recipient domains) pairs, as the running
    scheduler's index keeps them (so a live summary reads no file)."""
    if top is not None and top < 0:
        raise ValueError(f"top must be at least 0, not {top}")
    total = [0] * len(LABELS)
    by_domain: dict[str, list[int]] = {}
    for queued_at, domains in shapes:
        if not domains:
            continue
        i = bucket(now - queued_at)
        total[i] += 1
        for domain in domains:
            by_domain.setdefault(domain, [0] * len(LABELS))[i] += 1
    rows = sorted((_row(d, c) for d, c in by_domain.items()), key=lambda r: (-r.total, r.domain))
    return Summary((_row(TOTAL, total), *rows[:top]))


def from_json(data: dict[str, Any], top: int | None = None) -> Summary:
    """A Summary back from as_json() (the running scheduler's answer), keeping `top` domains."""
    rows = [Row(r["domain"], r["total"], tuple(r["buckets"][label] for label in LABELS))
            for r in data["rows"]]  # fmt: skip
    return Summary((rows[0], *rows[1:][:top]))


def render(summary: Summary) -> str:
    """A fixed-width table like qshape's: a header, then one right-aligned line per row."""
    name_width = max([MIN_DOMAIN_WIDTH, *(len(r.domain) for r in summary.rows)])
    cell_width = max([len(LABELS[-1]), *(len(str(r.total)) for r in summary.rows)])
    cells = [("", ("T", *LABELS))] + [(r.domain, (r.total, *r.buckets)) for r in summary.rows]
    return "\n".join(
        f"{name:>{name_width}}" + "".join(f" {c:>{cell_width}}" for c in values)
        for name, values in cells
    )


def _row(domain: str, counts: list[int]) -> Row:
    return Row(domain, sum(counts), tuple(counts))


DESTINATION_COLUMNS = (
    ("destination", "Destination"), ("state", "State"), ("busy", "Busy"),
    ("connections", "Conns"), ("limit", "Limit"), ("rate", "Rate/s"), ("level", "Level"),
    ("waiting", "Waiting"), ("suspended_until", "Suspended until"), ("last_reply", "Last reply"),
)  # fmt: skip


def render_destinations(rows: list[dict[str, Any]]) -> str:
    """The running scheduler's destinations as a table: connections in use and allowed now
    (the limit halved per throttle level), rate, waiting mail, suspension, the last throttle
    reply."""
    cells = [[title for _, title in DESTINATION_COLUMNS]]
    for row in rows:
        cells.append(
            ["-" if row[key] is None else _cell(key, row[key]) for key, _ in DESTINATION_COLUMNS]
        )
    widths = [max(len(line[i]) for line in cells) for i in range(len(DESTINATION_COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in cells
    )


def _cell(key: str, value: Any) -> str:
    if key == "suspended_until":
        return (
            datetime.fromtimestamp(value, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        )
    return str(value)
