"""Observation, the endpoint: the supervisor's HTTP endpoint on metrics.listen, serving /metrics for
Prometheus, /healthz (process up) and /readyz (listening, spool writable and above its
reserve, scheduler alive)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

READ_TIMEOUT = 5.0
TEXT = "text/plain; charset=utf-8"
Response = tuple[int, str, bytes]
REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class Endpoint:
    """A minimal HTTP/1.1 server: one GET per connection, closed after the response."""

    def __init__(self, registry: CollectorRegistry, problems: Callable[[], list[str]]) -> None:
        self.registry = registry
        self.problems = problems  # why the relay is not ready; empty when it is

    async def start(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._handle, host, port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
            while await asyncio.wait_for(reader.readline(), READ_TIMEOUT) not in (
                b"\r\n",
                b"\n",
                b"",
            ):
                pass  # headers: nothing here needs them
            status, content_type, body = await self._respond(request.decode("latin-1").split())
            head = (
                f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError, ValueError):
            pass  # a broken or slow client gets nothing; the scrape is retried
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _respond(self, request: list[str]) -> Response:
        if len(request) != 3:
            return 405, TEXT, b"GET only\n"
        method, target, _ = request
        if method not in ("GET", "HEAD"):
            return 405, TEXT, b"GET only\n"
        path = target.split("?", 1)[0]
        if path == "/metrics":
            body = await asyncio.to_thread(generate_latest, self.registry)
            return 200, CONTENT_TYPE_LATEST, body
        if path == "/healthz":
            return 200, TEXT, b"ok\n"
        if path == "/readyz":
            problems = await asyncio.to_thread(self.problems)
            if problems:
                return 503, TEXT, ("".join(f"{p}\n" for p in problems)).encode()
            return 200, TEXT, b"ready\n"
        return 404, TEXT, b"not found: try /metrics, /healthz or /readyz\n"
