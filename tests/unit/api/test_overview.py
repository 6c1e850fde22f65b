"""GET /v1/status over a history, a spool and (or not) a scheduler answering on the control
socket: the queue by status and lane and its oldest message (the scheduler's reasons, or the
history's when it cannot be asked), the destinations, the dead letters, the webhooks and the
outcomes per minute of the last hour, in the shape the OpenAPI document gives; and the page's
own files, served with their types and a strict policy."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from relay import config
from relay.api import app
from relay.api.spec import document
from relay.history.store import History
from relay.mail.events import iso
from relay.mail.reply import Reply
from relay.spool.layout import DEAD, Layout
from relay.spool.message import Message, Recipient, encode
from relay.spool.run import CONTROL_SOCKET
from tests.unit.api.live import Answer, add_token, served

Scheduler = Callable[[dict[str, Any]], Any]  # a control request -> its answer


def mid(n: int) -> str:
    return f"{n:020x}"


def event(name: str, n: int, at: float, tenant: str = "default", **fields: Any) -> dict[str, Any]:
    return {"event_id": f"{n}-{name}-{at}", "event": name, "id": mid(n), "tenant": tenant,
            "sender": "app@s.test", "batch_id": None, "status": "pending",
            "timestamp": iso(at), **fields}  # fmt: skip


def received(n: int, at: float, lane: str = "normal", **fields: Any) -> dict[str, Any]:
    return event("received", n, at, rcpts=["x@a.test"], size=10, lane=lane,
                 send_at=fields.pop("send_at", None), **fields)  # fmt: skip


def outcome(
    name: str, n: int, at: float, attempt: int, status: str, **fields: Any
) -> dict[str, Any]:
    return event(name, n, at, rcpt="x@a.test", attempt=attempt, status=status, **fields)


def history_in(root: Path, now: float) -> History:
    """1 delivered 30 min ago; 2 (high lane, 10 min ago) deferred then and 2 min ago; 3 (low)
    held; 4, the first to arrive (70 min ago), scheduled for tomorrow; 5 (acme) bounced a
    minute ago; 6 delivered 2 h ago, out of the chart."""
    history = History(root / "history.sqlite")
    history.take("test", [
        received(1, now - 1800), outcome("delivered", 1, now - 1800, 1, "delivered", reply="250 ok"),
        received(2, now - 600, "high"), outcome("deferred", 2, now - 600, 1, "deferred"),
        outcome("deferred", 2, now - 120, 2, "deferred"),
        received(3, now - 300, "low"), event("held", 3, now - 290),
        received(4, now - 4200, send_at=iso(now + 86400)),
        received(5, now - 60, tenant="acme"), outcome("bounced", 5, now - 60, 1, "failed", tenant="acme"),
        received(6, now - 7200), outcome("delivered", 6, now - 7200, 1, "delivered"),
    ], 1)  # fmt: skip
    return history


def dead_letter(layout: Layout, n: int, dead_at: float, status: str, reply: Reply) -> None:
    rcpt = Recipient("nobody@a.test", status=status, attempts=1, reply=reply)
    msg = Message(mid(n), "app@s.test", [rcpt], dead_at - 5, dead_at, dead_at=dead_at)
    layout.state_path(mid(n), DEAD).write_bytes(encode(msg))


def settings(root: Path) -> config.Config:
    return config.parse(json.dumps({
        "spool": {"path": str(root / "spool")},
        "webhooks": [
            {"name": "crm", "url": "http://127.0.0.1:9/hook", "secret_file": str(root / "s")},
            {"name": "old", "url": "http://127.0.0.1:9/old", "secret_file": str(root / "s")},
        ],
    }))  # fmt: skip


@contextlib.asynccontextmanager
async def scheduler_at(layout: Layout, answer: Scheduler) -> AsyncIterator[None]:
    """A stand-in for the running scheduler: one JSON answer per request line."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = json.loads(await reader.readline())
        writer.write(json.dumps(answer(request)).encode() + b"\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(handle, layout.socket_address(CONTROL_SOCKET))
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


def ask(root: Path, path: str, token: str | None, scheduler: Scheduler | None = None) -> Answer:
    """path asked of the app over root's tokens, history and spool, with a scheduler or none."""
    layout = Layout(root / "spool")
    layout.prepare()

    async def main() -> Answer:
        history = History(root / "history.sqlite")
        served_app = served(root / "tokens", history=history, spool=layout, cfg=settings(root))
        async with served_app as client, contextlib.AsyncExitStack() as stack:
            if scheduler is not None:
                await stack.enter_async_context(scheduler_at(layout, scheduler))
            return await client.call("GET", path, token)

    return asyncio.run(main())


def conforms(body: Any) -> None:
    doc = document(app.ROUTES)
    schema = doc["paths"]["/v1/status"]["get"]["responses"]["200"]["content"]["application/json"]
    Draft202012Validator({**schema["schema"], "components": doc["components"]}).validate(body)


def prepared(root: Path, now: float) -> str:
    """The history, two dead letters and a broken outbox; returns an operator's token."""
    history_in(root, now).close()
    layout = Layout(root / "spool")
    layout.prepare()
    dead_letter(layout, 7, now - 3600, "expired", Reply(451, "4.4.1", "no answer"))
    dead_letter(layout, 8, now - 60, "failed", Reply(550, "5.1.1", "no such user"))
    (layout.hooks_dir / "old.sqlite").write_bytes(b"not a database, at all" * 100)
    return add_token(root / "tokens", "ops")


def test_without_the_scheduler_the_history_and_spool_say_what_they_know(tmp_path: Path) -> None:
    now = time.time()
    token = prepared(tmp_path, now)
    answer = ask(tmp_path, "/v1/status", token)
    assert answer.status == 200, answer.body
    body = answer.body
    conforms(body)
    assert body["scheduler"] == "unreachable" and body["destinations"] == []
    queue = body["queue"]
    assert queue["source"] == "history" and queue["total"] == 3 and queue["domains"] == []
    assert list(queue["by_status"].items()) == [("deferred", 1), ("scheduled", 1), ("held", 1)]
    assert queue["by_lane"] == {"high": {"deferred": 1}, "low": {"held": 1},
                                "normal": {"scheduled": 1}}  # fmt: skip
    assert 600 <= queue["oldest_age_seconds"] < 700  # 4, scheduled for tomorrow, is not due
    assert queue["oldest_waiting_since"] == iso(now - 600)

    chart = body["chart"]
    assert len(chart) == 60 and chart[-1]["minute"] == iso(now // 60 * 60)
    by_minute = {row["minute"]: row for row in chart}
    for ago, name in ((1800, "delivered"), (600, "deferred"), (120, "deferred"), (60, "bounced")):
        assert by_minute[iso((now - ago) // 60 * 60)][name] == 1, (ago, name)
    assert [sum(row[k] for row in chart) for k in ("delivered", "deferred", "bounced")] == [1, 2, 1]

    dead = body["dead_letters"]
    assert dead["count"] == 2 and [d["id"] for d in dead["latest"]] == [mid(8), mid(7)]
    assert dead["latest"][0]["reason"] == "permanent" and dead["latest"][1]["reason"] == "expired"
    assert dead["latest"][0]["recipients"] == [
        {"address": "nobody@a.test", "status": "failed", "attempts": 1,
         "reply": "550 5.1.1 no such user"}
    ]  # fmt: skip
    crm, old = body["webhooks"]
    assert (crm["state"], crm["pending"], crm["parked"], crm["last_error"]) == (
        "active",
        0,
        0,
        None,
    )
    assert old["state"] == "unreadable" and "old.sqlite" in old["last_error"]


def test_the_running_scheduler_says_why_each_message_waits(tmp_path: Path) -> None:
    now = time.time()
    token = prepared(tmp_path, now)
    shape = {"buckets_minutes": [5], "rows": [
        {"domain": "TOTAL", "total": 4, "buckets": {}},
        {"domain": "a.test", "total": 3, "buckets": {}}, {"domain": "b.test", "total": 1, "buckets": {}},
    ]}  # fmt: skip
    dest = {"destination": "a.test", "state": "suspended", "busy": 0, "connections": 0,
            "limit": 20, "rate": None, "level": 2, "waiting": 3,
            "suspended_until": now + 300, "last_reply": "421 4.7.28 slow down"}  # fmt: skip
    answers = {
        "summary": {"indexed": True, "summary": shape},
        "destinations": {"destinations": [dest]},
        "reasons": {mid(2): ["suspended", now + 300, "a.test suspended"],
                    mid(3): ["held", None, None], mid(4): ["scheduled", now + 86400, None],
                    mid(99): ["active", now, None]},  # not in the history yet
    }  # fmt: skip
    body = ask(tmp_path, "/v1/status", token, lambda request: answers[request["op"]]).body
    conforms(body)
    assert body["scheduler"] == "running"
    queue = body["queue"]
    assert queue["source"] == "scheduler" and queue["total"] == 4
    assert list(queue["by_status"]) == ["active", "suspended", "scheduled", "held"]
    assert queue["by_lane"] == {"high": {"suspended": 1}, "low": {"held": 1},
                                "normal": {"active": 1, "scheduled": 1}}  # fmt: skip
    assert queue["domains"] == [{"domain": "a.test", "total": 3}, {"domain": "b.test", "total": 1}]
    [shown] = body["destinations"]
    assert shown["suspended_until"] == iso(now + 300) and shown["level"] == 2

    answers["summary"] = {"indexed": False}  # its first scan: not every message is known yet
    body = ask(tmp_path, "/v1/status", token, lambda request: answers[request["op"]]).body
    assert body["scheduler"] == "starting" and body["queue"]["source"] == "history"
    assert body["queue"]["by_status"] == {"deferred": 1, "scheduled": 1, "held": 1}
    assert body["destinations"][0]["destination"] == "a.test"


def test_operators_only(tmp_path: Path) -> None:
    acme = add_token(tmp_path / "tokens", "acme", tenant="acme")
    answer = ask(tmp_path, "/v1/status", acme)
    assert answer.status == 403 and answer.content_type == "application/problem+json"
    assert "needs a token of every tenant" in answer.body["detail"]
    assert ask(tmp_path, "/v1/status", None).status == 401


def test_the_page_is_served_with_a_strict_policy(tmp_path: Path) -> None:
    for path, kind, within in (("/", "text/html", b'<main id="dashboard"'),
                               ("/static/page.css", "text/css", b".tiles"),
                               ("/static/page.js", "text/javascript", b"/v1/events")):  # fmt: skip
        answer = ask(tmp_path, path, None)
        assert answer.status == 200 and answer.content_type.startswith(kind)
        assert within in answer.body.encode()
        assert answer.headers["Cache-Control"] == "no-cache"
        assert answer.headers["Content-Security-Policy"].startswith("default-src 'none'")
        assert answer.headers["Referrer-Policy"] == "no-referrer"
    for missing in ("/static/index.html", "/static/nothing.js", "/index.html"):
        assert ask(tmp_path, missing, None).status == 404
    assert not {"/", "/static/{name}"} & set(document(app.ROUTES)["paths"])
