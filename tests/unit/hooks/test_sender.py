"""The webhook sender against a real HTTP receiver on loopback (aiohttp), fed from a real
journal: every event signed and received once, final_only, a Retry-After honoured, a 4xx
dropping its event, a 410 disabling the endpoint, and the outbox surviving a new sender."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from standardwebhooks import Webhook

from relay.hooks.outbox import Outbox
from relay.hooks.sender import Sender
from relay.mail.events import NAMES
from relay.spool.journal import Journal

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
Answer = Callable[[dict[str, Any], int], web.Response]


@dataclass(frozen=True)
class Hook:
    url: str
    name: str = "app"
    events: frozenset[str] = NAMES
    tenants: tuple[str, ...] = ("*",)
    final_only: bool = False
    timeout: float = 5.0
    max_in_flight: int = 4
    ca_file: Path | None = None


@dataclass
class Receiver:
    """Verifies each request as a Standard Webhooks receiver does; answer(body, try) decides."""

    answer: Answer
    got: list[dict[str, Any]] = field(default_factory=list)
    tries: dict[str, int] = field(default_factory=dict)

    async def handle(self, request: web.Request) -> web.Response:
        data = await request.read()
        document = Webhook(SECRET).verify(data, dict(request.headers))
        assert request.headers["webhook-id"] == document["id"]
        n = self.tries[document["id"]] = self.tries.get(document["id"], 0) + 1
        reply = self.answer(document, n)
        if reply.status < 300:
            self.got.append(document)
        return reply


def journal(root: Path, names: list[str]) -> None:
    writer = Journal(root / "events", "scheduler", root)
    writer.append([
        {"event": name, "id": f"m{n:03d}", "tenant": "shop", "batch_id": None,
         "sender": "a@s.test", "status": "delivered", "rcpt": f"r{n}@a.test"}
        for n, name in enumerate(names)
    ])  # fmt: skip
    writer.close()


def run(
    root: Path, answer: Answer, until: Callable[[Receiver, Outbox], bool], **hook: Any
) -> tuple[Receiver, Outbox]:
    receiver = Receiver(answer)

    async def scenario() -> Outbox:
        app = web.Application()
        app.router.add_post("/hook", receiver.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        outbox = Outbox(root / "hooks" / "app.sqlite")
        sender = Sender(Hook(f"http://127.0.0.1:{port}/hook", **hook), outbox,
                        root / "events", lambda: [SECRET])  # fmt: skip
        stop = asyncio.Event()
        running = asyncio.ensure_future(sender.run(stop))
        for _ in range(100):  # at most 10 s
            if until(receiver, outbox):
                break
            await asyncio.sleep(0.1)
        stop.set()
        await running
        await runner.cleanup()
        return outbox

    return receiver, asyncio.run(scenario())


def ok(_: dict[str, Any], __: int) -> web.Response:
    return web.Response(status=204)


def test_every_event_signed_and_received_once(tmp_path: Path) -> None:
    journal(tmp_path, ["received", "deferred", "delivered", "bounced"])
    receiver, outbox = run(tmp_path, ok, lambda r, _: len(r.got) == 4)
    assert [d["type"] for d in receiver.got] == [
        "message.received", "message.deferred", "message.delivered", "message.bounced"
    ]  # fmt: skip
    assert all(d["data"]["event_id"] == d["id"] for d in receiver.got)
    assert outbox.backlog().ready == 0
    again, _ = run(tmp_path, ok, lambda r, _: False)  # a new sender on the same outbox
    assert again.got == []


def test_final_only_gets_no_deferral(tmp_path: Path) -> None:
    journal(tmp_path, ["received", "deferred", "delivered", "bounced"])
    receiver, _ = run(tmp_path, ok, lambda r, _: len(r.got) == 2, final_only=True)
    assert [d["type"] for d in receiver.got] == ["message.delivered", "message.bounced"]


def test_retry_after_then_done_and_a_4xx_dropped(tmp_path: Path) -> None:
    journal(tmp_path, ["delivered", "bounced"])

    def answer(document: dict[str, Any], n: int) -> web.Response:
        if document["type"] == "message.bounced":
            return web.Response(status=400)  # a permanent failure of this event
        return web.Response(status=204) if n > 1 else web.Response(
            status=503, headers={"Retry-After": "1"}
        )  # fmt: skip

    receiver, outbox = run(tmp_path, answer, lambda r, o: len(r.got) == 1 and not o.backlog().ready)
    assert [d["type"] for d in receiver.got] == ["message.delivered"]
    assert sorted(receiver.tries.values()) == [1, 2]
    assert outbox.backlog().ready == 0 and outbox.flag("last_error") == "HTTP 503"


def test_410_disables_the_endpoint(tmp_path: Path) -> None:
    journal(tmp_path, ["delivered", "bounced", "expired"])
    receiver, outbox = run(
        tmp_path,
        lambda _, __: web.Response(status=410),
        lambda _, o: o.flag("disabled") is not None,
        max_in_flight=1,
    )
    assert "410" in (outbox.flag("disabled") or "")
    assert sum(receiver.tries.values()) == 1  # nothing more once it said Gone
    assert outbox.backlog().ready == 3  # still owed, for `relay webhook enable`
