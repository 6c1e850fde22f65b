"""The event journal through the real daemon: the events docs/events.md promises for a message
delivered, deferred, bounced, held, released, cancelled or requeued, live and on a stopped
spool, with their fields; tenants and batch ids; and no event lost to a kill -9 under load."""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from relay.api.schemas import STATUSES
from relay.mail.events import OF_ATTEMPT
from relay.spool.journal import files, writer_of
from tests.support.daemon import Relay, RelayFactory, api_on, merge
from tests.support.load import (
    CONCURRENCY,
    PASSWORD,
    delivered_ids,
    journal,
    kill9_under_load,
    pid_alive,
    with_user,
)
from tests.support.mx import MxSink

HOUR = {"delivery": {"retry": {"schedule": ["1h"]}}}
COMMON = {"event_id", "event", "timestamp", "id", "tenant", "batch_id", "sender", "status"}
ATTEMPT = {"rcpt", "attempt", "reply", "code", "enhanced", "mx", "ip", "tls"}
RECEIVED = {"rcpts", "size", "lane", "send_at"}


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
    assert set(deferred) == COMMON | ATTEMPT | {"next_attempt", "category"}
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
    assert bounced["category"] == "invalid_recipient"
    assert set(dead) == COMMON | {"rcpts", "reason"}
    assert (dead["rcpts"], dead["reason"], dead["status"]) == (
        ["no@a.test"],
        "permanent",
        "partial",
    )
    # Its hard bounce suppressed the address: the requeued copy is dropped before any attempt
    # (tests/e2e/test_cli.py lifts the entry first and gets it delivered).
    [added] = daemon.wait_event("suppression_added", process="api")
    warned = daemon.cli("dlq", "requeue", queue_id).stderr  # the CLI says so
    assert "dropped again before any attempt unless lifted" in warned
    assert f"no@a.test (hard_bounce since {added['timestamp'][:10]})" in warned
    daemon.wait_event("suppressed", id=queue_id, rcpt="no@a.test")
    requeued, suppressed = of(daemon, queue_id)[4:]
    assert (requeued["event"], requeued["rcpts"]) == ("requeued", ["no@a.test"])
    assert (suppressed["event"], suppressed["rcpt"], suppressed["kind"]) == (
        "suppressed",
        "no@a.test",
        "hard_bounce",
    )
    assert len(sink.received) == 1  # yes@a.test's copy only


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


# kill9_under_load's client n sends its message i to c{n}m{i}@a.test: every 7th bounces, the
# one three after it is deferred once then accepted, the rest are accepted.
BOUNCING = {f"c{n}m{i}@a.test" for n in range(6) for i in range(0, 400, 7)}
DEFERRED_ONCE = {f"c{n}m{i}@a.test" for n in range(6) for i in range(3, 400, 7)}
OUTCOMES = {"deferred", "delivered", "bounced"}  # each persisted before the kill, or no test


def script(sink: MxSink) -> None:
    """Script the sink's replies for those recipients."""
    for rcpt in BOUNCING:
        sink.script_rcpt(rcpt, "550 5.1.1 no such user")
    for rcpt in DEFERRED_ONCE:
        sink.script_rcpt(rcpt, "451 4.3.0 try later", "250 2.1.5 ok")


def wait_dead(pids: list[int]) -> None:
    """Until every one of the killed daemon's processes is gone."""
    deadline = time.monotonic() + 10
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(pid_alive(pid) for pid in pids), "a worker outlived the kill"


def killed_under_load(
    daemon: Relay, roles: tuple[str, ...], at_least: int
) -> tuple[list[str], list[dict[str, Any]], dict[str, list[str]], set[tuple[str, ...]]]:
    """kill -9 under load (every worker of roles seen dead), then what it left: the ids
    acknowledged, the journal's events, each acknowledged message's recipients (every one
    has its `received`) and the changes persisted (outcomes of every kind among them)."""
    workers = [daemon.worker_pid(role) for role in roles]
    acked = kill9_under_load(daemon, at_least=at_least)
    wait_dead(workers)
    events = journal(daemon)
    rcpts = {e["id"]: e["rcpts"] for e in events if e["event"] == "received"}
    assert set(acked) <= set(rcpts), f"{len(set(acked) - set(rcpts))} received events lost"
    changes = persisted(daemon.spool, acked, rcpts)
    assert kinds(changes) >= OUTCOMES, f"the kill came too soon: {kinds(changes)}; load longer"
    return acked, events, rcpts, changes


def test_kill9_under_load_loses_no_event_of_a_persisted_change(
    relay: RelayFactory, sink: MxSink
) -> None:
    script(sink)
    daemon = relay({"delivery": {"concurrency": CONCURRENCY}})
    acked, events, rcpts, changes = killed_under_load(daemon, ("intake", "scheduler"), 150)
    # Every change in a state file, a dead letter or a removal has its event.
    lost = changes - {(e["id"], e.get("rcpt", ""), e["event"]) for e in events}
    assert not lost, f"changes persisted without their events: {sorted(lost)[:5]}"
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


