"""The message history through the real daemon: the API process takes the journal in (every
message's status and its recipients'), catches up after a kill -9 of it, and `relay history
rebuild` derives the same history again with the relay stopped."""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path

from tests.support.daemon import Relay, RelayFactory, api_on, eventually
from tests.support.mx import MxSink


def statuses(daemon: Relay) -> dict[str, tuple[str, tuple[tuple[str, str], ...]]]:
    """id: (message status, ((recipient, status), ...)) as the history file holds them."""
    path = daemon.spool / "history" / "history.sqlite"
    if not path.exists():
        return {}
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT id, status FROM messages").fetchall()
        rcpts = db.execute("SELECT id, address, status FROM recipients ORDER BY address").fetchall()
    return {
        msg_id: (status, tuple((a, s) for i, a, s in rcpts if i == msg_id))
        for msg_id, status in rows
    }


def test_the_history_follows_the_journal_and_survives_its_writer(
    relay: RelayFactory, sink: MxSink
) -> None:
    sink.script_rcpt("gone@a.test", "550 5.1.1 no such user")
    sink.script_rcpt("later@a.test", "451 4.3.0 later")
    daemon = relay({**api_on(), "delivery": {"retry": {"schedule": ["1h"]}}})
    delivered = daemon.send(["ok@a.test"])
    partial = daemon.send(["ok@a.test", "gone@a.test"])
    deferred = daemon.send(["later@a.test"])
    want = {
        delivered: ("delivered", (("ok@a.test", "delivered"),)),
        partial: ("partial", (("gone@a.test", "bounced"), ("ok@a.test", "delivered"))),
        deferred: ("pending", (("later@a.test", "pending"),)),
    }
    eventually(lambda: statuses(daemon) == want, timeout=15)
    os.kill(daemon.worker_pid("api"), signal.SIGKILL)  # the history's only writer
    held = daemon.send(["later@a.test"])
    daemon.cli("queue", "hold", held)
    daemon.wait_event("started", role="api", count=2, timeout=30)
    want[held] = ("pending", (("later@a.test", "pending"),))
    eventually(lambda: statuses(daemon) == want, timeout=15)


def test_history_rebuild_derives_the_same_history(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay(api_on())
    ids = [daemon.send(["ok@a.test"]) for _ in range(3)]
    sink.wait_for(3)
    eventually(lambda: {i: s[0] for i, s in statuses(daemon).items()} ==
               dict.fromkeys(ids, "delivered"), timeout=15)  # fmt: skip
    before = statuses(daemon)
    refused = daemon.cli("history", "rebuild", check=False)
    assert refused.returncode == 75 and "stop it first" in refused.stderr
    assert daemon.stop() == 0
    Path(daemon.spool / "history" / "history.sqlite").write_bytes(b"not a database")
    rebuilt = daemon.cli("history", "rebuild")
    assert "3 messages" in rebuilt.stdout
    assert statuses(daemon) == before
