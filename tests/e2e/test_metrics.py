"""The HTTP endpoint of the real daemon: metrics that exist before the first event and move
with the mail, aggregated over its processes; health and readiness."""

from __future__ import annotations

import os
import signal
import time

from tests.support.daemon import RelayFactory
from tests.support.mx import MxSink
from tests.support.smtp import RawClient


def test_every_series_reports_zero_before_the_first_event(
    relay: RelayFactory, sink: MxSink
) -> None:
    daemon = relay()
    seen = daemon.samples()
    zero = [
        ("relay_messages_received_total", {}),
        ("relay_smtp_sessions_active", {}),
        ("relay_intake_seconds_count", {}),
        ("relay_queue_oldest_message_age_seconds", {}),
        ("relay_dead_letter_messages", {}),
        ("relay_delivery_duration_seconds_count", {}),
        *[
            ("relay_messages_rejected_total", {"reason": r})
            for r in ("relay_denied", "message_too_big")
        ],
        *[("relay_queue_messages", {"state": s}) for s in ("queued", "active", "deferred", "held")],
        *[("relay_recipients_total", {"result": r}) for r in ("delivered", "bounced", "expired")],
        *[
            ("relay_delivery_attempts_total", {"outcome": o, "provider": p})
            for o in ("delivered", "temporary", "permanent")
            for p in ("gmail", "outlook", "yahoo", "icloud", "other")
        ],
        *[("relay_delivery_deferrals_total", {"provider": p}) for p in ("gmail", "other")],
    ]
    for name, labels in zero:
        assert seen[(name, tuple(sorted(labels.items())))] == 0.0, (name, labels)
    assert seen[("relay_spool_free_bytes", ())] > 0
    [info] = [k for k in seen if k[0] == "relay_build_info"]
    assert dict(info[1])["version"]


def test_metrics_move_with_the_mail(relay: RelayFactory, sink: MxSink) -> None:
    sink.script_rcpt("gone@a.test", "550 5.1.1 no such user")
    sink.script_rcpt("later@a.test", "451 4.3.0 later")
    daemon = relay({"delivery": {"retry": {"schedule": ["1h"]}}})
    daemon.send(["ok@a.test", "gone@a.test", "later@a.test"])
    daemon.wait_event("retry_scheduled")
    with RawClient(daemon.port, timeout=5) as idle:
        idle.reply()
        time.sleep(0.2)
        assert daemon.metric("relay_smtp_sessions_active") == 1.0
    time.sleep(1.2)  # the scheduler publishes its gauges every second
    assert daemon.metric("relay_messages_received_total") == 1.0
    assert daemon.metric("relay_intake_seconds_count") == 1.0
    assert daemon.metric("relay_recipients_total", result="delivered") == 1.0
    assert daemon.metric("relay_recipients_total", result="bounced") == 1.0
    assert daemon.metric("relay_dead_letter_messages") == 1.0
    for outcome in ("delivered", "temporary", "permanent"):
        assert (
            daemon.metric("relay_delivery_attempts_total", outcome=outcome, provider="other") == 1.0
        )
    assert daemon.metric("relay_delivery_deferrals_total", provider="other") == 1.0
    assert daemon.metric("relay_queue_messages", state="deferred") == 1.0
    assert daemon.metric("relay_queue_oldest_message_age_seconds") > 0.5
    assert daemon.metric("relay_delivery_duration_seconds_count") == 1.0


def test_rejections_are_counted_by_reason(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay({"smtp": {"relay_networks": ["10.0.0.0/8"]}})
    with daemon.smtp() as client:
        client.mail("x@sender.test")
        assert client.rcpt("victim@a.test")[0] == 554
    assert daemon.metric("relay_messages_rejected_total", reason="relay_denied") == 1.0


def test_health_and_readiness(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay()
    assert daemon.get("/healthz") == (200, "ok\n")
    assert daemon.get("/readyz") == (200, "ready\n")
    assert daemon.get("/nope")[0] == 404
    scheduler = daemon.worker_pid("scheduler")
    os.kill(scheduler, signal.SIGSTOP)  # alive but silent: not ready
    try:
        deadline = time.monotonic() + 20
        while daemon.get("/readyz")[0] == 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        status, body = daemon.get("/readyz")
        assert status == 503 and "scheduler: no heartbeat" in body
        assert daemon.get("/healthz")[0] == 200
    finally:
        os.kill(scheduler, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while daemon.get("/readyz")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert daemon.get("/readyz") == (200, "ready\n")


def test_metrics_count_across_a_worker_restart(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay()
    daemon.send(["one@a.test"])
    sink.wait_for(1)
    os.kill(daemon.worker_pid("intake"), signal.SIGKILL)
    daemon.wait_event("ready", process="intake", count=2, timeout=20)
    daemon.send(["two@a.test"])
    sink.wait_for(2)
    assert daemon.metric("relay_messages_received_total") == 2.0  # the dead worker's count stays
