"""API, the endpoints about the API itself: its OpenAPI document (no token) and `/v1/ping`,
which answers the tenant a token sees (a first check of a new token)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from relay.api.auth import tenant
from relay.api.spec import Answer, Route, ref

DOCUMENT = web.AppKey("document", dict[str, Any])


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[DOCUMENT])


async def ping(request: web.Request) -> web.Response:
    return web.json_response({"tenant": tenant(request)})


PING = {
    "type": "object",
    "required": ["tenant"],
    "properties": {
        "tenant": {
            "type": ["string", "null"],
            "description": "the tenant the token sees and acts for; null: every tenant",
        },
    },
}
OPENAPI = {"type": "object", "required": ["openapi", "info", "paths"]}
ROUTES = (
    Route(
        "GET", "/v1/openapi.json", openapi, "openapi", "This document (OpenAPI 3.1)", None,
        {200: Answer("the OpenAPI document", OPENAPI)},
    ),
    Route(
        "GET", "/v1/ping", ping, "ping", "Check a token: the tenant it sees", "read",
        {200: Answer("the token works", ref("Ping"))},
        schemas={"Ping": PING},
    ),
)  # fmt: skip
