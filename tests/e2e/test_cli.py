"""The queue and dead-letter CLI against a running daemon and a stopped one, and its one-line
errors."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.daemon import Relay, RelayFactory, eventually
from tests.support.mx import MxSink

HOUR = {"delivery": {"retry": {"schedule": ["1h"]}}}


def deferred(daemon: Relay, sink: MxSink, rcpt: str = "user@a.test") -> str:
    sink.script_rcpt(rcpt, "451 4.2.0 greylisted")
    queue_id = daemon.send([rcpt])
    daemon.wait_event("deferred", id=queue_id)
    return queue_id


def test_list_and_show_a_deferred_message(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay(HOUR)
    queue_id = deferred(daemon, sink)
    [entry] = daemon.cli_json("queue", "list")
    assert entry["id"] == queue_id and entry["sender"] == "app@sender.test"
    assert entry["attempts"] == 1 and entry["queued_at"].endswith("Z")
    assert entry["next_attempt"] > entry["queued_at"]
    [rcpt] = entry["recipients"]
    assert rcpt["address"] == "user@a.test" and rcpt["status"] == "deferred"
    assert rcpt["reply"] == {"code": 451, "enhanced": "4.2.0", "text": "greylisted"}
    human = daemon.cli("queue", "list").stdout
    assert queue_id in human and "(deferred: 451 4.2.0 greylisted)" in human
    assert "1 Requests." in human
    shown = daemon.cli("queue", "show", queue_id).stdout
    assert '"Subject: test"' in shown and "Received: from client.test" in shown


def test_flush_and_delete_on_a_live_daemon(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay(HOUR)
    first = deferred(daemon, sink, "one@a.test")
    second = deferred(daemon, sink, "two@a.test")
    out = daemon.cli("queue", "flush", first).stdout
    assert "flushed 1 message" in out
    daemon.wait_event("attempt", id=first, count=2, timeout=5)
    assert len(daemon.events("attempt", id=second)) == 1  # only the one flushed
    daemon.wait_event("deferred", id=first, count=2)
    assert "deleted 1 message" in daemon.cli("queue", "delete", first).stdout
    assert [e["id"] for e in daemon.cli_json("queue", "list")] == [second]
    assert not (daemon.spool / "msg" / first).exists()
    daemon.cli("queue", "flush")  # no id: everything
    daemon.wait_event("attempt", id=second, count=2, timeout=5)
    time.sleep(0.3)
    assert len(daemon.events("attempt", id=first)) == 2  # deleted: never attempted again
    sink.script_rcpt("two@a.test", "250 2.1.5 ok")
    daemon.cli("queue", "flush", "ALL")
    sink.wait_for(1)
    assert sink.recipients() == ["two@a.test"]


def test_delete_all_live(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay(HOUR)
    for n in range(3):
        deferred(daemon, sink, f"u{n}@a.test")
    assert "deleted 3 messages" in daemon.cli("queue", "delete", "ALL").stdout
    assert daemon.cli_json("queue", "list") == []
    assert list((daemon.spool / "msg").iterdir()) == []


def test_dead_letters_requeue_and_delete(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay()
    sink.script_rcpt("a@a.test", "550 5.1.1 unknown")
    sink.script_rcpt("b@a.test", "550 5.1.1 unknown")
    first = daemon.send(["a@a.test"])
    second = daemon.send(["b@a.test"])
    daemon.wait_event("dead_lettered", count=2)
    assert {e["id"] for e in daemon.cli_json("dlq", "list")} == {first, second}
    sink.script_rcpt("a@a.test", "250 2.1.5 ok")  # the operator fixed the mailbox
    # and lifts the suppression its hard bounce made (else the requeued copy is dropped)
    eventually(lambda: "a@a.test" in daemon.cli("suppress", "list").stdout)
    daemon.cli("suppress", "delete", "a@a.test")
    requeued = daemon.cli("dlq", "requeue", first)
    assert "requeued 1 message" in requeued.stdout and requeued.stderr == ""
    sink.wait_for(1)
    assert sink.recipients() == ["a@a.test"]
    assert [e["id"] for e in daemon.cli_json("dlq", "list")] == [second]
    assert "deleted 1 message" in daemon.cli("dlq", "delete", "ALL").stdout
    assert daemon.cli_json("dlq", "list") == []
    assert list((daemon.spool / "msg").iterdir()) == []


def test_commands_on_a_stopped_daemon(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay(HOUR)
    keep = deferred(daemon, sink, "keep@a.test")
    drop = deferred(daemon, sink, "drop@a.test")
    assert daemon.stop() == 0
    assert {e["id"] for e in daemon.cli_json("queue", "list")} == {keep, drop}
    assert "deleted 1 message" in daemon.cli("queue", "delete", drop).stdout
    assert "flushed 1 message" in daemon.cli("queue", "flush", keep).stdout
    sink.script_rcpt("keep@a.test", "250 2.1.5 ok")
    daemon.start()
    sink.wait_for(1)  # flushed while stopped: due at once on start, not in an hour
    assert sink.recipients() == ["keep@a.test"]


@pytest.mark.parametrize(
    ("args", "status", "fragment"),
    [
        (["queue", "show", "nothex"], 2, "'nothex' is not a queue id (20 hex digits)"),
        (["queue", "delete", "xyz"], 2, "'xyz' is not a queue id (20 hex digits or ALL)"),
        (["queue", "delete", "0123456789abcdef0123"], 1, "no such message: 0123456789abcdef0123"),
        (["dlq", "requeue", "0123456789abcdef0123"], 1, "no such message"),
        (["queue", "show", "0123456789abcdef0123"], 1, "0123456789abcdef0123: not in queue"),
        (["queue", "explode"], 2, "invalid choice: 'explode'"),
        (["queue", "delete"], 2, "queue delete: give ID, ALL or --domain"),
        (["queue", "hold", "--domain", ""], 2, "--domain: empty domain"),
        (["queue", "summary", "--top", "-1"], 2, "--top: must be 0 or more"),
        (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_cli_input_is_one_line(
    relay: RelayFactory, sink: MxSink, args: list[str], status: int, fragment: str
) -> None:
    daemon = relay(start=False)
    daemon.spool.mkdir()
    for sub in ("queue", "dead", "msg", "tmp", "corrupt", "run"):
        (daemon.spool / sub).mkdir()
    proc = daemon.cli(*args, check=False)
    assert proc.returncode == status, proc.stderr
    assert proc.stderr.count("\n") == 1 and fragment in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_without_a_spool_says_so(tmp_path: Path) -> None:
    config = tmp_path / "relay.yaml"
    config.write_text(f"spool: {{path: {tmp_path / 'nowhere'}}}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "relay", "queue", "list", "--config", str(config)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert (
        proc.stderr
        == f"relay: spool {tmp_path / 'nowhere'} does not exist (has the relay run with this config?)\n"
    )
