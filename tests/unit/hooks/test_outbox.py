"""The webhook outbox, in process on a real SQLite file: events owed with their files' offsets
in one transaction, taken again after a crash without a second row, due in event order,
retried then parked, and counted for the metrics."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from relay.history import ingest
from relay.history.store import History
from relay.hooks.outbox import Outbox
from relay.spool import cursor
from relay.spool.journal import Journal

DAY = 86400.0


def event(n: int, name: str = "delivered", tenant: str = "shop") -> dict[str, Any]:
    return {"event_id": f"{n:019d}-scheduler.1-{n}", "event": name, "tenant": tenant,
            "timestamp": "2026-12-01T10:00:00.000000Z", "id": f"m{n}"}  # fmt: skip


def everything(_: Any) -> bool:
    return True


def test_events_are_owed_once_with_their_offset(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "hooks" / "app.sqlite")
    batch = [event(1), event(2, "deferred"), event(3)]
    assert box.take("f1", batch, 300, lambda e: e["event"] != "deferred") == 2
    assert box.offset("f1") == 300
    box.close()
    again = Outbox(tmp_path / "hooks" / "app.sqlite")  # a restart that reads the file again
    assert again.take("f1", batch, 200, everything) == 1  # only the one it did not want before
    assert again.offset("f1") == 300  # never back
    assert [o.event_id for o in again.due(time.time(), 10)] == [e["event_id"] for e in batch]


def test_due_in_order_skipping_those_in_flight(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "app.sqlite")
    box.take("f", [event(n) for n in (3, 1, 2)], 10, everything)
    now = time.time()
    assert [o.event_id[-1] for o in box.due(now, 2)] == ["1", "2"]
    first = box.due(now, 1)[0].event_id
    assert [o.event_id[-1] for o in box.due(now, 5, skip=[first])] == ["2", "3"]
    box.done(first)
    assert len(box.due(now, 5)) == 2


def test_a_failure_waits_then_parks_and_the_backlog_says_so(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "app.sqlite")
    box.take("f", [event(1), event(2)], 10, everything)
    now = time.time()
    box.again(event(1)["event_id"], now + 60, "HTTP 500")
    assert [o.event_id for o in box.due(now + 1, 5)] == [event(2)["event_id"]]
    [later] = box.due(now + 61, 5)[:1]
    assert later.failures == 1 and box.flag("last_error") == "HTTP 500"
    box.again(event(2)["event_id"], None, "timeout")  # the schedule is spent: parked
    backlog = box.backlog()
    assert (backlog.ready, backlog.parked) == (1, 1) and backlog.oldest is not None
    assert box.requeue(since=0) == 2 and box.backlog().parked == 0


def test_flags(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "app.sqlite")
    assert box.flag("disabled") is None
    box.set_flag("disabled", "410 Gone at 2026-12-01T10:00:00Z")
    assert Outbox(tmp_path / "app.sqlite").flag("disabled") == "410 Gone at 2026-12-01T10:00:00Z"
    box.set_flag("disabled", None)
    assert box.flag("disabled") is None


def taken_in_by_history(root: Path) -> tuple[Path, History]:
    """A journal file of one event under root/events, which the history has taken in."""
    writer = Journal(root / "events", "scheduler", root)
    writer.append([event(1)])
    writer.close()
    [path] = (root / "events").iterdir()
    history = History(root / "history" / "history.sqlite")
    ingest.catch_up(history, root / "events")
    return path, history


def test_journal_files_wait_for_every_live_outbox_before_pruning(tmp_path: Path) -> None:
    events_dir, hooks_dir = tmp_path / "events", tmp_path / "hooks"
    path, history = taken_in_by_history(tmp_path)
    lagging = Outbox(hooks_dir / "app.sqlite")  # has not read the file yet
    old = time.time() - 3 * DAY
    os.utime(path, (old, old))
    ingest.prune(history, events_dir, retention=DAY)
    assert path.exists()  # the history took it in, the outbox not yet
    cursor.catch_up(lagging, events_dir, lambda f, e, o: lagging.take(f, e, o, everything))
    ingest.prune(history, events_dir, retention=DAY)
    assert not path.exists()


def test_an_outbox_idle_for_the_retention_holds_nothing_back(tmp_path: Path) -> None:
    events_dir, hooks_dir = tmp_path / "events", tmp_path / "hooks"
    path, history = taken_in_by_history(tmp_path)
    Outbox(hooks_dir / "gone.sqlite").close()  # an endpoint removed from the configuration
    old = time.time() - 3 * DAY
    for file in [path, *hooks_dir.iterdir()]:
        os.utime(file, (old, old))
    ingest.prune(history, events_dir, retention=DAY)
    assert not path.exists()


def test_one_messages_events_go_in_order(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "app.sqlite")
    first, second = {**event(1), "id": "m"}, {**event(2), "id": "m"}
    box.take("f", [first, second, event(3)], 10, everything)
    now = time.time()
    assert [o.event_id for o in box.due(now, 5)] == [first["event_id"], event(3)["event_id"]]
    box.again(first["event_id"], now + 60, "HTTP 503")  # waiting: the later one waits too
    assert [o.event_id for o in box.due(now, 5)] == [event(3)["event_id"]]
    box.again(first["event_id"], None, "HTTP 503")  # parked: it holds nothing back
    assert [o.event_id for o in box.due(now, 5)] == [second["event_id"], event(3)["event_id"]]
