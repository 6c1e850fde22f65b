"""API, the suppression lists: `GET /v1/suppressions` (a page of live entries, filtered by
kind and address), `POST /v1/suppressions` (add an address or a blocklist pattern; answered
once it is on disk) and `DELETE /v1/suppressions?address=` (lift one). A token with a tenant
sees and changes its own list only; with suppression.shared everyone's is the shared one."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from relay.api import live
from relay.api.auth import tenant
from relay.api.messages import limit
from relay.api.problems import Problem
from relay.api.spec import Answer, Route, Schema, problem, ref
from relay.api.submit import CONFIG
from relay.api.tokens import NAME_RE
from relay.config.values import duration
from relay.mail.events import DEFAULT_TENANT
from relay.suppression import store as lists
from relay.suppression.store import KINDS, MANUAL, MANUAL_KINDS, Entry, Suppressions

OPEN: dict[Path, Suppressions] = {}  # by file: one durable connection per process


def store(request: web.Request) -> Suppressions:
    """The lists (next to the message history), opened at the first request; synchronous=FULL:
    an answer means on disk."""
    path = lists.path_of(live.history(request).path)
    found = OPEN.get(path)
    if found is None:
        found = OPEN[path] = Suppressions(path, durable=True)
    return found


def whose(request: web.Request, asked: str | None, default: str | None) -> str | None:
    """The list a request works on: the shared one, the token's tenant's, else the tenant
    asked for (None: every tenant's, for listing)."""
    if request.app[CONFIG].cfg.suppression.shared:
        return lists.SHARED
    own = tenant(request)
    if own is not None:
        if asked is not None and asked != own:
            raise Problem(403, f"this token sees tenant {own}'s list only", field="tenant")
        return own
    if asked is not None and not NAME_RE.match(asked):
        raise Problem(400, f"tenant: {asked[:70]!r} is not a tenant", field="tenant")
    return default if asked is None else asked


def cursor(text: str | None) -> int:
    if text is None:
        return 0
    if not text.isdigit():
        raise Problem(400, f"cursor: {text[:40]!r} is not a cursor this API gave", field="cursor")
    return int(text)


async def list_suppressions(request: web.Request) -> web.Response:
    params = request.query
    kind = params.get("kind")
    if kind is not None and kind not in KINDS:
        raise Problem(400, f"kind: {kind[:40]!r} is not one of {', '.join(KINDS)}", field="kind")
    page, after = await asyncio.to_thread(
        store(request).entries, whose(request, params.get("tenant"), None), time.time(), kind,
        params.get("address"), limit(params.get("limit")), cursor(params.get("cursor")),
    )  # fmt: skip
    return web.json_response({"suppressions": [e.as_dict() for e in page],
                              "next_cursor": None if after is None else str(after)})  # fmt: skip


async def add_suppression(request: web.Request) -> web.Response:
    body = await _body(request)
    kind, expires_in = body.get("kind", MANUAL), body.get("expires_in")
    if not isinstance(kind, str):
        raise Problem(400, "kind: not a string", field="kind")
    try:
        address = lists.checked(str(body.get("address", "")), kind)
    except ValueError as exc:
        field = "kind" if kind not in MANUAL_KINDS else "address"
        raise Problem(400, f"{field}: {exc}", field=field) from None
    try:
        ttl = None if expires_in is None else duration(expires_in)
    except ValueError as exc:
        raise Problem(400, f"expires_in: {exc}", field="expires_in") from None
    reason = body.get("reason", "")
    if not isinstance(reason, str) or len(reason) > 1000:
        raise Problem(400, "reason: a string of at most 1000 characters", field="reason")
    now = time.time()
    owner = whose(request, body.get("tenant"), DEFAULT_TENANT) or DEFAULT_TENANT
    entry = Entry(owner, address, kind, reason, now, None if ttl is None else now + ttl)
    stored = await asyncio.to_thread(store(request).add, entry)
    return web.json_response(stored.as_dict(), status=201)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise Problem(400, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise Problem(400, "the body is not a JSON object")
    return body


async def delete_suppression(request: web.Request) -> web.Response:
    address = request.query.get("address")
    if not address:
        raise Problem(400, "address: which address or pattern to lift", field="address")
    owner = whose(request, request.query.get("tenant"), DEFAULT_TENANT) or DEFAULT_TENANT
    if not await asyncio.to_thread(store(request).delete, owner, address):
        raise Problem(404, f"{address[:254]} is not on tenant {owner}'s list", field="address")
    return web.Response(status=204)


TENANT = {"type": "string", "description": "whose list (`*`: the shared one)"}
SUPPRESSION: Schema = {
    "type": "object",
    "required": ["tenant", "address", "pattern", "kind", "reason", "created", "expires"],
    "properties": {
        "tenant": TENANT,
        "address": {"type": "string", "description": "lowercase address, or a pattern with *"},
        "pattern": {"type": "boolean"},
        "kind": {"enum": list(KINDS)},
        "reason": {"type": "string", "description": "the reply that caused it, or a person's"},
        "created": {"type": "string", "format": "date-time"},
        "expires": {"type": ["string", "null"], "format": "date-time",
                    "description": "null: never"},
    },
}  # fmt: skip
NEW_SUPPRESSION: Schema = {
    "type": "object",
    "required": ["address"],
    "properties": {
        "address": {"type": "string", "description": "an address, or (blocklist) a pattern "
                    "like *@example.com or user+*@example.org"},
        "kind": {"enum": list(MANUAL_KINDS), "default": MANUAL},
        "reason": {"type": "string", "maxLength": 1000},
        "expires_in": {"type": ["string", "number"], "description": "30d, 12h or seconds; "
                       "absent: never"},
        "tenant": {"type": "string", "description": "tokens without a tenant only; default "
                   "`default`"},
    },
}  # fmt: skip
PAGE: Schema = {
    "type": "object",
    "required": ["suppressions", "next_cursor"],
    "properties": {"suppressions": {"type": "array", "items": ref("Suppression")},
                   "next_cursor": {"type": ["string", "null"]}},
}  # fmt: skip


def _query(name: str, description: str, schema: Schema) -> Schema:
    return {"name": name, "in": "query", "description": description, "schema": schema}


FILTERS = (
    _query("kind", "only entries of this kind", {"enum": list(KINDS)}),
    _query("address", "the address's own entry and the patterns matching it", {"type": "string"}),
    _query("tenant", "only this tenant's (a token with a tenant sees its own only)", TENANT),
    _query("limit", "entries per page (default 100)",
           {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}),
    _query("cursor", "the next_cursor of the page before", {"type": "string"}),
)  # fmt: skip
ROUTES = (
    Route(
        "GET", "/v1/suppressions", list_suppressions, "listSuppressions",
        "Live suppression entries, oldest first", "read",
        {200: Answer("a page; next_cursor for the next one", ref("SuppressionPage")),
         400: problem("a filter is not valid")},
        parameters=FILTERS,
        schemas={"Suppression": SUPPRESSION, "SuppressionPage": PAGE,
                 "NewSuppression": NEW_SUPPRESSION},
    ),
    Route(
        "POST", "/v1/suppressions", add_suppression, "addSuppression",
        "Suppress an address or a blocklist pattern (answered once it is on disk)", "send",
        {201: Answer("the entry as stored", ref("Suppression")),
         400: problem("the address, kind, reason or expires_in is not valid")},
        body=ref("NewSuppression"),
    ),
    Route(
        "DELETE", "/v1/suppressions", delete_suppression, "deleteSuppression",
        "Lift an address or a pattern (written as it was added)", "send",
        {204: Answer("lifted"), 400: problem("no address given"),
         404: problem("it is not on the list")},
        parameters=(FILTERS[1], FILTERS[2]),
    ),
)  # fmt: skip
