"""Webhooks on the real daemon (issue 15, first end-to-end steps): a receiver on loopback that
verifies every signature gets each event of delivered, deferred-then-delivered and bounced mail
once per event id, a final_only hook gets no deferral, and the deliveries are counted."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Relay, RelayFactory, eventually
from tests.support.load import journal, kill9_under_load
from tests.support.mx import MxSink
from tests.support.webhooks import Receiver

pytestmark = pytest.mark.e2e


def hooked(relay: RelayFactory, tmp_path: Path, hooks: list[dict[str, Any]]) -> Relay:
    """A relay with these webhooks (their secret files made with `relay webhook secret`)."""
    retry = {"delivery": {"retry": {"schedule": ["2s"], "jitter": 0}}}
    daemon = relay({"webhooks": hooks, **retry}, start=False)
    for hook in hooks:
        daemon.cli("webhook", "secret", hook["name"])
    daemon.start()
    return daemon


def secret_of(tmp_path: Path, name: str) -> str:
    return (tmp_path / f"{name}.secret").read_text().split()[0]


def test_each_event_signed_once_and_final_only(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    hooks = [
        {"name": "app", "url": "", "secret_file": str(tmp_path / "app.secret")},
        {"name": "ends", "url": "", "secret_file": str(tmp_path / "ends.secret"),
         "final_only": True},
    ]  # fmt: skip
    sink.script_rcpt("bad@a.test", "550 5.1.1 no such user")
    sink.script_rcpt("later@a.test", "451 4.3.0 try later", "250 2.1.5 ok")
    receivers: dict[str, Receiver] = {}
    daemon = relay(start=False)
    try:
        # The receivers need the secrets, the config needs their URLs: secrets first.
        for hook in hooks:
            receivers[hook["name"]] = Receiver("whsec_" + "A" * 43)
            hook["url"] = receivers[hook["name"]].url
        daemon.close()
        daemon = hooked(relay, tmp_path, hooks)
        for hook in hooks:
            receivers[hook["name"]].secret = secret_of(tmp_path, hook["name"])
        ids = [daemon.send([r]) for r in ("ok@a.test", "bad@a.test", "later@a.test")]
        app, ends = receivers["app"], receivers["ends"]
        app.wait(lambda got: sum(d["type"] == "message.delivered" for d in got) == 2, 30)
        ends.wait(lambda got: len(got) == 3, 30)
        kinds = Counter(d["type"] for d in app.got)
        assert kinds == Counter({"message.received": 3, "message.delivered": 2,
                                 "message.bounced": 1, "message.deferred": 1,
                                 "message.dead_lettered": 1})  # fmt: skip
        assert len({d["id"] for d in app.got}) == len(app.got)  # each event once
        assert app.unverified == 0 and ends.unverified == 0
        assert sorted(d["type"] for d in ends.got) == [
            "message.bounced", "message.delivered", "message.delivered"
        ]  # fmt: skip
        assert {d["data"]["id"] for d in app.got} == set(ids)
        eventually(  # counted once the answer is in (the receiver appends before it answers)
            lambda: daemon.metric("relay_webhook_deliveries_total", webhook="app",
                                  result="delivered") == len(app.got)
        )  # fmt: skip
    finally:
        for receiver in receivers.values():
            receiver.close()


def test_kill9_with_webhooks_in_flight_misses_nothing(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    receiver = Receiver("whsec_" + "A" * 43, delay=0.05)  # slow: a backlog at the kill
    try:
        hook = {"name": "app", "url": receiver.url, "secret_file": str(tmp_path / "app.secret"),
                "max_in_flight": 2}  # fmt: skip
        daemon = hooked(relay, tmp_path, [hook])
        receiver.secret = secret_of(tmp_path, "app")
        acked = kill9_under_load(daemon, at_least=60)
        in_flight = len(receiver.got)
        daemon.start()
        daemon.wait_event("ready")
        wanted = {e["event_id"] for e in journal(daemon)}
        assert in_flight < len(wanted), "the kill came after every event was sent: load longer"
        receiver.wait(lambda got: {d["id"] for d in got} >= wanted, 60)
        assert {d["data"]["id"] for d in receiver.got} >= set(acked)
        assert receiver.unverified == 0
        repeats = sum(receiver.tries.values()) - len(receiver.tries)
        assert repeats <= 4  # at most what was in flight at the kill (max_in_flight 2, twice)
    finally:
        receiver.close()


def test_a_receiver_down_then_up_gets_everything_in_order_and_410_disables(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    down = threading.Event()
    down.set()
    receiver = Receiver("whsec_" + "A" * 43, lambda _, __: 503 if down.is_set() else 204)
    gone = Receiver("whsec_" + "A" * 43, lambda _, __: 410)
    try:
        hooks = [
            {"name": "app", "url": receiver.url, "secret_file": str(tmp_path / "app.secret")},
            {"name": "old", "url": gone.url, "secret_file": str(tmp_path / "old.secret")},
        ]
        daemon = hooked(relay, tmp_path, hooks)
        receiver.secret, gone.secret = secret_of(tmp_path, "app"), secret_of(tmp_path, "old")
        ids = [daemon.send([f"user{n}@a.test"]) for n in range(5)]
        sink.wait_for(5)
        daemon.wait_event("webhook_failed", webhook="app", result="retry")
        time.sleep(1)
        assert receiver.got == []
        down.clear()  # up again: the retries (5 s) bring everything
        receiver.wait(lambda got: len(got) == 10, 30)
        for msg_id in ids:
            kinds = [d["type"] for d in receiver.got if d["data"]["id"] == msg_id]
            assert kinds == ["message.received", "message.delivered"]  # in order
        assert len({d["id"] for d in receiver.got}) == 10
        daemon.wait_event("webhook_failed", webhook="old", result="gone")
        time.sleep(0.5)  # what was in flight with the first 410 lands
        sent = sum(gone.tries.values())
        time.sleep(1.5)
        assert sum(gone.tries.values()) == sent <= 4  # disabled: max_in_flight, then nothing
        eventually(lambda: daemon.metric("relay_webhook_disabled", webhook="old") == 1)
        eventually(lambda: daemon.metric("relay_webhook_pending_events", webhook="old") == 10)
    finally:
        receiver.close()
        gone.close()
