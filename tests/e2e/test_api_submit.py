"""`POST /v1/messages` on the real daemon: a message built from fields (MIME, attachments, Date,
Message-ID, bcc only in the envelope) and a raw one delivered to the sink; scheduled sends,
batches and priorities; idempotent retries (the same id, one delivery, Idempotent-Replayed; a
conflict 409; a kill -9 right after the 202); the tenant's sender domains and quotas; and every
error the endpoint documents."""

from __future__ import annotations

import base64
import email
import email.policy
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from tests.support.api import add_token, assert_problem
from tests.support.daemon import Relay, RelayFactory, api_on, merge
from tests.support.load import with_user
from tests.support.mx import MxSink

pytestmark = pytest.mark.e2e
Answer = tuple[int, dict[str, str], Any]


def settings(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return merge(api_on(tokens_file=str(tmp_path / "tokens")), extra)


def epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def post(daemon: Relay, token: str, body: Any, key: str | None = None) -> Answer:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return daemon.api("POST", "/v1/messages", token, body, headers=headers)


def queued(answer: Answer) -> dict[str, Any]:
    status, _, body = answer
    assert status == 202, body
    return dict(body)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_a_message_from_fields_is_built_queued_and_delivered(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    daemon = relay(settings(tmp_path))
    token = add_token(daemon, "app", "--scope", "send,read")
    answer = post(daemon, token, {
        "from": "Shop <shop@sender.test>", "to": ["Ann <ann@a.test>"], "cc": "cc@a.test",
        "bcc": ["hidden@a.test"], "subject": "Your order ✓", "text": "Thanks, Ann.",
        "html": "<p>Thanks, <b>Ann</b>.</p>", "headers": {"Reply-To": "help@sender.test"},
        "attachments": [{"filename": "receipt.pdf", "content_type": "application/pdf",
                         "content": b64(b"%PDF-1.4 fake")}],
    })  # fmt: skip
    body = queued(answer)
    assert body["status"] == "queued" and abs(epoch(body["expected_attempt_at"]) - time.time()) < 5
    doc = daemon.api("GET", "/v1/openapi.json")[2]
    schema = doc["paths"]["/v1/messages"]["post"]["responses"]["202"]["content"]
    validator = {**schema["application/json"]["schema"], "components": doc["components"]}
    Draft202012Validator(validator).validate(body)  # as the API describes it
    [got] = sink.wait_for(1)
    assert got.mail_from == "shop@sender.test"
    assert sorted(got.rcpt_tos) == ["ann@a.test", "cc@a.test", "hidden@a.test"]
    msg = email.message_from_bytes(got.data, policy=email.policy.default)
    assert msg["From"] == "Shop <shop@sender.test>" and msg["To"] == "Ann <ann@a.test>"
    assert msg["Cc"] == "cc@a.test" and msg["Bcc"] is None and "hidden" not in got.data.decode()
    assert msg["Subject"] == "Your order ✓" and msg["Reply-To"] == "help@sender.test"
    assert msg["Date"] and msg["Message-ID"] and f"with HTTP id {body['id']}" in msg["Received"]
    assert msg.get_body(("plain",)).get_content().strip() == "Thanks, Ann."
    assert "<b>Ann</b>" in msg.get_body(("html",)).get_content()
    [pdf] = list(msg.iter_attachments())
    assert pdf.get_filename() == "receipt.pdf" and pdf.get_content() == b"%PDF-1.4 fake"
    assert all(line.isascii() for line in got.data.splitlines())  # 7bit: no hop needs 8BITMIME
    daemon.wait_event("delivered", id=body["id"])
    item = daemon.api("GET", f"/v1/messages/{body['id']}", token)[2]
    assert item["status"] == "delivered" and item["tenant"] == "default"


def test_a_raw_message_keeps_its_content_and_gets_date_and_message_id(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    daemon = relay(settings(tmp_path))
    token = add_token(daemon, "app", "--scope", "send")
    raw = b"From: app@sender.test\nTo: bob@a.test\nSubject: raw\n\n.leading dot\nbody\n"
    body = queued(post(daemon, token, {"from": "app@sender.test", "to": "bob@a.test",
                                       "raw": b64(raw)}))  # fmt: skip
    [got] = sink.wait_for(1)
    assert got.rcpt_tos == ["bob@a.test"]
    assert got.data.endswith(b"Subject: raw\r\n\r\n.leading dot\r\nbody\r\n")
    msg = email.message_from_bytes(got.data, policy=email.policy.default)
    assert msg["Date"] and msg["Message-ID"] and body["id"] in msg["Received"]


def test_send_at_batch_and_priority_as_over_smtp(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    daemon = relay(settings(tmp_path))
    token = add_token(daemon, "app", "--scope", "send,read,cancel")
    send_at = time.time() + 3600
    at = datetime.fromtimestamp(send_at).astimezone().isoformat()
    body = queued(post(daemon, token, {"from": "app@sender.test", "to": "later@a.test",
                                       "text": "later", "send_at": at, "batch_id": "week.48",
                                       "priority": "low"}))  # fmt: skip
    assert body["status"] == "scheduled" and abs(epoch(body["expected_attempt_at"]) - send_at) < 1
    item = daemon.api("GET", f"/v1/messages/{body['id']}", token)[2]
    assert (item["status"], item["batch_id"], item["lane"]) == ("scheduled", "week.48", "low")
    [listed] = daemon.cli_json("queue", "list")
    assert listed["id"] == body["id"] and listed["batch_id"] == "week.48"
    assert daemon.api("DELETE", "/v1/batches/week.48", token)[2]["cancelled"] == 1
    assert sink.received == []


def test_a_retry_with_the_key_is_one_message_and_a_conflict_409(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    daemon = relay(settings(tmp_path))
    token = add_token(daemon, "app", "--scope", "send")
    order = {"from": "app@sender.test", "to": "c@a.test", "subject": "Order 7", "html": "<p>7</p>",
             "attachments": [{"filename": "a.txt", "content": b64(b"seven")}]}  # fmt: skip
    first = post(daemon, token, order, key="order-7")
    again = post(daemon, token, order, key="order-7")
    assert again[0] == 202 and again[2]["id"] == queued(first)["id"]
    assert again[1].get("Idempotent-Replayed") == "true" and "Idempotent-Replayed" not in first[1]
    other = post(daemon, token, {**order, "subject": "Order 8"}, key="order-7")
    assert_problem(other, 409, "Idempotency-Key")
    assert other[2]["field"] == "Idempotency-Key"
    # Two at the same moment under a new key: one message.
    answers: list[Answer] = []
    racers = [
        threading.Thread(target=lambda: answers.append(post(daemon, token, order, key="race")))
        for _ in range(4)
    ]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(30)
    assert [a[0] for a in answers] == [202] * 4 and len({a[2]["id"] for a in answers}) == 1
    sink.wait_for(2)
    time.sleep(1)
    assert len(sink.received) == 2  # order-7 once, race once


def test_a_kill9_right_after_the_202_then_the_same_request(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    sink.script_data("451 4.3.0 not yet", "250 2.0.0 ok")  # nothing delivered before the kill
    daemon = relay(settings(tmp_path, delivery={"retry": {"schedule": ["2s"], "jitter": 0}}))
    token = add_token(daemon, "app", "--scope", "send")
    order = {"from": "app@sender.test", "to": "k@a.test", "text": "once"}
    first = queued(post(daemon, token, order, key="k-1"))
    daemon.kill9()
    daemon.start()
    again = post(daemon, token, order, key="k-1")
    assert again[0] == 202 and again[2]["id"] == first["id"]
    assert again[1].get("Idempotent-Replayed") == "true"
    sink.wait_for(1, timeout=20)
    time.sleep(1)
    assert len(sink.received) == 1


def test_the_tenants_sender_domains_and_quota(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    quotas = {"users": {"alice": {"1h": 1}}, "action": "refuse"}
    daemon = with_user(relay, settings(tmp_path, quotas=quotas), tmp_path)
    token = add_token(daemon, "alice-app", "--tenant", "alice", "--scope", "send,read")
    foreign = post(daemon, token, {"from": "x@elsewhere.test", "to": "a@a.test", "text": "x"})
    assert_problem(foreign, 403, "not owned by user alice")
    assert foreign[2]["field"] == "from"
    body = queued(post(daemon, token, {"from": "a@sender.test", "to": "a@a.test", "text": "1"}))
    item = daemon.api("GET", f"/v1/messages/{body['id']}", token)[2]
    assert item["tenant"] == "alice"
    over = post(daemon, token, {"from": "a@sender.test", "to": "a@a.test", "text": "2"})
    assert_problem(over, 429, "quota")
    assert 0 < int(over[1]["Retry-After"]) <= 3600


# Bad bodies and the field each 400 names.
OK = {"from": "app@sender.test", "to": "a@a.test"}
BAD = [
    ({"to": "a@a.test", "text": "x"}, "from"),
    ({"from": "not an address", "to": "a@a.test"}, "from"),
    ({"from": "app@sender.test"}, "to"),
    ({"from": "app@sender.test", "to": ["a@a.test", "bad"]}, "to[1]"),
    ({**OK, "subject": "a\r\nBcc: x@y.test"}, "subject"),
    ({**OK, "headers": {"Content-Type": "x/y"}}, "headers.Content-Type"),
    ({**OK, "attachments": [{"filename": "a"}]}, "attachments[0].content"),
    ({**OK, "send_at": "tomorrow"}, "send_at"),
    ({**OK, "priority": "urgent"}, "priority"),
    ({**OK, "batch_id": "a b"}, "batch_id"),
    ({**OK, "raw": "%%%"}, "raw"),
    ({**OK, "raw": b64(b"S: x\r\n\r\n"), "text": "x"}, "text"),
    ({**OK, "colour": "red"}, "colour"),
    ([1, 2], None),
]


def test_every_error_is_answered_as_documented(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    daemon = relay(settings(tmp_path, smtp={"max_message_size": 4096, "max_recipients": 3}))
    token = add_token(daemon, "app", "--scope", "send")
    for body, field in BAD:
        answer = post(daemon, token, body)
        assert_problem(answer, 400, (field or "JSON object").split("[")[0].split(".")[0])
        assert answer[2].get("field") == field, (body, answer)
    reader = add_token(daemon, "reader", "--scope", "read")
    ok = {"from": "app@sender.test", "to": "a@a.test", "text": "x"}
    assert_problem(post(daemon, token, {**ok, "text": "x" * 5000}), 413, "max_message_size")
    too_many = {**ok, "to": ["a@a.test", "b@a.test"], "bcc": ["c@a.test", "d@a.test"]}
    assert_problem(post(daemon, token, too_many), 400, "max_recipients")
    assert_problem(post(daemon, reader, ok), 403, "lacks the scope send")
    assert_problem(post(daemon, "nope", ok), 401, "not known")
    assert_problem(post(daemon, token, ok, key="é"), 400, "Idempotency-Key")
    status, _, body = daemon.api("POST", "/v1/messages", token, raw_body=b"{not json")
    assert status == 400 and "not JSON" in body["detail"]
    assert sink.received == []


def test_the_api_socket_is_ours_and_external_is_offered_nowhere_else(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    daemon = with_user(relay, settings(tmp_path), tmp_path)  # AUTH offered in clear on loopback
    socket_file = daemon.spool / "run" / "submit.sock"
    assert socket_file.stat().st_mode & 0o777 == 0o600
    with daemon.smtp() as client:
        client.ehlo()
        assert client.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
        code, text = client.docmd("AUTH", "EXTERNAL " + b64(b"alice"))
        assert code == 504, text  # not a mechanism of the relay listener
