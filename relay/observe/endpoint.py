"""Observation, the endpoint: the supervisor's HTTP endpoint on metrics.listen (aiohttp), serving
/metrics for Prometheus, /healthz (process up) and /readyz (listening, spool writable and above
its reserve, scheduler alive)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

TEXT = "text/plain; charset=utf-8"
STOP_TIMEOUT = 2.0  # at exit, a scrape in flight gets this long to finish


def answer(status: int, content_type: str, body: bytes) -> web.Response:
    # Content-Type set as a header: aiohttp's content_type= takes no parameters (charset, version).
    return web.Response(status=status, body=body, headers={"Content-Type": content_type})


class Endpoint:
    """GET (or HEAD) /metrics, /healthz and /readyz; anything else is a plain-text 404 or 405."""

    def __init__(self, registry: CollectorRegistry, problems: Callable[[], list[str]]) -> None:
        self.registry = registry
        self.problems = problems  # why the relay is not ready; empty when it is
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._respond)
        self.runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=STOP_TIMEOUT
        )

    async def start(self, host: str, port: int) -> None:
        await self.runner.setup()
        try:
            await web.TCPSite(self.runner, host, port).start()
        except OSError:
            await self.runner.cleanup()
            raise

    async def stop(self) -> None:
        await self.runner.cleanup()

    async def _respond(self, request: web.Request) -> web.Response:
        if request.method not in ("GET", "HEAD"):
            return answer(405, TEXT, b"GET only\n")
        if request.path == "/metrics":
            body = await asyncio.to_thread(generate_latest, self.registry)
            return answer(200, CONTENT_TYPE_LATEST, body)
        if request.path == "/healthz":
            return answer(200, TEXT, b"ok\n")
        if request.path == "/readyz":
            problems = await asyncio.to_thread(self.problems)
            if problems:
                return answer(503, TEXT, ("".join(f"{p}\n" for p in problems)).encode())
            return answer(200, TEXT, b"ready\n")
        return answer(404, TEXT, b"not found: try /metrics, /healthz or /readyz\n")