def test_kill9_under_load_the_api_shows_every_acknowledged_message_and_its_events(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    script(sink)
    daemon = relay(merge(api_on(tokens_file=str(tmp_path / "tokens")), {"delivery": {
        "concurrency": CONCURRENCY, "retry": {"schedule": ["2s"]}}}))  # fmt: skip
    token = daemon.cli("token", "add", "reader", "--scope", "read").stdout.strip()
    roles = ("intake", "scheduler", "api")
    acked, on_disk, _, changes = killed_under_load(daemon, roles, 200)
    history = daemon.spool / "history" / "history.sqlite"
    taken_in = history.stat().st_ino  # the history the kill interrupted, taken on from there

    daemon.start()
    # Right after the restart: every acknowledged message is known, with a status, its final
    # one if its outcome was persisted, and every event of it the journal holds.
    final = {c[0]: c[2] for c in changes if c[2] in ("delivered", "bounced")}
    items = {msg_id: item(daemon, msg_id, token) for msg_id in acked}
    assert not [i for i, got in items.items() if got["status"] not in STATUSES]
    wrong = {i: (items[i]["status"], want) for i, want in final.items()
             if items[i]["status"] != want}  # fmt: skip
    assert not wrong, f"a persisted outcome not shown as the status: {sorted(wrong.items())[:5]}"
    missing = missed(items, on_disk)
    assert not missing, f"{len(missing)} events of the journal not in the API: {missing[:5]}"
    shown = {(e["id"], e.get("rcpt") or "", e["event"]) for got in items.values()
             for e in got["events"]}  # fmt: skip
    assert not changes - shown, f"persisted changes without events: {sorted(changes - shown)[:5]}"
    listed = listing(daemon, token)
    assert set(acked) <= set(listed), f"{len(set(acked) - set(listed))} acknowledged not listed"

    # Then the history keeps up with what the restarted relay does, never rebuilt: every
    # message ends (a deferred one is delivered at its retry) with every event of the journal.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        statuses = listing(daemon, token)
        if all(statuses.get(i) in ("delivered", "bounced") for i in acked):
            break
        time.sleep(0.2)
    ended = listing(daemon, token)
    assert all(ended.get(i) in ("delivered", "bounced") for i in acked), Counter(ended.values())
    items = {msg_id: item(daemon, msg_id, token) for msg_id in acked}
    missing = missed(items, journal(daemon))
    assert not missing, f"{len(missing)} events of the journal not in the API: {missing[:5]}"
    assert history.stat().st_ino == taken_in


def item(daemon: Relay, msg_id: str, token: str) -> dict[str, Any]:
    """GET /v1/messages/{id}, which must answer 200."""
    status, _, body = daemon.api("GET", f"/v1/messages/{msg_id}", token)
    assert status == 200, (msg_id, status, body)
    assert isinstance(body, dict)
    return body


def listing(daemon: Relay, token: str) -> dict[str, str]:
    """Every message GET /v1/messages lists, page by page, with its status; fails if one is
    listed twice."""
    seen: list[tuple[str, str]] = []
    path = "/v1/messages?limit=100"
    for _ in range(100):
        status, _, page = daemon.api("GET", path, token)
        assert status == 200, page
        seen += [(m["id"], m["status"]) for m in page["messages"]]
        if page["next_cursor"] is None:
            break
        path = f"/v1/messages?limit=100&cursor={page['next_cursor']}"
    ids = [i for i, _ in seen]
    assert len(ids) == len(set(ids)), "a message listed twice"
    return dict(seen)


def missed(items: dict[str, dict[str, Any]], events: list[dict[str, Any]]) -> list[str]:
    """The ids of the events of those messages that their `events` in the API lack."""
    shown = {e["event_id"] for got in items.values() for e in got["events"]}
    return [e["event_id"] for e in events if e["id"] in items and e["event_id"] not in shown]


def persisted(spool: Path, acked: list[str], rcpts: dict[str, list[str]]) -> set[tuple[str, ...]]:
    """(id, recipient, event) of every change the spool holds: each attempt in a state file
    or a dead letter, the dead letter itself (recipient ""), and delivered for every recipient
    of a message removed from the queue."""
    out: set[tuple[str, ...]] = set()
    for msg_id in acked:
        dead, queued = spool / "dead" / f"{msg_id}.json", spool / "queue" / f"{msg_id}.json"
        states = [json.loads(p.read_text()) for p in (queued, dead) if p.exists()]
        for state in states:
            out |= {
                (msg_id, r["address"], OF_ATTEMPT[attempt["outcome"]])
                for r in state["recipients"]
                for attempt in r["history"]
            }
        if dead.exists():
            out.add((msg_id, "", "dead_lettered"))
        if not states:  # removed: every recipient delivered
            out |= {(msg_id, rcpt, "delivered") for rcpt in rcpts[msg_id]}
    return out


def kinds(changes: set[tuple[str, ...]]) -> set[str]:
    return {change[2] for change in changes}


def finals(daemon: Relay, acked: list[str]) -> set[str]:
    """The messages whose recipient has its final event (delivered or bounced)."""
    wanted = set(acked)
    return {
        e["id"]
        for e in journal(daemon)
        if e["event"] in ("delivered", "bounced") and e["id"] in wanted
    }
