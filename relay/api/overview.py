"""API, the overview: `GET /v1/status`, all the status page shows in one answer, for operators
(a token of every tenant): the queue by status and lane and its oldest message, the
destinations, the dead letters, the webhooks and the outcomes per minute of the last hour. The
running scheduler says why each message waits and how each destination fares; should it not
answer, the history and the spool say what they know and `scheduler` is "unreachable"."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from typing import Any

from aiohttp import web

from relay.api import live, submit
from relay.api.auth import tenant
from relay.api.problems import Problem
from relay.api.spec import Answer, Route, problem, ref
from relay.history import timeline
from relay.history.store import History
from relay.hooks import status as hooks
from relay.mail.events import iso
from relay.ops import control
from relay.spool.layout import DEAD, Layout
from relay.spool.store import Spool, SpoolError

MINUTES = 60  # the chart: the last hour, the current minute included
DEAD_SHOWN = 20  # dead letters listed, the latest dead-lettered first
DEAD_READ = 200  # of the newest records (by arrival), from which those are picked
REASONS_UP_TO = 50_000  # a larger queue is counted by status from the history (cheaper)
# Why a message waits, in the order the page lists them (relay queue list's words).
REASONS = ("active", "queued", "deferred", "throttled", "suspended", "quota", "scheduled", "held")


async def status(request: web.Request) -> web.Response:
    own = tenant(request)
    if own is not None:
        raise Problem(403, f"the status page needs a token of every tenant (this one sees "
                           f"tenant {own} only)")  # fmt: skip
    history = live.history(request)
    await live.catch_up(request)
    now = time.time()
    state, shape, dests = await scheduler(request)
    reasons = await queued_reasons(request, shape)
    queue = await asyncio.to_thread(backlog, history, now, reasons)
    layout = request.app.get(live.SPOOL)
    cfg = request.app[submit.CONFIG].cfg
    spool_root = layout.root if layout is not None else cfg.spool.path
    body = {
        "generated_at": iso(now),
        "scheduler": state,
        "queue": {**queue, "domains": domains(shape)},
        "destinations": [{**d, "suspended_until": iso(d["suspended_until"])} for d in dests],
        "dead_letters": await asyncio.to_thread(dead_letters, Spool(spool_root)),
        "webhooks": await asyncio.to_thread(webhooks, request, Layout(spool_root)),
        "chart": await asyncio.to_thread(chart, history, now),
    }
    return web.json_response(body)


async def scheduler(
    request: web.Request,
) -> tuple[str, dict[str, Any] | None, list[dict[str, Any]]]:
    """(running | starting | unreachable, its qshape summary, its destinations), asked at
    once; starting: its first scan of the queue is not done (no summary yet)."""
    try:
        summary, dests = await asyncio.gather(
            live.ask(request, {"op": "summary"}, live.ASK_TIMEOUT),
            live.ask(request, {"op": "destinations"}, live.ASK_TIMEOUT),
        )
    except control.ControlError:
        return "unreachable", None, []
    if not summary.get("indexed"):
        return "starting", None, list(dests["destinations"])
    return "running", summary["summary"], list(dests["destinations"])


async def queued_reasons(
    request: web.Request, shape: dict[str, Any] | None
) -> dict[str, str] | None:
    """{id: why it waits} of every queued message, from the running scheduler once it has
    indexed the queue (and the queue is not huge); None: the history's view stands in."""
    if shape is None or total(shape) > REASONS_UP_TO:
        return None
    try:
        answer = await live.ask(request, {"op": "reasons"}, live.ASK_TIMEOUT)
    except control.ControlError:
        return None
    return {msg_id: why[0] for msg_id, why in answer.items()}


def total(shape: dict[str, Any]) -> int:
    """The summary's TOTAL row: every queued message with a pending recipient."""
    return int(shape["rows"][0]["total"]) if shape["rows"] else 0


def domains(shape: dict[str, Any] | None, top: int = 8) -> list[dict[str, Any]]:
    """The recipient domains with the most queued mail, from the scheduler's summary."""
    if shape is None:
        return []
    return [{"domain": r["domain"], "total": r["total"]} for r in shape["rows"][1 : top + 1]]


