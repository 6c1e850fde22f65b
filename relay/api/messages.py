"""API, the messages: `GET /v1/messages` (a page, newest first, by an opaque cursor),
`GET /v1/messages/{id}` (one message, its attempts and its events) and
`DELETE /v1/messages/{id}` (cancel what is pending), each within the token's tenant."""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from relay.api import live, schemas
from relay.api.auth import tenant
from relay.api.problems import Problem
from relay.api.spec import Answer, Route, problem, ref
from relay.history import project
from relay.history.store import MAX_LIMIT, Query, reply
from relay.mail import events as names
from relay.spool.message import is_id

FINAL = frozenset({*project.FINAL, project.PARTIAL})
WAITING = frozenset(schemas.STATUSES) - FINAL  # why a pending message waits
PARAMETERS = frozenset(p["name"] for p in schemas.LIST_PARAMETERS)


def encode_cursor(msg_id: str) -> str:
    return base64.urlsafe_b64encode(msg_id.encode()).decode().rstrip("=")


def decode_cursor(text: str) -> str:
    try:
        msg_id = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
    except (binascii.Error, ValueError):
        msg_id = ""
    if not is_id(msg_id):
        raise Problem(400, f"cursor: {text[:40]!r} is not a cursor this API gave", field="cursor")
    return msg_id


