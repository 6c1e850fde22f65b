"""API, authentication: `Authorization: Bearer <token>` on every /v1 path but the OpenAPI
document; no token or an unknown one is 401, a token without the route's scope 403, and the
request then carries the token (its tenant: None sees every tenant) for the handlers."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from relay.api.problems import Problem
from relay.api.tokens import Token, Tokens

TOKENS = web.AppKey("tokens", Tokens)
SCOPES = web.AppKey("scopes", dict[tuple[str, str], str | None])  # (method, path): scope
TOKEN = web.RequestKey("token", Token)
PREFIX = "/v1"
OPEN = frozenset({"/v1/openapi.json"})  # /v1 paths served without a token


def tenant(request: web.Request) -> str | None:
    """The tenant whose messages this request may see and act on; None: every tenant."""
    return request[TOKEN].tenant


def needs_token(path: str) -> bool:
    return (path == PREFIX or path.startswith(PREFIX + "/")) and path not in OPEN


def authenticate(request: web.Request) -> Token:
    """The request's token, or a 401 saying what is wrong (RFC 6750 §3)."""
    scheme, _, credentials = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        raise Problem(
            401,
            "this endpoint needs a header Authorization: Bearer <token> (relay token add)",
            field="Authorization",
            headers={"WWW-Authenticate": "Bearer"},
        )
    token = request.app[TOKENS].find(credentials.strip())
    if token is None:
        raise Problem(
            401,
            "the bearer token is not known to this relay (revoked, or mistyped)",
            field="Authorization",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return token


def required_scope(request: web.Request) -> str | None:
    """The scope the matched route needs; None for no route (the router's 404 or 405)."""
    info = request.match_info
    if info.http_exception is not None:
        return None
    resource = info.route.resource
    path = resource.canonical if resource is not None else ""
    return request.app[SCOPES].get((info.route.method, path))


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not needs_token(request.path):
        return await handler(request)
    token = authenticate(request)
    scope = required_scope(request)
    if scope is not None and scope not in token.scopes:
        raise Problem(
            403,
            f"token {token.name} lacks the scope {scope} (it has {', '.join(token.scopes)})",
            headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'},
            scope=scope,
        )
    request[TOKEN] = token
    return await handler(request)