def backlog(history: History, now: float, reasons: dict[str, str] | None) -> dict[str, Any]:
    """The queue by status and lane, and how long its oldest message has waited to be sent:
    the scheduler's reason for each message it holds (its lane from the history), or the
    history's own counts when reasons is None."""
    known = timeline.backlog(history, now)
    lanes: dict[str, Counter[str]] = {}
    if reasons is None:
        for (lane, why), count in known.counts.items():
            lanes.setdefault(lane, Counter())[why] += count
    else:
        lane_of = timeline.lanes(history)
        for msg_id, why in reasons.items():  # one not in the history yet: the lane is unknown
            lanes.setdefault(lane_of.get(msg_id, "normal"), Counter())[why] += 1
    by_status: Counter[str] = sum(lanes.values(), Counter())
    oldest = known.oldest
    return {
        "total": by_status.total(),
        "source": "history" if reasons is None else "scheduler",
        "oldest_waiting_since": iso(oldest),
        "oldest_age_seconds": None if oldest is None else round(max(0.0, now - oldest), 1),
        "by_status": ordered(by_status),
        "by_lane": {lane: ordered(counts) for lane, counts in sorted(lanes.items()) if counts},
    }


def ordered(counts: Counter[str]) -> dict[str, int]:
    """Counts of the reasons present, in REASONS' order (an unknown one last)."""
    rank = {reason: i for i, reason in enumerate(REASONS)}
    return {k: v for k, v in sorted(counts.items(), key=lambda kv: rank.get(kv[0], 99)) if v}


def dead_letters(spool: Spool) -> dict[str, Any]:
    """How many dead-letter records the spool holds, and the latest dead-lettered (read as
    `relay dlq list` reads them), each with its failed recipients' last replies."""
    try:
        ids = spool.ids(DEAD)
    except OSError:
        return {"count": 0, "latest": []}
    records = []
    for msg_id in ids[-DEAD_READ:]:
        with contextlib.suppress(SpoolError):
            records.append(spool.load(msg_id, DEAD))
    records.sort(key=lambda m: m.dead_at or 0.0, reverse=True)
    latest = []
    for msg in records[:DEAD_SHOWN]:
        failed = [r for r in (rcpt.as_dict() for rcpt in msg.recipients) if "reason" in r]
        why = {r["reason"] for r in failed}
        latest.append({
            "id": msg.id, "tenant": msg.tenant, "sender": msg.sender,
            "dead_lettered_at": iso(msg.dead_at),
            "reason": why.pop() if len(why) == 1 else "mixed",
            "recipients": [{"address": r["address"], "status": r["status"],
                            "attempts": r["attempts"], "reply": reply_line(r["reply"])}
                           for r in failed],
        })  # fmt: skip
    return {"count": len(ids), "latest": latest}


def reply_line(reply: dict[str, Any] | None) -> str | None:
    """A reply as one line: 550 5.1.1 no such user."""
    if reply is None:
        return None
    words = [str(reply["code"] or ""), reply["enhanced"] or "", reply["text"] or ""]
    return " ".join(w for w in words if w)


def webhooks(request: web.Request, layout: Layout) -> list[dict[str, Any]]:
    """Each configured webhook as `relay webhook list --json` shows it; an outbox that cannot
    be read is "unreadable", with why as its last error."""
    out = []
    for hook in request.app[submit.CONFIG].cfg.webhooks:
        try:
            out.append(hooks.describe(layout.hooks_dir, hook))
        except hooks.Unreadable as exc:
            out.append({"name": hook.name, "url": hook.url, "state": "unreadable",
                        **hooks.NO_OUTBOX, "last_error": str(exc)})  # fmt: skip
    return out


