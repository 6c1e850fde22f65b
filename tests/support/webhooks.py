"""A webhook receiver for the tests: a real aiohttp server on loopback, in a thread of its own,
that verifies every request as a Standard Webhooks receiver does (the `standardwebhooks`
library) and answers as a test tells it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from standardwebhooks import Webhook

from tests.support.daemon import free_port

# answer(document, how many times its id came) -> the HTTP status to answer
Answer = Callable[[dict[str, Any], int], int]


class Receiver:
    """POST /hook on 127.0.0.1:port; got: every verified document answered 2xx, in order."""

    def __init__(self, secret: str, answer: Answer = lambda _, __: 204, delay: float = 0.0) -> None:
        self.secret, self.answer, self.delay = secret, answer, delay
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.got: list[dict[str, Any]] = []
        self.tries: dict[str, int] = {}
        self.unverified = 0
        self._changed = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._runner = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    async def _start(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        return runner

    async def _handle(self, request: web.Request) -> web.Response:
        data = await request.read()
        await asyncio.sleep(self.delay)  # a slow receiver
        try:
            document = Webhook(self.secret).verify(data, dict(request.headers))
        except Exception:
            with self._changed:
                self.unverified += 1
            return web.Response(status=401)
        with self._changed:
            n = self.tries[document["id"]] = self.tries.get(document["id"], 0) + 1
            status = self.answer(document, n)
            if status < 300:
                self.got.append(document)
            self._changed.notify_all()
        return web.Response(status=status)

    def wait(self, check: Callable[[list[dict[str, Any]]], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not check(self.got):
                left = deadline - time.monotonic()
                assert left > 0, f"receiver: condition not met; got {self.got[-3:]}"
                self._changed.wait(left)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
