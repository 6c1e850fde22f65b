"""API, the batches: `GET /v1/batches/{id}` (how many of its messages are in each status) and
`DELETE /v1/batches/{id}` (cancel every pending message of it, scheduled ones included), within
the token's tenant."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections import Counter
from typing import Any

from aiohttp import web

from relay.api import live, schemas
from relay.api.auth import tenant
from relay.api.problems import Problem
from relay.api.spec import Answer, Route, problem, ref
from relay.history import project
from relay.history.store import MAX_LIMIT, Query

BATCH_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")  # X-Relay-Batch-Id's grammar


def batch_id(request: web.Request) -> str:
    text = request.match_info["id"]
    if not BATCH_RE.fullmatch(text):
        raise Problem(404, f"{text[:70]!r} is not a batch id (1-64 of A-Z a-z 0-9 . _ -)",
                      field="id")  # fmt: skip
    return text


async def counts(request: web.Request, batch: str) -> dict[str, Any]:
    """{batch_id, total, counts by status}: the history's ended messages, and the pending ones
    by why they wait (the scheduler's reasons); 404 when the tenant has no message in it."""
    history, own = live.history(request), tenant(request)
    by_status = Counter(await asyncio.to_thread(history.batch, batch, own))
    if not by_status:
        raise Problem(404, f"no batch {batch!r} is known to this token", field="id")
    if by_status.pop(project.PENDING, 0):
        query: Query | None = Query(own, project.PENDING, batch_id=batch, limit=MAX_LIMIT)
        while query is not None:
            items, last = await asyncio.to_thread(history.messages, query)
            by_status.update(item["status"] for item in await live.annotate(request, items))
            query = None if last is None else dataclasses.replace(query, cursor=last)
    return {"batch_id": batch, "total": by_status.total(), "counts": dict(by_status)}


async def get_batch(request: web.Request) -> web.Response:
    batch = batch_id(request)
    await live.catch_up(request)
    return web.json_response(await counts(request, batch))


async def cancel_batch(request: web.Request) -> web.Response:
    batch = batch_id(request)
    await live.catch_up(request)
    await counts(request, batch)  # 404 for a batch the tenant does not have
    outcomes: Counter[str] = Counter()
    if await asyncio.to_thread(live.history(request).batch_ids, batch, tenant(request)):
        answers = await live.cancel(request, {"batch": batch, "tenant": tenant(request)})
        outcomes.update(answer["outcome"] for answer in answers.values())
    body = await counts(request, batch)
    return web.json_response({**body, "cancelled": outcomes["done"], "busy": outcomes["busy"]})


ROUTES = (
    Route(
        "GET", "/v1/batches/{id}", get_batch, "getBatch",
        "A batch: how many of its messages are in each status", "read",
        {200: Answer("the batch's counts", ref("Batch")),
         404: problem("no message of the token's tenant has this batch id")},
        parameters=(schemas.BATCH_ID,),
    ),
    Route(
        "DELETE", "/v1/batches/{id}", cancel_batch, "cancelBatch",
        "Cancel every pending message of a batch, scheduled ones included", "cancel",
        {200: Answer("how many were cancelled, and the batch's counts after",
                     ref("BatchCancelled")),
         404: problem("no message of the token's tenant has this batch id")},
        parameters=(schemas.BATCH_ID,),
    ),
)  # fmt: skip