def chart(history: History, now: float) -> list[dict[str, Any]]:
    """Delivered, deferred and bounced per minute over the last hour, oldest minute first."""
    last = int(now // 60)
    first = last - MINUTES + 1
    counts = timeline.per_minute(history, first * 60.0)
    return [
        {"minute": iso(minute * 60.0), **{o: counts.get(minute, {}).get(o, 0)
                                          for o in timeline.OUTCOMES}}
        for minute in range(first, last + 1)
    ]  # fmt: skip


def counts_of(description: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "additionalProperties": {"type": "integer", "minimum": 1},
    }


NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}
STATUS = {
    "type": "object",
    "required": ["generated_at", "scheduler", "queue", "destinations", "dead_letters",
                 "webhooks", "chart"],
    "properties": {
        "generated_at": {"type": "string", "format": "date-time"},
        "scheduler": {
            "enum": ["running", "starting", "unreachable"],
            "description": "starting: its first scan of the queue is not done; unreachable: "
            "not answering within 2 s (the history and the spool say what they know)",
        },
        "queue": ref("StatusQueue"),
        "destinations": {"type": "array", "items": ref("StatusDestination")},
        "dead_letters": ref("StatusDeadLetters"),
        "webhooks": {"type": "array", "items": ref("StatusWebhook")},
        "chart": {
            "type": "array", "minItems": MINUTES, "maxItems": MINUTES,
            "description": "outcome events per minute, oldest first, the current minute last",
            "items": {
                "type": "object", "required": ["minute", *timeline.OUTCOMES],
                "properties": {"minute": {"type": "string", "format": "date-time"},
                               **{o: {"type": "integer", "minimum": 0}
                                  for o in timeline.OUTCOMES}},
            },
        },
    },
}  # fmt: skip
SCHEMAS = {
    "Status": STATUS,
    "StatusQueue": {
        "type": "object",
        "required": ["total", "source", "oldest_waiting_since", "oldest_age_seconds",
                     "by_status", "by_lane", "domains"],
        "properties": {
            "total": {"type": "integer", "minimum": 0},
            "source": {"enum": ["scheduler", "history"],
                       "description": "who said why each message waits"},
            "oldest_waiting_since": {
                **NULLABLE_TIME, "description": "the oldest message's arrival, or its "
                "X-Relay-Send-At time when later (mail scheduled ahead does not count)",
            },
            "oldest_age_seconds": {"type": ["number", "null"], "minimum": 0},
            "by_status": counts_of("messages by why they wait (relay queue list's words)"),
            "by_lane": {"type": "object", "description": "lane: messages by why they wait",
                        "additionalProperties": counts_of("by why they wait")},
            "domains": {"type": "array", "description": "the recipient domains with most mail",
                        "items": {"type": "object", "required": ["domain", "total"]}},
        },
    },
    "StatusDestination": {
        "type": "object",
        "description": "a destination busy, throttled, suspended or with mail waiting",
        "required": ["destination", "state", "busy", "connections", "limit", "rate", "level",
                     "waiting", "suspended_until", "last_reply"],
        "properties": {
            "destination": {"type": "string"}, "state": {"type": "string"},
            "busy": {"type": "integer"}, "connections": {"type": "integer"},
            "limit": {"type": "integer"}, "rate": {"type": ["number", "null"]},
            "level": {"type": "integer", "description": "throttle level; 0: full speed"},
            "waiting": {"type": "integer"}, "suspended_until": NULLABLE_TIME,
            "last_reply": {"type": ["string", "null"]},
        },
    },
    "StatusDeadLetters": {
        "type": "object",
        "required": ["count", "latest"],
        "properties": {
            "count": {"type": "integer", "minimum": 0},
            "latest": {"type": "array", "maxItems": DEAD_SHOWN, "items": {
                "type": "object",
                "required": ["id", "tenant", "sender", "dead_lettered_at", "reason",
                             "recipients"],
                "properties": {"reason": {"enum": ["permanent", "expired", "mixed"]},
                               "recipients": {"type": "array"}},
            }},
        },
    },
    "StatusWebhook": {
        "type": "object",
        "required": ["name", "url", "state", "pending", "parked", "lag_seconds", "disabled",
                     "last_error"],
        "properties": {
            "state": {"enum": ["active", "disabled", "unreadable"]},
            "pending": {"type": "integer"}, "parked": {"type": "integer"},
            "lag_seconds": {"type": "number"}, "disabled": {"type": ["string", "null"]},
            "last_error": {"type": ["string", "null"]},
        },
    },
}  # fmt: skip
ROUTES = (
    Route(
        "GET", "/v1/status", status, "getStatus",
        "The relay at a glance (the status page's data): queue, destinations, dead letters, "
        "webhooks, outcomes per minute", "read",
        {200: Answer("the status", ref("Status")),
         403: problem("the token lacks the read scope, or sees one tenant only")},
        schemas=SCHEMAS,
    ),
)  # fmt: skip
