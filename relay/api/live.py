"""API, the live view: the message history the endpoints read, caught up with the journal when
an answer must include what just happened, and completed by the running scheduler (why each
pending message waits, as `relay queue list` says it; its cancels) over the control socket."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from relay.api.problems import Problem
from relay.history import ingest, project
from relay.history.store import History
from relay.mail.events import iso, seconds
from relay.mail.waiting import waiting_state
from relay.ops import control
from relay.spool.layout import Layout

# The message history the endpoints read (the API process is its only writer).
HISTORY = web.AppKey("history", History)
# The spool: its journal (to catch up) and its control socket (the running scheduler).
SPOOL = web.AppKey("spool", Layout)
ASK_TIMEOUT = 2.0  # a listing waits this long for the scheduler, then shows the history's view
CANCEL_TIMEOUT = 40.0  # a cancel waits for an attempt in flight (15 s) and a restarting scheduler
CHUNK = 1000  # ids per reasons request


class Feed:
    """Wakes the open event streams when the history has taken in new events (the follower's
    and a request's catch-up both tell it), and counts each token's open streams."""

    def __init__(self) -> None:
        self.signal = asyncio.Event()  # set, and replaced, at each batch taken in
        self.open: dict[str, int] = {}
        self.closing = False

    def taken(self) -> None:
        self.signal.set()
        self.signal = asyncio.Event()

    def close(self) -> None:
        """The API is stopping: every stream ends at its next look."""
        self.closing = True
        self.taken()


FEED = web.AppKey("feed", Feed)


def history(request: web.Request) -> History:
    found = request.app.get(HISTORY)
    if found is None:
        raise Problem(503, "the message history is not available in this process")
    return found


async def catch_up(request: web.Request) -> None:
    """Take in the journal's new events now, so an answer includes every change persisted
    before the request (the follower may be up to a poll behind)."""
    spool = request.app.get(SPOOL)
    if spool is not None:
        added = await asyncio.to_thread(ingest.catch_up, history(request), spool.events_dir)
        if added and FEED in request.app:
            request.app[FEED].taken()


async def ask(request: web.Request, message: dict[str, Any], timeout: float) -> Any:
    """The running scheduler's answer; ControlError when it cannot be asked."""
    spool = request.app.get(SPOOL)
    if spool is None:
        raise control.ControlError("no spool: the scheduler cannot be asked")
    return await control.ask(spool, message, timeout)


async def reasons(request: web.Request, ids: list[str]) -> dict[str, list[Any]] | None:
    """The scheduler's [reason, expected attempt, detail] of those ids it holds; None when it
    cannot be asked (the history's view stands in)."""
    out: dict[str, list[Any]] = {}
    try:
        for start in range(0, len(ids), CHUNK):
            message = {"op": "reasons", "ids": ids[start : start + CHUNK]}
            out |= await ask(request, message, ASK_TIMEOUT)
    except control.ControlError:
        return None
    return out


async def annotate(request: web.Request, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give each item its status, reason, reason_detail and expected_attempt_at: a pending
    message's from the scheduler, else (it is not indexed yet, or the scheduler cannot be asked)
    from what the history knows."""
    pending = [item["id"] for item in items if item["status"] == project.PENDING]
    live = (await reasons(request, pending)) if pending else {}
    now = time.time()
    for item in items:
        settle(item, (live or {}).get(item["id"]), now)
    return items


def settle(item: dict[str, Any], why: list[Any] | None, now: float) -> None:
    if item["status"] != project.PENDING:
        item.update(reason=None, reason_detail=None, expected_attempt_at=None)
        return
    reason, expected, detail = why if why is not None else waiting(item, now)
    item["status"] = item["reason"] = reason
    item["expected_attempt_at"] = iso(expected)
    item["reason_detail"] = detail or control.REASON_DETAILS.get(reason) or last_reply(item)


def waiting(item: dict[str, Any], now: float) -> list[Any]:
    """Why a pending message waits, from the history alone: held, scheduled, deferred or
    queued (the scheduler alone knows quota, throttled, suspended and active)."""
    send_at = seconds(item["send_at"])
    attempted = item["attempts"] > 0 or any(r["attempts"] for r in item["recipients"])
    state = waiting_state(
        held=item["held"],
        scheduled=send_at is not None and send_at > now,
        quota=False,
        attempted=attempted,
    )
    nexts = [seconds(r["next_attempt"]) for r in pending(item) if r["next_attempt"]]
    at = {"held": None, "scheduled": send_at}.get(state, max([now, *filter(None, nexts)]))
    return [state, at, None]


def pending(item: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in item["recipients"] if r["status"] == project.PENDING]


def last_reply(item: dict[str, Any]) -> str | None:
    """The last reply a pending recipient got, as `relay queue list` shows it."""
    replied = [r for r in pending(item) if r["reply"] is not None]
    latest = max(replied, key=lambda r: r["updated_at"] or "", default=None)
    if latest is None:
        return None
    reply = latest["reply"]
    words = [str(reply["code"] or ""), reply["enhanced"] or "", reply["text"] or ""]
    return f"{latest['address']}: {' '.join(w for w in words if w)}"


async def cancel(request: web.Request, message: dict[str, Any]) -> dict[str, Any]:
    """Cancel through the running scheduler ({"target": id} or {"batch": id}, and the
    tenant); 503 when it cannot be reached. Then the history is caught up with it."""
    try:
        answer = await ask(request, {"op": "cancel", **message}, CANCEL_TIMEOUT)
    except control.ControlError as exc:
        raise Problem(
            503, f"the scheduler could not be reached to cancel: {exc}; try again",
            headers={"Retry-After": "5"},
        ) from None  # fmt: skip
    await catch_up(request)
    result: dict[str, Any] = answer["messages"]
    return result
