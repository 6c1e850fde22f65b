"""API, problem details: every error the API answers is an RFC 9457 `application/problem+json`
object (`type`, `title`, `status`, `detail`, and `field` where one field of the request is at
fault), including the router's 404 and 405 and our own failures (503, logged, no traceback)."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from relay.observe import logs

CONTENT_TYPE = "application/problem+json"
BLANK = "about:blank"  # RFC 9457 §4.2.1: the status code says it all; title is its phrase
DETAILS = {
    404: "no such resource: see /v1/openapi.json for what this API serves",
    413: "the request body is too large",
}


class Problem(Exception):
    """Raised by a handler (or the auth middleware) to answer with problem details."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        field: str | None = None,
        type_: str = BLANK,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.body: dict[str, Any] = {
            "type": type_,
            "title": title or HTTPStatus(status).phrase,
            "status": status,
            "detail": detail,
            **({"field": field} if field is not None else {}),
            **extra,
        }
        self.headers = headers or {}

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            body=json.dumps(self.body).encode(),
            headers={"Content-Type": CONTENT_TYPE, **self.headers},
        )


def from_http(exc: web.HTTPException) -> Problem:
    """The router's and aiohttp's own errors (404, 405, 413, …) as problem details."""
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return Problem(
            405,
            f"{exc.method} is not allowed here (allowed: {allowed})",
            headers={"Allow": allowed},
        )
    return Problem(exc.status, DETAILS.get(exc.status, exc.reason))


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: turns every error into problem details; an unexpected exception is our
    failure, logged as `error` and answered 503 without a word of its traceback."""
    try:
        return await handler(request)
    except Problem as problem:
        return problem.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # a redirect is not an error
        return from_http(exc).response()
    except Exception as exc:
        logs.failure("api", exc, method=request.method, path=request.path)
        return Problem(503, "the relay could not answer this request; try again").response()
