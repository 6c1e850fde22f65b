"""Priority lanes and sending quotas at intake, through the real daemon: X-Relay-Priority, user
and listener lanes, quota holds that wait for the next window and quota refusals."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from tests.support.daemon import Relay, RelayFactory
from tests.support.load import PASSWORD, with_user
from tests.support.mx import MxSink, Received


def state(daemon: Relay, queue_id: str) -> dict[str, Any]:
    """The message's spool state file (the lane and quota_until the scheduler reads)."""
    data: dict[str, Any] = json.loads((daemon.spool / "queue" / f"{queue_id}.json").read_text())
    return data


def lane_of(daemon: Relay, queue_id: str) -> str:
    return str(daemon.wait_event("received", id=queue_id)[0]["lane"])


def window_start(seconds: float, room: float) -> float:
    """Wait, if needed, until at least `room` seconds are left in the current window of this
    length (aligned to UTC epoch multiples); return that window's end."""
    end = math.floor(time.time() / seconds) * seconds + seconds
    if end - time.time() < room:
        time.sleep(end - time.time() + 0.05)
        end += seconds
    return end


def send_as_alice(daemon: Relay, body: bytes) -> tuple[int, str]:
    with daemon.smtp() as client:
        client.login("alice", PASSWORD)
        client.mail("app@sender.test")
        client.rcpt("user@a.test")
        code, text = client.data(body)
    return code, text.decode()


def test_priority_header_is_the_lane_and_does_not_leave(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay()
    send_at = time.time() + 3  # held in the queue long enough to read its state
    body = f"X-Relay-Priority: HIGH\r\nX-Relay-Send-At: {send_at:.3f}\r\nSubject: p\r\n\r\nhi\r\n"
    queue_id = daemon.send(["user@a.test"], body.encode())
    assert state(daemon, queue_id)["lane"] == "high"
    assert lane_of(daemon, queue_id) == "high"
    [got] = sink.wait_for(1, timeout=15)
    assert b"X-Relay-" not in got.data and got.data.endswith(b"Subject: p\r\n\r\nhi\r\n")


def test_no_priority_is_the_normal_lane(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay()
    queue_id = daemon.send(["user@a.test"])
    assert lane_of(daemon, queue_id) == "normal"


def test_bad_priority_is_refused_at_data(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay()
    cases = [
        (b"X-Relay-Priority: urgent\r\n", b"X-Relay-Priority: 'urgent' is not a priority (use "),
        (b"X-Relay-Priority: low\r\n" * 2, b"More than one X-Relay-Priority header field"),
    ]
    for field, reply in cases:
        with daemon.smtp() as client:
            client.mail("app@sender.test")
            client.rcpt("user@a.test")
            code, text = client.data(field + b"Subject: x\r\n\r\nhi\r\n")
        assert (code, text[:6]) == (550, b"5.6.0 ") and reply in text, text
    assert list((daemon.spool / "queue").iterdir()) == []
    daemon.wait_event("rejected", count=2, reason="bad_directive")


def test_listener_lane_and_header_off(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay({"lanes": {"listeners": {"relay": "low"}, "header": False}})
    queue_id = daemon.send(["user@a.test"], b"X-Relay-Priority: urgent\r\nSubject: x\r\n\r\nhi\r\n")
    assert lane_of(daemon, queue_id) == "low"  # ignored, not refused, when header is off
    [got] = sink.wait_for(1)
    assert b"X-Relay-Priority" not in got.data


def test_user_lane_and_user_quota(relay: RelayFactory, sink: MxSink, tmp_path: Path) -> None:
    settings = {
        "lanes": {"users": {"alice": "high"}, "listeners": {"relay": "low"}},
        "quotas": {"action": "refuse", "users": {"alice": {"hourly": 2}}},
    }
    daemon = with_user(relay, settings, tmp_path)
    window_start(3600, room=30)
    assert lane_of(daemon, daemon.send(["user@a.test"])) == "low"  # no AUTH: the listener's
    code, text = send_as_alice(daemon, b"Subject: 1\r\n\r\nhi\r\n")
    assert code == 250 and lane_of(daemon, text.rsplit(" ", 1)[1]) == "high"
    code, text = send_as_alice(daemon, b"X-Relay-Priority: normal\r\nSubject: 2\r\n\r\nhi\r\n")
    assert code == 250 and lane_of(daemon, text.rsplit(" ", 1)[1]) == "normal"
    code, text = send_as_alice(daemon, b"Subject: 3\r\n\r\nhi\r\n")
    assert code == 452, text
    assert text.startswith("4.7.1 Sending quota exceeded for user:alice: 2 messages per hour; ")
    daemon.send(["user@a.test"])  # the quota is alice's, not the sender domain's
    assert len(sink.wait_for(4)) == 4


def test_quota_hold_waits_for_the_next_window(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay({"quotas": {"sender_domains": {"Sender.test": {"10s": 2}}}})
    boundary = window_start(10, room=5)
    ids = [daemon.send(["user@a.test"], f"Subject: {n}\r\n\r\nhi\r\n".encode()) for n in range(3)]
    held = state(daemon, ids[2])
    assert held["quota_until"] == boundary and held["next_attempt"] >= boundary
    assert daemon.wait_event("quota_held", id=ids[2])[0]["until"] == boundary
    assert sorted(subject(m) for m in sink.wait_for(2, timeout=10)) == [b"0", b"1"]
    assert subject(sink.wait_for(3, timeout=30)[2]) == b"2" and time.time() >= boundary
    assert 'relay_quota_exceeded_total{action="held"} 1.0' in scrape(daemon, "quota_exceeded")


def test_quota_refuse_is_a_452_and_nothing_is_spooled(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay({"quotas": {"action": "refuse", "sender_domains": {"sender.test": {"1h": 1}}}})
    end = window_start(3600, room=30)
    daemon.send(["user@a.test"])
    with daemon.smtp() as client:
        client.mail("app@sender.test")
        client.rcpt("user@a.test")
        code, text = client.data(b"Subject: two\r\n\r\nhi\r\n")
    expected = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(end))
    assert (code, text.decode()) == (
        452,
        "4.7.1 Sending quota exceeded for domain:sender.test: 1 messages per hour; "
        f"try again after {expected}",
    )
    daemon.send(["user@a.test"], sender="app@other.test")  # other domains are not limited
    assert len(sink.wait_for(2)) == 2
    time.sleep(0.5)
    assert len(sink.received) == 2 and len(daemon.events("received")) == 2  # 452: not spooled
    assert daemon.wait_event("rejected", reason="over_quota")[0]["quota"].startswith("domain:")
    assert 'relay_quota_exceeded_total{action="refused"} 1.0' in scrape(daemon, "quota_exceeded")


def scrape(daemon: Relay, wanted: str) -> list[str]:
    """The metrics lines naming wanted (the intake counts before it replies)."""
    return [line for line in daemon.get("/metrics")[1].splitlines() if wanted in line]


def subject(message: Received) -> bytes:
    return message.data.partition(b"Subject: ")[2].partition(b"\r\n")[0]
