"""The API's aiohttp app served in-process on a loopback port, and a client for it: what the
unit tests of the API's framework (tokens, problem details, the OpenAPI document) talk to."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from relay import config
from relay.api import app, tokens
from relay.api.spec import Route
from relay.history.store import History
from relay.spool.layout import Layout

T = TypeVar("T")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any  # parsed JSON, or the text if it is not JSON

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")


def add_token(path: Path, name: str, tenant: str | None = None, scopes: str = "read") -> str:
    """What `relay token add` does: a new token in the file; returns the token."""
    table = tokens.load(path)
    table[name], secret = tokens.new(name, tenant, tokens.parse_scopes(scopes))
    tokens.save(path, table)
    return secret


class Client:
    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def call(self, method: str, path: str, token: str | None = None) -> Answer:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        async with self.session.request(method, self.base + path, headers=headers) as response:
            if response.content_type == "text/event-stream":  # it never ends: headers only
                return Answer(response.status, dict(response.headers), "")
            text = await response.text()
            try:
                body: Any = json.loads(text)
            except ValueError:
                body = text
            return Answer(response.status, dict(response.headers), body)


@contextlib.asynccontextmanager
async def served(
    tokens_file: Path,
    routes: tuple[Route, ...] = app.ROUTES,
    history: History | None = None,
    spool: Layout | None = None,
    cfg: config.Config | None = None,
) -> AsyncIterator[Client]:
    built = app.build(tokens.Tokens(tokens_file), routes, history=history, spool=spool, cfg=cfg)
    runner = web.AppRunner(built, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        async with aiohttp.ClientSession() as session:
            yield Client(session, f"http://127.0.0.1:{site.port}")
    finally:
        await runner.cleanup()


def run(tokens_file: Path, scenario: Callable[[Client], Awaitable[T]], **kw: Any) -> T:
    """Run scenario against a freshly served app."""

    async def main() -> T:
        async with served(tokens_file, **kw) as client:
            return await scenario(client)

    return asyncio.run(main())
