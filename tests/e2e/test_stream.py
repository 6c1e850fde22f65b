"""The live event stream on the real daemon (issue 15): a client resuming with Last-Event-ID from
the middle of a run gets every later event once, replay and live together, and so after a
kill -9 and a restart; one request waits
for a message's outcome; filters and tenants; an unknown id starts with a reset; the per-token
limit, the heartbeat and bad requests."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.api import add_token, assert_problem
from tests.support.daemon import Relay, RelayFactory, api_on, eventually, merge
from tests.support.load import journal, kill9_under_load
from tests.support.mx import MxSink
from tests.support.sse import Frame, Stream

pytestmark = pytest.mark.e2e
FINAL = ("message.delivered", "message.bounced")


def settings(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    base = {
        **api_on(tokens_file=str(tmp_path / "tokens")),
        "delivery": {"retry": {"schedule": ["2s"], "jitter": 0}},
    }
    return merge(base, extra)


def with_token(relay: RelayFactory, tmp_path: Path) -> tuple[Relay, str]:
    """A relay with the API on, and a token of every tenant."""
    daemon = relay(settings(tmp_path))
    assert daemon.api_url
    return daemon, add_token(daemon, "app")


def ids(frames: list[Frame]) -> list[str]:
    return [f.id or "" for f in frames]


def ended(frames: list[Frame], recipients: int) -> bool:
    return sum(f.event in FINAL for f in frames) >= recipients


def test_resumed_from_the_middle_every_later_event_arrives_once(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    rcpts = [f"ok{i}@a.test" for i in range(40)]
    rcpts += [f"bad{i}@a.test" for i in range(10)] + [f"later{i}@a.test" for i in range(10)]
    for i in range(10):
        sink.script_rcpt(f"bad{i}@a.test", "550 5.1.1 no such user")
        sink.script_rcpt(f"later{i}@a.test", "451 4.3.0 try later", "250 2.1.5 ok")
    daemon, token = with_token(relay, tmp_path)
    with Stream(daemon.api_url, token) as whole:
        assert whole.status == 200 and whole.headers["Content-Type"] == "text/event-stream"
        sender = threading.Thread(target=lambda: [daemon.send([r]) for r in rcpts])
        sender.start()
        middle = whole.wait(lambda got: len(got) >= 40, 60)[30]
        resumed = Stream(daemon.api_url, token, headers={"Last-Event-ID": middle.id or ""})
        by_query = Stream(daemon.api_url, token, f"last_event_id={middle.id}")
        sender.join(60)
        every = whole.wait(lambda got: ended(got, len(rcpts)), 60)
        for later in (resumed, by_query):
            got = later.wait(lambda got: bool(got) and got[-1].id == every[-1].id, 30)
            assert ids(got) == ids(every)[ids(every).index(middle.id or "") + 1 :]
            later.close()
    assert len(set(ids(every))) == len(every)  # none twice
    assert set(ids(every)) == journaled(daemon)  # none missing
    for frame in every:
        data = frame.json()
        assert frame.id == data["event_id"] and frame.event == f"message.{data['event']}"
    kinds = [f.event for f in every]
    assert kinds.count("message.received") == len(rcpts)
    assert kinds.count("message.deferred") == 10 and kinds.count("message.bounced") == 10


def test_after_kill_9_a_client_resumes_with_its_last_id(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    daemon, token = with_token(relay, tmp_path)
    with Stream(daemon.api_url, token) as before:
        daemon.send(["first@a.test"])
        before.wait(lambda got: len(got) >= 2, 20)  # its received and delivered: streaming
        acked = kill9_under_load(daemon, at_least=60)
        before.ended.wait(10)  # the relay went away under it
    seen = before.events()
    assert seen, "the stream saw nothing before the kill"
    daemon.start()
    with Stream(daemon.api_url, token, headers={"Last-Event-ID": seen[-1].id or ""}) as after:
        # every acknowledged message ends delivered (the sink accepts all), and every event
        # the journal has is seen once, before the kill or after it
        after.wait(lambda got: delivered(seen + got) >= set(acked), 60)
        after.wait(lambda got: set(ids(seen)) | set(ids(got)) == journaled(daemon), 30)
        time.sleep(1.0)  # nothing more may come: a repeat would arrive now
        got = after.events()
    assert not set(ids(seen)) & set(ids(got)), "an event sent before the kill came again"
    assert len(set(ids(got))) == len(got)


def journaled(daemon: Relay) -> set[str]:
    return {e["event_id"] for e in journal(daemon)}


def delivered(frames: list[Frame]) -> set[str]:
    return {f.json()["id"] for f in frames if f.event == "message.delivered"}


def test_one_request_waits_for_a_message_outcome(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    sink.script_rcpt("later@a.test", "451 4.3.0 try later", "250 2.1.5 ok")
    daemon, token = with_token(relay, tmp_path)
    done = daemon.send(["ok@a.test"])
    daemon.wait_event("delivered", id=done)
    # Already delivered: the message's story is replayed, so the outcome cannot be missed.
    with Stream(daemon.api_url, token, f"message_id={done}&types=delivered,bounced") as past:
        [frame] = past.wait(lambda got: len(got) >= 1, 10)
        assert frame.event == "message.delivered" and frame.json()["rcpt"] == "ok@a.test"
    later = daemon.send(["later@a.test"])
    with Stream(daemon.api_url, token, f"message_id={later}&types=message.delivered") as live:
        [frame] = live.wait(lambda got: len(got) >= 1, 30)
        data = frame.json()
        assert (data["id"], data["event"], data["status"]) == (later, "delivered", "delivered")
        assert data["reply"].startswith("250")


def test_filters_and_tenants(relay: RelayFactory, sink: MxSink, tmp_path: Path) -> None:
    sink.script_rcpt("bad@a.test", "550 5.1.1 no such user")
    daemon = relay(settings(tmp_path))
    token = add_token(daemon, "app")
    other = add_token(daemon, "other", "--tenant", "other")
    assert daemon.api_url
    url = daemon.api_url
    with (
        Stream(url, token, "recipient=BAD@a.test") as by_rcpt,
        Stream(url, token, "batch_id=spring.1&types=received") as by_batch,
        Stream(url, token, "types=bounced") as bounced,
        Stream(url, other) as foreign,
    ):
        batch = b"X-Relay-Batch-Id: spring.1\r\nSubject: hi\r\n\r\nhello\r\n"
        first = daemon.send(["bad@a.test", "ok@a.test"], batch)
        second = daemon.send(["ok@a.test"])
        daemon.wait_event("delivered", id=second)
        got = by_rcpt.wait(lambda got: any(f.event == "message.dead_lettered" for f in got), 20)
        # bad@'s own events and its message's message-wide ones, never ok@'s delivery
        kinds = [f.event for f in got]
        assert kinds == ["message.received", "message.bounced", "message.dead_lettered"]
        assert {f.json()["id"] for f in got} == {first}
        [received] = by_batch.wait(lambda got: len(got) >= 1, 10)
        assert received.json()["id"] == first and received.json()["batch_id"] == "spring.1"
        [bounce] = bounced.wait(lambda got: len(got) >= 1, 10)
        assert bounce.json()["rcpt"] == "bad@a.test"
        time.sleep(1.0)  # what a tenant's stream would have had by now
        assert foreign.events() == [] and len(by_batch.events()) == 1


def test_unknown_last_event_id_starts_with_a_reset(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    daemon, token = with_token(relay, tmp_path)
    msg_id = daemon.send(["ok@a.test"])
    daemon.wait_event("delivered", id=msg_id)
    gone = "01J0000000000000000000000"
    with Stream(daemon.api_url, token, headers={"Last-Event-ID": gone}) as stream:
        stream.wait(lambda got: len(got) >= 2, 10)
        first = stream.frames[0]
        assert first.event == "reset" and first.json()["last_event_id"] == gone
        assert [f.json()["id"] for f in stream.events()] == [msg_id, msg_id]


def test_streams_per_token_heartbeat_and_bad_requests(relay: RelayFactory, tmp_path: Path) -> None:
    daemon = relay(settings(tmp_path, api={"max_streams_per_token": 2}))
    token = add_token(daemon, "app")
    url = daemon.api_url
    assert url
    first, second = Stream(url, token), Stream(url, token)
    third = Stream(url, token)
    assert third.status == 429 and third.headers["Retry-After"] == "5"
    assert "max_streams_per_token" in third.body["detail"]
    first.close()
    again: list[Stream] = []
    eventually(lambda: again.append(Stream(url, token)) or again[-1].status == 200, timeout=10)
    time.sleep(16)  # a heartbeat comes every 15 s
    assert "ping" in second.comments
    for stream in (second, *again):
        stream.close()
    for query, field in (
        ("types=delivered,nonsense", "types"), ("message_id=nope", "message_id"),
        ("batch_id=a%20b", "batch_id"), ("since=1", "since"),
    ):  # fmt: skip
        answer = daemon.api("GET", f"/v1/events?{query}", token)
        assert_problem(answer, 400, field)
        assert answer[2]["field"] == field
    assert daemon.api("GET", "/v1/events")[0] == 401
    code = bad_scope(daemon)
    assert code == 403


def bad_scope(daemon: Relay) -> int:
    sender_only = add_token(daemon, "sender", "--scope", "send")
    return daemon.api("GET", "/v1/events", sender_only)[0]
