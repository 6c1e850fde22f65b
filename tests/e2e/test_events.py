"""The event journal through the real daemon: the events docs/events.md promises for a message
delivered, deferred, bounced, held, released, cancelled or requeued, live and on a stopped
spool, with their fields; tenants and batch ids; and no event lost to a kill -9 under load."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from relay.spool.journal import files, read, writer_of
from tests.e2e.test_crash import CONCURRENCY, delivered_ids, kill9_under_load, pid_alive
from tests.e2e.test_lanes_quota import PASSWORD, with_user
from tests.support.daemon import Relay, RelayFactory
from tests.support.mx import MxSink

HOUR = {"delivery": {"retry": {"schedule": ["1h"]}}}
COMMON = {"event_id", "event", "timestamp", "id", "tenant", "batch_id", "sender", "status"}
ATTEMPT = {"rcpt", "attempt", "reply", "code", "enhanced", "mx", "ip", "tls"}
RECEIVED = {"rcpts", "size", "lane", "send_at"}


def journal(daemon: Relay) -> list[dict[str, Any]]:
    """Every complete event in the spool's journal files, in the order of their ids (time)."""
    found = [e for path in files(daemon.spool / "events") for e in read(path, 0)[0]]
    return sorted(found, key=lambda e: str(e["event_id"]))


def of(daemon: Relay, queue_id: str) -> list[dict[str, Any]]:
    return [e for e in journal(daemon) if e["id"] == queue_id]


