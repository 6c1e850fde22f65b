"""The messages and batches endpoints over a history fed from a real journal, with no scheduler
to ask (the history's view of why a message waits stands in): every field, the status filter
(final or a reason), pages by cursor, tenants, and a 400 naming each bad parameter."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from relay.api import tokens
from relay.history import ingest
from relay.history.store import History
from relay.mail.events import iso
from relay.spool.journal import Journal
from tests.unit.api.live import Answer, Client, add_token, run

LATER: dict[str, Any] = {
    "reply": "451 4.3.0 later",
    "code": 451,
    "enhanced": "4.3.0",
    "mx": "mx.a.test",
}
OK: dict[str, Any] = {"reply": "250 2.0.0 ok", "code": 250, "enhanced": "2.0.0", "mx": "mx.a.test"}


def mid(n: int) -> str:
    return f"{n:020x}"


def ev(name: str, n: int, tenant: str = "acme", **fields: Any) -> dict[str, Any]:
    return {"event": name, "id": mid(n), "tenant": tenant, "batch_id": fields.pop("batch", None),
            "sender": "app@s.test", "status": "pending", **fields}  # fmt: skip


def received(n: int, tenant: str = "acme", **fields: Any) -> dict[str, Any]:
    return ev("received", n, tenant, rcpts=["x@a.test"], size=10, lane="normal",
              send_at=fields.pop("send_at", None), **fields)  # fmt: skip


NEXT = time.time() + 10 * 86400  # far ahead: the suite may run for long before this test
SEND_AT = time.time() + 20 * 86400
EVENTS = [
    received(1, batch="b"), ev("delivered", 1, rcpt="x@a.test", attempt=1, batch="b",
                               **{**OK, "status": "delivered"}),
    received(2, batch="b"), ev("deferred", 2, rcpt="x@a.test", attempt=1, batch="b",
                               next_attempt=iso(NEXT), **LATER),
    received(3, "other"), ev("held", 3, "other"),
    received(4, "default", send_at=SEND_AT),
    *[e for n in range(5, 10) for e in (received(n), ev("delivered", n, rcpt="x@a.test",
                                                        attempt=1, **{**OK, "status": "delivered"}))],
]  # fmt: skip


def history_in(path: Path) -> History:
    writer = Journal(path / "events", "scheduler", path)
    writer.append(EVENTS)
    writer.close()
    history = History(path / "history.sqlite")
    ingest.catch_up(history, path / "events")
    return history


def scenario(tmp_path: Path, *calls: tuple[str, str, str]) -> list[Answer]:
    file = tmp_path / "tokens"
    names = {
        "admin": add_token(file, "admin", None, ",".join(tokens.SCOPES)),
        "acme": add_token(file, "acme", "acme", ",".join(tokens.SCOPES)),
    }

    async def call_all(client: Client) -> list[Answer]:
        return [await client.call(m, p, names[t]) for m, p, t in calls]

    return run(file, call_all, history=history_in(tmp_path))


def ids(answer: Answer) -> list[str]:
    assert answer.status == 200, answer.body
    return [m["id"] for m in answer.body["messages"]]


def test_every_field_and_why_each_waits_from_the_history(tmp_path: Path) -> None:
    [page] = scenario(tmp_path, ("GET", "/v1/messages?limit=1000", "admin"))
    items = {m["id"]: m for m in page.body["messages"]}
    assert list(items) == [mid(n) for n in range(9, 0, -1)]
    statuses = [items[mid(n)]["status"] for n in (1, 2, 3, 4)]
    assert statuses == ["delivered", "deferred", "held", "scheduled"]
    deferred = items[mid(2)]
    assert deferred["reason"] == "deferred" and deferred["batch_id"] == "b"
    assert deferred["expected_attempt_at"] == iso(NEXT)
    assert deferred["reason_detail"] == "x@a.test: 451 4.3.0 later"
    assert deferred["recipients"][0]["reply"] == {"code": 451, "enhanced": "4.3.0", "text": "later"}
    held = items[mid(3)]
    assert held["expected_attempt_at"] is None and "relay queue release" in held["reason_detail"]
    assert items[mid(4)]["expected_attempt_at"] == iso(SEND_AT)
    done = items[mid(1)]
    assert (done["reason"], done["expected_attempt_at"], done["reason_detail"]) == (None,) * 3
    assert done["finished_at"] is not None and done["tenant"] == "acme"


def test_filters_pages_and_tenants(tmp_path: Path) -> None:
    answers = scenario(
        tmp_path,
        ("GET", "/v1/messages?status=deferred", "admin"),
        ("GET", "/v1/messages?status=held", "admin"),
        ("GET", "/v1/messages?status=delivered&limit=2", "admin"),
        ("GET", "/v1/messages", "acme"),
        ("GET", "/v1/messages?tenant=other", "acme"),
        ("GET", "/v1/messages?tenant=other", "admin"),
        ("GET", f"/v1/messages/{mid(3)}", "acme"),
        ("GET", "/v1/messages?batch_id=b&recipient=X@A.TEST", "admin"),
        ("GET", "/v1/batches/b", "acme"),
        ("GET", "/v1/messages?since=2100-01-01T00:00:00Z", "admin"),
        ("GET", "/v1/messages?until=2100-01-01T00:00:00&limit=1000", "admin"),
    )
    deferred, held, delivered, acme, foreign, other, hidden, batch, counts, *times = answers
    assert ids(times[0]) == [] and len(ids(times[1])) == 9
    assert ids(deferred) == [mid(2)] and ids(held) == [mid(3)]
    assert ids(delivered) == [mid(9), mid(8)] and delivered.body["next_cursor"]
    assert set(ids(acme)) == {mid(n) for n in (1, 2, 5, 6, 7, 8, 9)}
    assert ids(foreign) == [] and ids(other) == [mid(3)]
    assert hidden.status == 404 and hidden.body["field"] == "id"
    assert ids(batch) == [mid(2), mid(1)]
    assert counts.body == {"batch_id": "b", "total": 2, "counts": {"delivered": 1, "deferred": 1}}


def test_the_cursor_walks_every_message_once(tmp_path: Path) -> None:
    file = tmp_path / "tokens"
    token = add_token(file, "admin", None, "read")

    async def walk(client: Client) -> list[str]:
        seen, path = [], "/v1/messages?limit=2"
        while True:
            answer = await client.call("GET", path, token)
            seen += ids(answer)
            if answer.body["next_cursor"] is None:
                return seen
            path = f"/v1/messages?limit=2&cursor={answer.body['next_cursor']}"

    assert run(file, walk, history=history_in(tmp_path)) == [mid(n) for n in range(9, 0, -1)]


def test_bad_parameters_are_400_naming_the_field(tmp_path: Path) -> None:
    bad = [("limit=0", "limit"), ("limit=1001", "limit"), ("cursor=AAAA", "cursor"),
           ("since=soon", "since"), ("until=1999-99-99", "until"), ("status=fine", "status"),
           ("page=2", "page")]  # fmt: skip
    answers = scenario(tmp_path, *[("GET", f"/v1/messages?{q}", "admin") for q, _ in bad])
    for (query, field), answer in zip(bad, answers, strict=True):
        assert answer.status == 400, query
        assert answer.content_type == "application/problem+json"
        assert answer.body["field"] == field and field in answer.body["detail"]
