"""Idempotent sends over SMTP through the real daemon (X-Relay-Idempotency-Key): a retry gets
the original id and makes no second delivery, other content under the key is refused, submissions
racing with one key make one message, a kill -9 right after the 250 (or after the delivery)
changes nothing, keys are the tenant's own, and a key older than idempotency.window is forgotten."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import threading
import time
from collections import Counter
from pathlib import Path

from tests.support.daemon import Relay, RelayFactory, eventually
from tests.support.load import PASSWORD, journal, with_user
from tests.support.mx import ACCEPT, MxSink

KEY = "order-4711/confirmation"
ID_IN_RECEIVED = re.compile(rb"with E?SMTPS?A? id ([0-9a-f]{20})")


def message(key: str = KEY, subject: str = "Your order", stamp: int = 0) -> bytes:
    """What a mail library builds for each attempt: the same message, a new Date and Message-ID."""
    return (
        f"Date: Tue, 1 Dec 2026 10:00:{stamp:02d} +0000\r\nMessage-ID: <{stamp}@app.test>\r\n"
        f"X-Relay-Idempotency-Key: {key}\r\nSubject: {subject}\r\n\r\nThank you.\r\n"
    ).encode()


def submit(daemon: Relay, body: bytes, rcpt: str = "user@a.test") -> tuple[int, str]:
    with daemon.smtp() as client:
        client.mail("app@sender.test")
        client.rcpt(rcpt)
        code, text = client.data(body)
    return code, text.decode()


def settle(sink: MxSink, seconds: float = 1.5) -> Counter[str]:
    """Deliveries by queue id, once a retry or a second copy would have arrived."""
    time.sleep(seconds)
    found = [ID_IN_RECEIVED.search(m.data) for m in sink.received]
    return Counter(match.group(1).decode() if match else "?" for match in found)


def test_a_retry_gets_the_same_id_and_one_delivery(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay()
    first = daemon.send(["user@a.test"], message(stamp=1))
    sink.wait_for(1)
    assert daemon.send(["user@a.test"], message(stamp=2)) == first  # its 250 was lost
    assert settle(sink) == Counter({first: 1})
    [replayed] = daemon.wait_event("replayed", id=first)
    assert (replayed["tenant"], replayed["key"]) == ("default", KEY)
    assert daemon.metric("relay_idempotent_replays_total") == 1
    assert daemon.metric("relay_messages_rejected_total", reason="idempotency_conflict") == 0
    assert b"X-Relay-Idempotency-Key" not in sink.received[0].data
    [received] = [e for e in journal(daemon) if e["event"] == "received"]
    assert (received["id"], received["idempotency_key"]) == (first, KEY)
    assert len(received["content_hash"]) == 20


def test_other_content_under_the_key_is_refused(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay()
    first = daemon.send(["user@a.test"], message())
    code, text = submit(daemon, message(subject="Your refund"))
    assert (code, text) == (
        550,
        f"5.7.0 X-Relay-Idempotency-Key '{KEY}' was used for a different message",
    )
    assert submit(daemon, message(), rcpt="other@a.test")[0] == 550  # another recipient
    daemon.wait_event("rejected", reason="idempotency_conflict", count=2)
    assert settle(sink) == Counter({first: 1})


def test_a_bad_key_is_refused_naming_the_field(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay()
    code, text = submit(daemon, message(key="x" * 257))
    assert code == 550 and text.startswith("5.6.0 X-Relay-Idempotency-Key: 'xxx")


def test_submissions_at_the_same_moment_make_one_message(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay()
    clients = [daemon.smtp() for _ in range(8)]
    for client in clients:
        client.mail("app@sender.test")
        client.rcpt("user@a.test")
    start = threading.Barrier(len(clients))
    ids: list[str] = []

    def send(client: smtplib.SMTP) -> None:
        start.wait()
        code, text = client.data(message())
        assert code == 250, text
        ids.append(text.decode().rsplit(" ", 1)[1])

    threads = [threading.Thread(target=send, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    for client in clients:
        client.quit()
    assert len(ids) == len(clients) and len(set(ids)) == 1
    assert settle(sink) == Counter({ids[0]: 1})


def test_kill9_right_after_the_250_then_the_same_submission(
    relay: RelayFactory, sink: MxSink
) -> None:
    daemon = relay()
    sink.script_data("451 4.3.0 not yet", ACCEPT)  # nothing delivered before the kill
    first = daemon.send(["user@a.test"], message(stamp=1))
    daemon.kill9()  # supervisor, intake and scheduler, right after the flush and the 250
    daemon.start()
    assert daemon.send(["user@a.test"], message(stamp=2)) == first
    sink.wait_for(1, timeout=20)
    assert settle(sink) == Counter({first: 1})


def test_the_intake_killed_alone_comes_back_with_its_keys(
    relay: RelayFactory, sink: MxSink
) -> None:
    daemon = relay({"delivery": {"scan_interval": "1s"}})  # a wake-up lost with the intake
    sink.script_data("451 4.3.0 not yet", ACCEPT)
    first = daemon.send(["user@a.test"], message(stamp=1))
    os.kill(daemon.worker_pid("intake"), signal.SIGKILL)  # the supervisor restarts it
    daemon.wait_event("ready", process="intake", count=2)
    assert daemon.send(["user@a.test"], message(stamp=2)) == first
    sink.wait_for(1, timeout=20)
    assert settle(sink) == Counter({first: 1})


def test_a_key_survives_its_message_and_a_restart(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay()
    first = daemon.send(["user@a.test"], message(stamp=1))
    daemon.wait_event("delivered", id=first)
    # Removed from the queue (a kill before that would repeat the delivery: at least once).
    eventually(lambda: not (daemon.spool / "queue" / f"{first}.json").exists())
    daemon.kill9()
    daemon.start()  # the key comes back from the journal: received, then delivered
    assert daemon.send(["user@a.test"], message(stamp=2)) == first
    code, _ = submit(daemon, message(subject="changed"))
    assert code == 550
    assert settle(sink) == Counter({first: 1})


def test_keys_are_the_tenants_own(relay: RelayFactory, sink: MxSink, tmp_path: Path) -> None:
    daemon = with_user(relay, {}, tmp_path)
    mine = daemon.send(["user@a.test"], message())  # tenant "default"
    with daemon.smtp() as client:
        client.login("alice", PASSWORD)
        client.mail("app@sender.test")
        client.rcpt("user@a.test")
        code, text = client.data(message())  # the same message and key, another tenant
    assert code == 250
    theirs = text.decode().rsplit(" ", 1)[1]
    assert theirs != mine
    assert settle(sink) == Counter({mine: 1, theirs: 1})


def test_a_key_older_than_the_window_is_forgotten(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay({"idempotency": {"window": "2s"}})
    first = daemon.send(["user@a.test"], message())
    assert daemon.send(["user@a.test"], message()) == first
    time.sleep(2.2)
    second = daemon.send(["user@a.test"], message(subject="a new order"))  # no conflict now
    assert second != first
    assert settle(sink) == Counter({first: 1, second: 1})


def test_a_large_message_retried(relay: RelayFactory, sink: MxSink) -> None:
    """A body spilled to disk while it arrives is hashed from there: same answer."""
    daemon = relay()
    body = message().replace(b"Thank you.\r\n", b"x" * 998 + b"\r\n")
    big = body + (b"y" * 998 + b"\r\n") * 400  # 400 KiB: beyond what the intake keeps in memory
    first = daemon.send(["user@a.test"], big)
    assert daemon.send(["user@a.test"], big) == first
    assert submit(daemon, big + b"z\r\n")[0] == 550
    assert settle(sink) == Counter({first: 1})
