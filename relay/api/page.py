"""API, the status page: `GET /` and its stylesheet and script, plain files shipped in the
package (no build step, no CDN), served without a token (the page asks for one and sends it
to /v1/status and /v1/events itself), never cached stale, under a strict Content-Security-
Policy. Not API endpoints: they are not in the OpenAPI document."""

from __future__ import annotations

import functools
from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).with_name("static")
# name: content type; nothing else under static/ is served.
FILES = {
    "index.html": "text/html; charset=utf-8",
    "page.css": "text/css; charset=utf-8",
    "page.js": "text/javascript; charset=utf-8",
}
# Only the relay's own files and requests; no inline script or style, no frames, no forms
# elsewhere, no referrer (the address may hold ?token= for a moment).
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@functools.cache
def content(name: str) -> bytes:
    return (STATIC / name).read_bytes()


def serve(name: str) -> web.Response:
    return web.Response(body=content(name), headers={"Content-Type": FILES[name], **HEADERS})


async def index(request: web.Request) -> web.Response:
    return serve("index.html")


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in FILES or name == "index.html":
        raise web.HTTPNotFound()
    return serve(name)


def install(app: web.Application) -> None:
    """Add the page's routes to app (app.build does)."""
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", asset)