def moment(name: str, text: str) -> float:
    """A query parameter's ISO 8601 time as UTC epoch seconds (no zone: UTC)."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise Problem(
            400, f"{name}: {text[:40]!r} is not an ISO 8601 time (2026-12-01T10:00:00Z)",
            field=name,
        ) from None  # fmt: skip
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def limit(text: str | None) -> int:
    if text is None:
        return 100
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise Problem(400, f"limit: {text[:20]!r} is not a whole number from 1 to {MAX_LIMIT}",
                      field="limit")  # fmt: skip
    return int(text)


def parse(request: web.Request) -> Query | None:
    """The listing's query within the token's tenant; None when it can match nothing (the
    tenant= of another tenant: the token sees its own tenant only)."""
    params = request.query
    for name in params:
        if name not in PARAMETERS:
            raise Problem(400, f"{name}: not a parameter of this endpoint", field=name)
    status = params.get("status")
    if status is not None and status not in schemas.STATUSES:
        raise Problem(400, f"status: {status[:40]!r} is not one of {', '.join(schemas.STATUSES)}",
                      field="status")  # fmt: skip
    own, asked = tenant(request), params.get("tenant")
    if own is not None and asked is not None and asked != own:
        return None
    return Query(
        tenant=own if own is not None else asked,
        status=status,
        recipient=params.get("recipient"),
        batch_id=params.get("batch_id"),
        since=moment("since", params["since"]) if "since" in params else None,
        until=moment("until", params["until"]) if "until" in params else None,
        limit=limit(params.get("limit")),
        cursor=decode_cursor(params["cursor"]) if "cursor" in params else None,
    )


async def list_messages(request: web.Request) -> web.Response:
    query = parse(request)
    if query is None:
        return web.json_response({"messages": [], "next_cursor": None})
    if query.cursor is None:
        await live.catch_up(request)  # the first page: everything acknowledged before it
    if query.status in WAITING:
        items, last = await waiting_page(request, query)
    else:
        items, last = await asyncio.to_thread(live.history(request).messages, query)
        await live.annotate(request, items)
    cursor = None if last is None else encode_cursor(last)
    return web.json_response({"messages": items, "next_cursor": cursor})


async def waiting_page(
    request: web.Request, query: Query
) -> tuple[list[dict[str, Any]], str | None]:
    """A page of pending messages waiting for one reason: the pending ones, chunk by chunk
    from the cursor, kept where the scheduler (or the history) gives that reason."""
    wanted, found = query.status, []
    chunk = dataclasses.replace(query, status=project.PENDING, limit=MAX_LIMIT)
    while True:
        items, more = await asyncio.to_thread(live.history(request).messages, chunk)
        for item in await live.annotate(request, items):
            if item["status"] == wanted:
                found.append(item)
            if len(found) > query.limit:
                return found[: query.limit], found[query.limit - 1]["id"]
        if more is None:
            return found, None
        chunk = dataclasses.replace(chunk, cursor=more)


async def find(request: web.Request, msg_id: str) -> dict[str, Any]:
    """One message of the token's tenant as the journal has it now (the history caught up
    first: a delivery a moment ago shows); 404 if it is unknown (or another tenant's)."""
    history, own = live.history(request), tenant(request)
    item = None
    if is_id(msg_id):
        await live.catch_up(request)
        item = await asyncio.to_thread(history.message, msg_id, own)
    if item is None:
        raise Problem(404, f"no message {msg_id[:40]!r} is known to this token", field="id")
    return item


def attempts(item: dict[str, Any]) -> list[dict[str, Any]]:
    """Every delivery attempt, from the message's events."""
    return [
        {
            "at": e["timestamp"], "recipient": e.get("rcpt"), "attempt": e.get("attempt"),
            "outcome": e["event"], "mx": e.get("mx"), "ip": e.get("ip"), "tls": e.get("tls"),
            "reply": reply(e.get("code"), e.get("enhanced"), e.get("reply")),
        }
        for e in item["events"]
        if e.get("event") in names.OF_ATTEMPT.values()
    ]  # fmt: skip


async def get_message(request: web.Request) -> web.Response:
    item = await find(request, request.match_info["id"])
    await live.annotate(request, [item])
    item["history"] = attempts(item)
    return web.json_response(item)


def nothing_pending(item: dict[str, Any]) -> Problem:
    return Problem(
        409, f"message {item['id']} has nothing pending to cancel: it is {item['status']}",
        message_status=item["status"],
        ended=[{"address": r["address"], "status": r["status"]} for r in item["recipients"]],
    )  # fmt: skip


async def cancel_message(request: web.Request) -> web.Response:
    msg_id = request.match_info["id"]
    item = await find(request, msg_id)  # caught up: a message requeued or ended a moment ago
    if item["status"] != project.PENDING:
        raise nothing_pending(item)
    answer = (await live.cancel(request, {"target": msg_id, "tenant": tenant(request)}))[msg_id]
    if answer["outcome"] == "busy":
        raise Problem(503, f"message {msg_id} is still in a delivery attempt; try again",
                      headers={"Retry-After": "5"})  # fmt: skip
    if answer["outcome"] != "done":  # it ended meanwhile
        raise nothing_pending(await find(request, msg_id))
    ended = {r["status"] for r in answer["ended"]} | {"cancelled"}
    status = ended.pop() if len(ended) == 1 else project.PARTIAL
    body = {"id": msg_id, "status": status, "cancelled": answer["cancelled"],
            "ended": answer["ended"]}  # fmt: skip
    return web.json_response(body)


ROUTES = (
    Route(
        "GET", "/v1/messages", list_messages, "listMessages",
        "Messages, newest first, a page at a time", "read",
        {200: Answer("a page; next_cursor for the next one", ref("MessagePage")),
         400: problem("a parameter is wrong (`field` names it)")},
        parameters=schemas.LIST_PARAMETERS, schemas=schemas.COMPONENTS,
    ),
    Route(
        "GET", "/v1/messages/{id}", get_message, "getMessage",
        "One message: its status, recipients, every attempt and its events", "read",
        {200: Answer("the message", ref("MessageDetail")),
         404: problem("no such message, or another tenant's")},
        parameters=(schemas.MESSAGE_ID,),
    ),
    Route(
        "DELETE", "/v1/messages/{id}", cancel_message, "cancelMessage",
        "Cancel every pending recipient (an attempt in flight is waited for)", "cancel",
        {200: Answer("what was cancelled and what had ended already", ref("Cancelled")),
         404: problem("no such message, or another tenant's"),
         409: problem("nothing was pending: every recipient had ended")},
        parameters=(schemas.MESSAGE_ID,),
    ),
)  # fmt: skip
