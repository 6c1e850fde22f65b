"""The message history fed from a real journal on disk: each message's status and its
recipients' from the events, duplicates dropped, offsets kept, pages that neither miss nor
repeat a message while mail arrives, and pruning by retention."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from relay.history import ingest
from relay.history.store import History, Query
from relay.spool.journal import Journal

DAY = 86400.0


def ev(name: str, msg_id: str, rcpt: str | None = None, **fields: Any) -> dict[str, Any]:
    base = {"event": name, "id": msg_id, "tenant": fields.pop("tenant", "default"),
            "batch_id": fields.pop("batch_id", None), "sender": "app@sender.test"}  # fmt: skip
    if rcpt is not None:
        base["rcpt"] = rcpt
    return {**base, **fields}


def received(msg_id: str, *rcpts: str, **fields: Any) -> dict[str, Any]:
    return ev("received", msg_id, rcpts=list(rcpts), size=100, lane="normal", status="queued",
              send_at=None, **fields)  # fmt: skip


def reply(code: int, enhanced: str, text: str) -> dict[str, Any]:
    return {"reply": f"{code} {enhanced} {text}", "code": code, "enhanced": enhanced}


DELIVERED = reply(250, "2.0.0", "ok")
LATER = reply(451, "4.3.0", "later")
GONE = reply(550, "5.1.1", "no such user")


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    (tmp_path / "tmp").mkdir()
    return tmp_path


def journal(spool: Path, writer: str = "scheduler") -> Journal:
    return Journal(spool / "events", writer, spool / "tmp")


def history_of(spool: Path, *events: dict[str, Any]) -> History:
    writer = journal(spool)
    writer.append(events)
    writer.close()
    history = History(spool / "history.sqlite")
    ingest.catch_up(history, spool / "events")
    return history


@pytest.mark.parametrize(
    ("events", "status", "recipients"),
    [
        ([received("a", "x@a.test"),
          ev("delivered", "a", "x@a.test", status="delivered", attempt=1, mx="mx.a.test",
             ip="127.0.0.2", tls=True, **DELIVERED)],
         "delivered", [("x@a.test", "delivered", 1, 250)]),
        ([received("a", "x@a.test", "y@a.test"),
          ev("delivered", "a", "x@a.test", status="delivered", attempt=1, **DELIVERED),
          ev("bounced", "a", "y@a.test", status="failed", attempt=1, **GONE)],
         "partial", [("x@a.test", "delivered", 1, 250), ("y@a.test", "bounced", 1, 550)]),
        ([received("a", "x@a.test"),
          ev("deferred", "a", "x@a.test", status="pending", attempt=1,
             next_attempt="2026-12-01T16:00:00.000000Z", **LATER)],
         "pending", [("x@a.test", "pending", 1, 451)]),
        ([received("a", "x@a.test"), ev("cancelled", "a", "x@a.test", status="deleted")],
         "cancelled", [("x@a.test", "cancelled", 0, None)]),
        ([received("a", "x@a.test"),
          ev("deferred", "a", "x@a.test", status="pending", attempt=1, **LATER),
          ev("expired", "a", "x@a.test", status="expired", **LATER)],
         "expired", [("x@a.test", "expired", 1, 451)]),
        ([received("a", "x@a.test"),
          ev("bounced", "a", "x@a.test", status="failed", attempt=1, **GONE),
          ev("requeued", "a", status="queued")],
         "pending", [("x@a.test", "pending", 1, 550)]),
    ],
    ids=["delivered", "partial", "deferred", "cancelled", "expired", "requeued"],
)  # fmt: skip
def test_status_follows_the_events(
    spool: Path, events: list[dict[str, Any]], status: str, recipients: list[tuple[Any, ...]]
) -> None:
    item = history_of(spool, *events).message("a")
    assert item is not None and item["status"] == status
    got = [(r["address"], r["status"], r["attempts"], (r["reply"] or {}).get("code"))
           for r in item["recipients"]]  # fmt: skip
    assert got == recipients
    assert (item["finished_at"] is None) == (status == "pending")
    assert [e["event"] for e in item["events"]] == [e["event"] for e in events]


def test_a_repeated_event_is_taken_once_and_offsets_are_kept(spool: Path) -> None:
    writer = journal(spool)
    writer.append([received("a", "x@a.test")])
    history = History(spool / "history.sqlite")
    assert ingest.catch_up(history, spool / "events") == 1
    assert ingest.catch_up(history, spool / "events") == 0  # nothing new
    [line] = (spool / "events").iterdir().__next__().read_text().splitlines()
    again = Journal(spool / "events", "intake", spool / "tmp")
    again.append([ev("delivered", "a", "x@a.test", status="delivered", attempt=1, **DELIVERED)])
    history.close()
    history = History(spool / "history.sqlite")  # a restart of the reader
    assert ingest.catch_up(history, spool / "events") == 1
    item = history.message("a")
    assert item is not None and item["status"] == "delivered"
    assert line.startswith('{"event_id":')


def test_pages_neither_miss_nor_repeat_while_mail_arrives(spool: Path) -> None:
    writer = journal(spool, "intake")
    ids = [f"{n:020x}" for n in range(1, 251)]
    writer.append([received(i, "x@a.test") for i in ids])
    history = History(spool / "history.sqlite")
    ingest.catch_up(history, spool / "events")
    seen: list[str] = []
    cursor = None
    for page in range(10):
        items, cursor = history.messages(Query(limit=100, cursor=cursor))
        seen += [item["id"] for item in items]
        if page == 0:  # 50 more arrive after the first page
            writer.append([received(f"{n:020x}", "x@a.test") for n in range(251, 301)])
            ingest.catch_up(history, spool / "events")
        if cursor is None:
            break
    assert sorted(seen) == ids and len(seen) == len(set(seen))


def test_filters_by_tenant_recipient_batch_and_status(spool: Path) -> None:
    history = history_of(
        spool,
        received("a", "x@a.test", tenant="alice", batch_id="b1"),
        received("b", "Y@b.test", tenant="bob", batch_id="b1"),
        ev("delivered", "b", "Y@b.test", tenant="bob", batch_id="b1", status="delivered",
           attempt=1, **DELIVERED),
    )  # fmt: skip

    def ids(**query: Any) -> list[str]:
        return [m["id"] for m in history.messages(Query(**query))[0]]

    assert ids() == ["b", "a"]
    assert ids(tenant="alice") == ["a"]
    assert ids(recipient="y@b.test") == ["b"]
    assert ids(status="delivered") == ["b"]
    assert history.batch("b1") == {"pending": 1, "delivered": 1}
    assert history.batch("b1", tenant="alice") == {"pending": 1}
    assert history.batch_ids("b1") == ["a"]
    assert history.message("b", tenant="alice") is None


def test_prune_forgets_what_ended_before_the_retention(spool: Path) -> None:
    history = history_of(
        spool,
        received("a", "x@a.test"),
        ev("delivered", "a", "x@a.test", status="delivered", attempt=1, **DELIVERED),
        received("b", "x@a.test"),
    )
    [path] = (spool / "events").iterdir()
    ingest.prune(history, spool / "events", retention=DAY)
    assert history.message("a") is not None and path.exists()  # all within the window
    old = time.time() - 2 * DAY
    os.utime(path, (old, old))
    ingest.prune(history, spool / "events", retention=DAY, now=time.time() + 2 * DAY)
    assert history.message("a") is None  # delivered two days before "now"
    assert history.message("b") is not None  # still pending: kept
    assert not path.exists()  # taken in, closed, last written before the window


def test_an_event_seen_twice_changes_nothing_the_second_time(spool: Path) -> None:
    """A writer repeats no event id, but a file read twice (a copy, a rebuild over an old
    database) would: the event_id drops the repeat."""
    writer = journal(spool)
    writer.append([received("a", "x@a.test"),
                   ev("deferred", "a", "x@a.test", status="pending", attempt=1, **LATER)])  # fmt: skip
    writer.close()
    [path] = (spool / "events").iterdir()
    history = History(spool / "history.sqlite")
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert history.take("copy", events, 0) == 2
    assert history.take("copy", events, 0) == 0
    item = history.message("a")
    assert item is not None and item["attempts"] == 1 and len(item["events"]) == 2