def names(events: list[dict[str, Any]]) -> list[str]:
    return [str(e["event"]) for e in events]


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_a_delivered_message_is_received_then_delivered(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay()
    body = b"X-Relay-Batch-Id: spring-sale.2026\r\nSubject: t\r\n\r\nhi\r\n"
    queue_id = daemon.send(["user@a.test"], body)
    [logged] = daemon.wait_event("delivered", id=queue_id)
    received, delivered = of(daemon, queue_id)
    assert set(received) == COMMON | RECEIVED and set(delivered) == COMMON | ATTEMPT
    assert {k: received[k] for k in ("event", "tenant", "batch_id", "sender", "status")} == {
        "event": "received", "tenant": "default", "batch_id": "spring-sale.2026",
        "sender": "app@sender.test", "status": "queued",
    }  # fmt: skip
    assert (received["rcpts"], received["lane"], received["send_at"]) == (
        ["user@a.test"],
        "normal",
        None,
    )
    [got] = sink.received
    assert b"X-Relay-Batch-Id" not in got.data and received["size"] == len(got.data)
    assert {k: delivered[k] for k in ATTEMPT | {"event", "status", "batch_id"}} == {
        "event": "delivered", "rcpt": "user@a.test", "status": "delivered", "attempt": 1,
        "reply": logged["reply"], "code": 250, "enhanced": logged["enhanced"],
        "mx": "mx.a.test", "ip": "127.0.0.2", "tls": logged["tls"], "batch_id": "spring-sale.2026",
    }  # fmt: skip
    assert received["timestamp"] < delivered["timestamp"]
    assert [f.name.split(".")[0] for f in files(daemon.spool / "events")] == ["intake", "scheduler"]
    [line] = daemon.events("received", id=queue_id)
    assert (line["tenant"], line["batch_id"]) == ("default", "spring-sale.2026")


def test_a_deferral_says_when_the_next_attempt_is_due(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay()  # retries after 1 s, no jitter
    sink.script_rcpt("user@a.test", "451 4.7.1 greylisted", "250 2.1.5 ok")
    queue_id = daemon.send(["user@a.test"])
    daemon.wait_event("delivered", id=queue_id, timeout=15)
    received, deferred, delivered = of(daemon, queue_id)
    assert names([received, deferred, delivered]) == ["received", "deferred", "delivered"]
    assert set(deferred) == COMMON | ATTEMPT | {"next_attempt"}
    assert {k: deferred[k] for k in ("rcpt", "status", "attempt", "reply", "code", "enhanced")} == {
        "rcpt": "user@a.test", "status": "pending", "attempt": 1,
        "reply": "451 4.7.1 greylisted", "code": 451, "enhanced": "4.7.1",
    }  # fmt: skip
    [scheduled] = daemon.events("retry_scheduled", id=queue_id)
    assert abs(epoch(deferred["next_attempt"]) - scheduled["next_attempt"]) < 0.002
    assert 0.5 < epoch(deferred["next_attempt"]) - epoch(deferred["timestamp"]) <= 1.0
    assert (delivered["attempt"], delivered["code"]) == (2, 250)


def test_a_bounce_is_dead_lettered_and_a_requeue_journaled(
    relay: RelayFactory, sink: MxSink
) -> None:
    daemon = relay()
    sink.script_rcpt("no@a.test", "550 5.1.1 no such user", "250 2.1.5 ok")
    queue_id = daemon.send(["no@a.test", "yes@a.test"])
    daemon.wait_event("dead_lettered", id=queue_id)
    daemon.wait_event("bounced", id=queue_id, rcpt="no@a.test")
    assert daemon.events("failed") == []  # the log's word for a permanent failure is bounced
    events = of(daemon, queue_id)
    assert names(events) == ["received", "bounced", "delivered", "dead_lettered"]
    bounced, dead = events[1], events[3]
    assert {k: bounced[k] for k in ("rcpt", "status", "attempt", "code", "enhanced")} == {
        "rcpt": "no@a.test",
        "status": "failed",
        "attempt": 1,
        "code": 550,
        "enhanced": "5.1.1",
    }
    assert set(dead) == COMMON | {"rcpts", "reason"}
    assert (dead["rcpts"], dead["reason"], dead["status"]) == (
        ["no@a.test"],
        "permanent",
        "partial",
    )
    daemon.cli("dlq", "requeue", queue_id)
    daemon.wait_event("delivered", id=queue_id, rcpt="no@a.test")
    requeued, delivered = of(daemon, queue_id)[4:]
    assert (requeued["event"], requeued["rcpts"]) == ("requeued", ["no@a.test"])
    assert (delivered["event"], delivered["rcpt"], delivered["attempt"]) == (
        "delivered",
        "no@a.test",
        2,
    )


def test_hold_release_and_delete_are_journaled(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay(HOUR)
    for rcpt in ("one@a.test", "two@a.test"):
        sink.script_rcpt(rcpt, "451 4.2.0 greylisted")
    queue_id = daemon.send(["one@a.test", "two@a.test"])
    daemon.wait_event("retry_scheduled", id=queue_id)
    daemon.cli("queue", "hold", queue_id)
    daemon.cli("queue", "release", queue_id)  # due now: attempted again, deferred again
    daemon.wait_event("retry_scheduled", id=queue_id, count=2)
    daemon.cli("queue", "delete", queue_id)
    daemon.wait_event("cancelled", id=queue_id)
    assert daemon.events("deleted") == []  # the log's word is cancelled
    events = of(daemon, queue_id)
    assert names(events) == [
        "received", "deferred", "deferred", "held", "released", "deferred", "deferred",
        "cancelled", "cancelled",
    ]  # fmt: skip
    held, released, *cancelled = events[3], events[4], *events[7:]
    assert set(held) == set(released) == COMMON
    assert (held["status"], released["status"]) == ("held", "deferred")
    assert [(e["rcpt"], e["status"]) for e in cancelled] == [
        ("one@a.test", "deleted"),
        ("two@a.test", "deleted"),
    ]
    assert all(set(e) == COMMON | {"rcpt", "reply", "code", "enhanced", "mx", "ip"}
               for e in cancelled)  # fmt: skip
    assert names(daemon.events("held") + daemon.events("released")) == ["held", "released"]


def test_a_scheduled_message_cancelled(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay()
    send_at = round(time.time() + 3600, 3)
    body = f"X-Relay-Send-At: {send_at:.3f}\r\nSubject: s\r\n\r\nx\r\n".encode()
    queue_id = daemon.send(["user@a.test"], body)
    daemon.cli("queue", "delete", queue_id)
    daemon.wait_event("cancelled", id=queue_id)
    received, cancelled = of(daemon, queue_id)
    assert (received["status"], received["send_at"]) == ("scheduled", send_at)
    assert (cancelled["event"], cancelled["rcpt"], cancelled["status"]) == (
        "cancelled",
        "user@a.test",
        "deleted",
    )
    assert set(cancelled) == COMMON | {"rcpt"}
    assert sink.received == []


def test_the_cli_on_a_stopped_spool_journals_in_its_own_files(
    relay: RelayFactory, sink: MxSink
) -> None:
    daemon = relay(HOUR)
    sink.script_rcpt("later@a.test", "451 4.2.0 greylisted")
    sink.script_rcpt("no@a.test", "550 5.1.1 no such user")
    waiting = daemon.send(["later@a.test"])
    bounced = daemon.send(["no@a.test"])
    daemon.wait_event("retry_scheduled", id=waiting)
    daemon.wait_event("dead_lettered", id=bounced)
    assert daemon.stop() == 0
    for command, target in [
        (("queue", "hold"), waiting), (("queue", "release"), waiting),
        (("queue", "delete"), waiting), (("dlq", "requeue"), bounced),
    ]:  # fmt: skip
        daemon.cli(*command, target)
    cli_files = [p for p in files(daemon.spool / "events") if writer_of(p)[0].startswith("cli-")]
    assert len(cli_files) == 4  # one per command, each its own writer
    assert names(of(daemon, waiting)) == ["received", "deferred", "held", "released", "cancelled"]
    assert names(of(daemon, bounced)) == ["received", "bounced", "dead_lettered", "requeued"]
    requeued = of(daemon, bounced)[-1]
    assert (requeued["rcpts"], requeued["status"]) == (["no@a.test"], "deferred")
    assert all(set(e) >= COMMON for e in journal(daemon))


def test_the_tenant_is_the_auth_user(relay: RelayFactory, sink: MxSink, tmp_path: Path) -> None:
    daemon = with_user(relay, {}, tmp_path)
    with daemon.smtp() as client:
        client.login("alice", PASSWORD)
        client.mail("app@sender.test")
        client.rcpt("user@a.test")
        code, text = client.data(b"X-Relay-Batch-Id: b1\r\nSubject: a\r\n\r\nhi\r\n")
    assert code == 250
    queue_id = text.decode().rsplit(" ", 1)[1]
    daemon.wait_event("delivered", id=queue_id)
    events = of(daemon, queue_id)
    assert [(e["event"], e["tenant"], e["batch_id"]) for e in events] == [
        ("received", "alice", "b1"),
        ("delivered", "alice", "b1"),
    ]


def test_the_state_file_holds_tenant_and_batch(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay(HOUR)
    sink.script_rcpt("user@a.test", "451 4.2.0 greylisted")
    queue_id = daemon.send(["user@a.test"], b"X-Relay-Batch-Id: B-7\r\n\r\nx\r\n")
    daemon.wait_event("retry_scheduled", id=queue_id)
    state = json.loads((daemon.spool / "queue" / f"{queue_id}.json").read_text())
    assert (state["tenant"], state["batch_id"]) == ("default", "B-7")


def test_a_bad_batch_id_is_refused_naming_the_field(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay()
    with daemon.smtp() as client:
        client.mail("app@sender.test")
        client.rcpt("user@a.test")
        code, text = client.data(b"X-Relay-Batch-Id: no spaces allowed\r\n\r\nx\r\n")
    assert (code, text.decode()) == (
        550,
        "5.6.0 X-Relay-Batch-Id: 'no spaces allowed' is not a batch id (1-64 of A-Z a-z 0-9 . _ -)",
    )
    daemon.wait_event("rejected", reason="bad_directive")
    assert journal(daemon) == []


BOUNCING = {f"c{n}m{i}@a.test" for n in range(6) for i in range(0, 400, 7)}


def test_kill9_under_load_loses_no_event_of_a_persisted_change(
    relay: RelayFactory, sink: MxSink
) -> None:
    for rcpt in BOUNCING:
        sink.script_rcpt(rcpt, "550 5.1.1 no such user")
    daemon = relay({"delivery": {"concurrency": CONCURRENCY}})
    workers = [daemon.worker_pid(role) for role in ("intake", "scheduler")]
    acked = kill9_under_load(daemon)
    deadline = time.monotonic() + 10
    while any(pid_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.01)
    # What the kill left: every acknowledged message has its `received`, and every outcome in
    # a state file, a dead letter or a removal has its event.
    events = journal(daemon)
    rcpts = {e["id"]: e["rcpts"] for e in events if e["event"] == "received"}
    assert set(acked) <= set(rcpts), f"{len(set(acked) - set(rcpts))} received events lost"
    outcomes = {(e["id"], e["rcpt"], e["event"]) for e in events if "attempt" in e}
    persisted = settled(daemon.spool, acked, rcpts)
    assert persisted, "the kill came before any outcome: load longer"
    lost = persisted - outcomes
    assert not lost, f"outcomes persisted without their events: {sorted(lost)[:5]}"
    # After the restart every message ends with its outcome's event.
    daemon.start()
    expected = set(acked) - {i for i in acked if rcpts[i][0] in BOUNCING}
    deadline = time.monotonic() + 60
    while not expected <= set(delivered_ids(sink)) and time.monotonic() < deadline:
        time.sleep(0.1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not finals(daemon, acked) >= set(acked):
        time.sleep(0.1)
    assert finals(daemon, acked) >= set(acked)


def settled(spool: Path, acked: list[str], rcpts: dict[str, list[str]]) -> set[tuple[str, ...]]:
    """(id, recipient, event) of every outcome the spool holds: delivered or failed in a state
    file, failed in a dead letter, delivered for a message removed from the queue."""
    out: set[tuple[str, ...]] = set()
    word = {"delivered": "delivered", "failed": "bounced"}
    for msg_id in acked:
        dead, queued = spool / "dead" / f"{msg_id}.json", spool / "queue" / f"{msg_id}.json"
        states = [json.loads(p.read_text()) for p in (queued, dead) if p.exists()]
        for state in states:
            out |= {
                (msg_id, r["address"], word[r["status"]])
                for r in state["recipients"]
                if r["status"] in word
            }
        if not queued.exists() and not dead.exists():  # removed: every recipient delivered
            out |= {(msg_id, rcpt, "delivered") for rcpt in rcpts[msg_id]}
    return out


def finals(daemon: Relay, acked: list[str]) -> set[str]:
    """The messages whose recipient has its final event (delivered or bounced)."""
    wanted = set(acked)
    return {
        e["id"]
        for e in journal(daemon)
        if e["event"] in ("delivered", "bounced") and e["id"] in wanted
    }
