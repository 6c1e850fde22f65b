"""The message and batch endpoints on the real daemon: a deferred batch listed with its reply
and next attempt then cancelled for good, a scheduled message cancelled by id, a delivered one
still shown after a restart, pages that neither miss nor repeat a message while mail arrives,
tenants, scopes and bad parameters; and `relay queue delete --batch` from the CLI."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from relay.cli.fail import EX_USAGE
from tests.support.api import add_token, assert_problem
from tests.support.daemon import Relay, RelayFactory, api_on, merge
from tests.support.load import PASSWORD, with_user
from tests.support.mx import MxSink

pytestmark = pytest.mark.e2e
RETRY = 8.0  # seconds: the retry schedule of these tests (room for a slow machine)


def settings(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    base = {
        **api_on(tokens_file=str(tmp_path / "tokens")),
        "delivery": {"retry": {"schedule": [f"{RETRY:.0f}s"], "jitter": 0}},
    }
    return merge(base, extra)


def epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def body(*fields: str) -> bytes:
    return ("".join(f"{f}\r\n" for f in fields) + "Subject: hi\r\n\r\nhello\r\n").encode()


def ok(daemon: Relay, method: str, path: str, token: str) -> Any:
    status, _, answer = daemon.api(method, path, token)
    assert status == 200, answer
    return answer


def test_a_deferred_batch_is_listed_then_cancelled_for_good(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    rcpts = [f"user{i}@a.test" for i in range(5)]
    for rcpt in rcpts:
        sink.script_rcpt(rcpt, "451 4.3.0 try later")  # then the domain accepts
    daemon = relay(settings(tmp_path))
    token = add_token(daemon, "app")
    ids = [daemon.send([r], body("X-Relay-Batch-Id: spring.1")) for r in rcpts]
    daemon.send(["other@a.test"], body("X-Relay-Batch-Id: autumn"))
    for msg_id in ids:
        daemon.wait_event("retry_scheduled", id=msg_id)
    page = ok(daemon, "GET", "/v1/messages?status=deferred&batch_id=spring.1", token)
    assert sorted(m["id"] for m in page["messages"]) == sorted(ids)
    assert page["next_cursor"] is None
    for item in page["messages"]:
        [rcpt] = item["recipients"]
        assert item["status"] == item["reason"] == "deferred" and item["batch_id"] == "spring.1"
        assert rcpt["reply"] == {"code": 451, "enhanced": "4.3.0", "text": "try later"}
        assert rcpt["status"] == "pending" and rcpt["attempts"] == 1 and rcpt["mx"]
        expected = epoch(item["expected_attempt_at"]) - epoch(rcpt["updated_at"])
        assert RETRY - 0.5 <= expected <= RETRY + 0.5  # the retry schedule, no jitter
        assert "451 4.3.0 try later" in item["reason_detail"]
    before = ok(daemon, "GET", "/v1/batches/spring.1", token)
    assert before == {"batch_id": "spring.1", "total": 5, "counts": {"deferred": 5}}
    done = ok(daemon, "DELETE", "/v1/batches/spring.1", token)
    assert (done["cancelled"], done["busy"], done["counts"]) == (5, 0, {"cancelled": 5})
    time.sleep(RETRY + 1.5)  # past the retry, which the domain would now accept
    daemon.cli("queue", "flush")
    time.sleep(1)
    assert [m.rcpt_tos for m in sink.received] == [["other@a.test"]]
    for msg_id in ids:
        item = ok(daemon, "GET", f"/v1/messages/{msg_id}", token)
        assert item["status"] == "cancelled" and item["finished_at"] is not None
        assert [e["event"] for e in item["events"]] == ["received", "deferred", "cancelled"]
        assert [a["outcome"] for a in item["history"]] == ["deferred"]
    again = ok(daemon, "DELETE", "/v1/batches/spring.1", token)
    assert (again["cancelled"], again["total"]) == (0, 5)
    assert_problem(daemon.api("GET", "/v1/batches/nope", token), 404, "no batch")


def test_a_scheduled_message_is_cancelled_and_a_delivered_one_stays(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    daemon = relay(settings(tmp_path))
    token = add_token(daemon, "app")
    send_at = time.time() + 8
    later = daemon.send(["later@a.test"], body(f"X-Relay-Send-At: {send_at:.3f}"))
    [item] = ok(daemon, "GET", "/v1/messages?status=scheduled", token)["messages"]
    assert (item["id"], item["status"], item["reason"]) == (later, "scheduled", "scheduled")
    assert abs(epoch(item["expected_attempt_at"]) - send_at) < 0.01
    assert abs(epoch(item["send_at"]) - send_at) < 0.01
    cancelled = ok(daemon, "DELETE", f"/v1/messages/{later}", token)
    assert cancelled == {"id": later, "status": "cancelled", "cancelled": ["later@a.test"],
                         "ended": []}  # fmt: skip
    again = daemon.api("DELETE", f"/v1/messages/{later}", token)
    assert_problem(again, 409, "nothing pending")
    assert again[2]["message_status"] == "cancelled"
    assert ok(daemon, "GET", f"/v1/messages/{later}", token)["status"] == "cancelled"

    delivered = daemon.send(["now@a.test"])
    sink.wait_for(1)
    time.sleep(max(0.0, send_at + 1.5 - time.time()))
    assert [m.rcpt_tos for m in sink.received] == [["now@a.test"]]  # never the cancelled one
    first = ok(daemon, "GET", f"/v1/messages/{delivered}", token)
    assert first["status"] == "delivered" and first["finished_at"] is not None
    assert first["reason"] is None and first["expected_attempt_at"] is None
    [rcpt] = first["recipients"]
    assert rcpt["status"] == "delivered" and rcpt["reply"]["code"] == 250
    [attempt] = first["history"]
    assert attempt["outcome"] == "delivered" and attempt["recipient"] == "now@a.test"
    assert attempt["reply"]["code"] == 250 and attempt["mx"] == "mx.a.test"
    assert attempt["ip"] == "127.0.0.2" and attempt["tls"] is not None
    assert daemon.stop() == 0
    daemon.start()
    assert ok(daemon, "GET", f"/v1/messages/{delivered}", token) == first
    assert ok(daemon, "GET", "/v1/messages?status=delivered", token)["messages"] == [
        {k: v for k, v in first.items() if k not in ("history", "events")}
    ]


def test_pages_neither_miss_nor_repeat_while_mail_arrives(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    daemon = relay(settings(tmp_path))
    token = add_token(daemon, "app", "--scope", "read")
    before = {daemon.send(["a@a.test"]) for _ in range(250)}
    arriving: list[str] = []
    sender = threading.Thread(target=lambda: arriving.extend(
        daemon.send(["b@a.test"]) for _ in range(50)))  # fmt: skip
    seen: list[str] = []
    path = "/v1/messages?limit=100"
    sender.start()
    while True:
        page = ok(daemon, "GET", path, token)
        seen += [m["id"] for m in page["messages"]]
        assert len(page["messages"]) <= 100
        if page["next_cursor"] is None:
            break
        path = f"/v1/messages?limit=100&cursor={page['next_cursor']}"
        time.sleep(0.3)  # while the others arrive
    sender.join()
    assert len(seen) == len(set(seen)), "a message was listed twice"
    assert before <= set(seen), "a message was missed"
    assert set(seen) <= before | set(arriving)
    assert seen == sorted(seen, reverse=True)  # newest first


def test_tenants_scopes_and_bad_parameters(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    daemon = with_user(relay, settings(tmp_path), tmp_path)
    with daemon.smtp() as client:
        client.login("alice", PASSWORD)
        client.mail("app@sender.test")
        client.rcpt("user@a.test")
        _, text = client.data(body("X-Relay-Batch-Id: b1"))
    alices = text.decode().rsplit(" ", 1)[1]
    mine = daemon.send(["user@a.test"], body("X-Relay-Batch-Id: b1"))
    alice, bob = add_token(daemon, "alice", "--tenant", "alice"), add_token(daemon, "bob",
                                                                             "--tenant", "bob")  # fmt: skip
    admin = add_token(daemon, "admin")
    reader = add_token(daemon, "reader", "--scope", "read")
    canceller = add_token(daemon, "canceller", "--scope", "cancel")

    assert ok(daemon, "GET", f"/v1/messages/{alices}", alice)["tenant"] == "alice"
    assert_problem(daemon.api("GET", f"/v1/messages/{alices}", bob), 404, "no message")
    assert_problem(daemon.api("DELETE", f"/v1/messages/{alices}", bob), 404, "no message")
    assert_problem(daemon.api("GET", "/v1/batches/b1", bob), 404, "no batch")
    assert [m["id"] for m in ok(daemon, "GET", "/v1/messages", alice)["messages"]] == [alices]
    assert ok(daemon, "GET", "/v1/messages?tenant=default", alice)["messages"] == []
    assert ok(daemon, "GET", "/v1/messages", bob)["messages"] == []
    everyone = [m["id"] for m in ok(daemon, "GET", "/v1/messages", admin)["messages"]]
    assert everyone == sorted([alices, mine], reverse=True)
    only = ok(daemon, "GET", "/v1/messages?tenant=default", admin)["messages"]
    assert [m["id"] for m in only] == [mine]
    assert ok(daemon, "GET", "/v1/batches/b1", alice)["total"] == 1
    assert ok(daemon, "GET", "/v1/batches/b1", admin)["total"] == 2

    assert_problem(daemon.api("DELETE", f"/v1/messages/{mine}", reader), 403, "lacks the scope")
    assert_problem(daemon.api("GET", f"/v1/messages/{mine}", canceller), 403, "lacks the scope")
    assert_problem(daemon.api("DELETE", "/v1/batches/b1", reader), 403, "lacks the scope")
    for query, field in [
        ("limit=0", "limit"), ("limit=1001", "limit"), ("limit=ten", "limit"),
        ("cursor=not-ours", "cursor"), ("since=yesterday", "since"), ("until=2026-13-01", "until"),
        ("status=lost", "status"), ("colour=red", "colour"),
    ]:  # fmt: skip
        answer = daemon.api("GET", f"/v1/messages?{query}", reader)
        assert_problem(answer, 400, field)
        assert answer[2]["field"] == field
    assert_problem(daemon.api("GET", "/v1/messages/0123", reader), 404, "no message")
    sink.wait_for(2)
    assert_problem(daemon.api("DELETE", f"/v1/messages/{mine}", canceller), 409, "nothing pending")


def test_queue_delete_batch_from_the_cli(relay: RelayFactory, sink: MxSink, tmp_path: Path) -> None:
    sink.script_rcpt("slow@a.test", *["451 4.3.0 later"] * 10)
    daemon = relay(settings(tmp_path, delivery={"retry": {"schedule": ["1h"]}}))
    running = [daemon.send(["slow@a.test"], body("X-Relay-Batch-Id: live")) for _ in range(2)]
    for _ in range(2):
        daemon.send(["slow@a.test"], body("X-Relay-Batch-Id: cold"))
    keep = daemon.send(["slow@a.test"])
    listed = {m["id"]: m for m in daemon.cli_json("queue", "list")}
    assert listed[running[0]]["batch_id"] == "live" and listed[keep]["batch_id"] is None
    assert listed[keep]["tenant"] == "default" and listed[keep]["finished_at"] is None
    token = add_token(daemon, "app")
    api = ok(daemon, "GET", f"/v1/messages/{keep}", token)
    shown = daemon.cli("queue", "show", keep, "--json").stdout
    for cli in (listed[keep], json.loads(shown)):  # the API's field names, and the same why
        assert set(cli) >= set(api) - {"history", "events"}
        assert set(cli["recipients"][0]) >= set(api["recipients"][0])
        assert (cli["status"], cli["reason"]) == (api["status"], api["reason"]) == ("deferred",) * 2
        assert abs(epoch(cli["expected_attempt_at"]) - epoch(api["expected_attempt_at"])) < 1
    assert "deleted 2 messages" in daemon.cli("queue", "delete", "--batch", "live").stdout
    assert daemon.stop() == 0
    assert "deleted 2 messages" in daemon.cli("queue", "delete", "--batch", "cold").stdout
    assert [m["id"] for m in daemon.cli_json("queue", "list")] == [keep]
    bad = daemon.cli("queue", "delete", "--batch", "no way", check=False)
    assert bad.returncode == EX_USAGE and "--batch: 'no way' is not a batch id" in bad.stderr


def test_a_cancel_answered_200_survives_a_kill9(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    sink.script_rcpt("x@a.test", "451 4.3.0 try later")  # then the domain accepts
    daemon = relay(settings(tmp_path))
    token = add_token(daemon, "app")
    msg_id = daemon.send(["x@a.test"])
    daemon.wait_event("retry_scheduled", id=msg_id)
    answer = ok(daemon, "DELETE", f"/v1/messages/{msg_id}", token)
    assert answer["cancelled"] == ["x@a.test"]
    daemon.kill9()  # right after the 200
    daemon.start()
    time.sleep(RETRY + 1)
    daemon.cli("queue", "flush")
    time.sleep(1)
    assert sink.received == [] and daemon.cli_json("queue", "list") == []
    item = ok(daemon, "GET", f"/v1/messages/{msg_id}", token)
    assert item["status"] == "cancelled"
    assert [e["event"] for e in item["events"]] == ["received", "deferred", "cancelled"]
