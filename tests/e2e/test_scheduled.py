"""Scheduled send through the real daemon: X-Relay-Send-At holds a message until its time."""

from __future__ import annotations

import time

from tests.support.daemon import RelayFactory, eventually
from tests.support.mx import MxSink


def body(send_at: str) -> bytes:
    return f"X-Relay-Send-At: {send_at}\r\nSubject: later\r\n\r\nhello\r\n".encode()


def test_message_leaves_at_its_time_without_the_directive(
    relay: RelayFactory, sink: MxSink
) -> None:
    daemon = relay()
    send_at = time.time() + 15  # three CLI runs (a second each on a busy machine) before that
    queue_id = daemon.send(["user@a.test"], body(f"{send_at:.3f}"))
    [entry] = daemon.cli_json("queue", "list")
    assert entry["id"] == queue_id and entry["status"] == "scheduled" and entry["send_at"]
    assert "(scheduled for " in daemon.cli("queue", "list").stdout
    daemon.cli("queue", "flush", "ALL")  # flush does not send scheduled mail early
    # The scheduler publishes its gauges every second.
    eventually(lambda: daemon.metric("relay_queue_messages", state="scheduled") == 1.0, 10)
    assert time.time() < send_at - 0.5, "the checks above took too long to prove anything"
    assert sink.received == []
    [got] = sink.wait_for(1, timeout=20)
    arrived = time.time()
    assert send_at - 0.05 <= arrived <= send_at + 1.0  # on time, within a second
    assert b"X-Relay-Send-At" not in got.data and got.data.endswith(
        b"Subject: later\r\n\r\nhello\r\n"
    )


def test_past_time_sends_now(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay()
    daemon.send(["user@a.test"], body("2000-01-01T00:00:00Z"))
    [got] = sink.wait_for(1, timeout=5)
    assert b"X-Relay-Send-At" not in got.data


def test_nonsense_time_is_refused_at_data(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay()
    with daemon.smtp() as client:
        client.mail("app@sender.test")
        client.rcpt("user@a.test")
        code, text = client.data(body("next tuesday"))
    assert code == 550 and text.startswith(b"5.6.0 X-Relay-Send-At: 'next tuesday' is not")
    assert list((daemon.spool / "queue").iterdir()) == []
