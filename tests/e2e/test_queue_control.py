"""Postfix-parity queue control on a live daemon: hold and release, actions by recipient domain,
the qshape summary, attempt history, and actions racing a delivery in flight."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path

from tests.support.daemon import Relay, RelayFactory, eventually
from tests.support.dns import DnsServer
from tests.support.mx import HELD, MxNet, MxSink

HOUR = {"delivery": {"retry": {"schedule": ["1h"]}}}


def second_domain(dns_server: DnsServer, mx: MxNet) -> MxSink:
    """b.test's MX: a sink on 127.0.0.3."""
    sink = mx.sink("127.0.0.3")
    dns_server.mx("b.test", (10, "mx.b.test"))
    dns_server.a("mx.b.test", "127.0.0.3")
    return sink


def deferred(daemon: Relay, *sinks_and_rcpts: tuple[MxSink, str]) -> str:
    for sink, rcpt in sinks_and_rcpts:
        sink.script_rcpt(rcpt, "451 4.2.0 greylisted")
    queue_id = daemon.send([rcpt for _, rcpt in sinks_and_rcpts])
    daemon.wait_event("retry_scheduled", id=queue_id)
    return queue_id


def test_hold_and_release(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay(HOUR)
    queue_id = deferred(daemon, (sink, "user@a.test"))
    assert "held 1 message" in daemon.cli("queue", "hold", queue_id).stdout
    [entry] = daemon.cli_json("queue", "list")
    assert entry["held"] is True and entry["next_attempt"] is None
    assert f"{queue_id}!" in daemon.cli("queue", "list").stdout  # mailq's hold mark
    sink.script_rcpt("user@a.test", "250 2.1.5 ok")
    daemon.cli("queue", "flush", "ALL")  # flush leaves held mail held, as postqueue -f does
    time.sleep(0.5)
    assert len(daemon.events("attempt", id=queue_id)) == 1
    # The queue gauge is published at the scheduler's tick, once a second: wait for it.
    eventually(lambda: daemon.metric("relay_queue_messages", state="held") == 1)
    assert "released 1 message" in daemon.cli("queue", "release", queue_id).stdout
    sink.wait_for(1)
    daemon.wait_event("delivered", id=queue_id)


def test_hold_all_survives_a_restart(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay(HOUR)
    ids = {deferred(daemon, (sink, f"u{n}@a.test")) for n in range(2)}
    daemon.cli("queue", "hold", "ALL")
    assert daemon.stop() == 0
    for n in range(2):
        sink.script_rcpt(f"u{n}@a.test", "250 2.1.5 ok")
    daemon.start()
    time.sleep(1.0)
    assert sink.received == []  # held across the restart
    assert {e["id"] for e in daemon.cli_json("queue", "list") if e["held"]} == ids
    daemon.cli("queue", "release", "ALL")
    sink.wait_for(2)


def test_actions_by_recipient_domain(
    relay: RelayFactory, sink: MxSink, dns_server: DnsServer, mx: MxNet
) -> None:
    b_sink = second_domain(dns_server, mx)
    daemon = relay(HOUR)
    both = deferred(daemon, (sink, "one@a.test"), (b_sink, "two@b.test"))
    only_b = deferred(daemon, (b_sink, "three@b.test"))
    out = daemon.cli("queue", "delete", "--domain", "B.test").stdout
    assert "deleted 2 messages" in out
    [left] = daemon.cli_json("queue", "list")
    assert left["id"] == both  # only_b had nothing else: gone; both keeps its a.test recipient
    statuses = {r["address"]: r["status"] for r in left["recipients"]}
    assert statuses == {"one@a.test": "deferred", "two@b.test": "deleted"}
    assert not (daemon.spool / "msg" / only_b).exists()
    sink.script_rcpt("one@a.test", "250 2.1.5 ok")
    assert "flushed 1 message" in daemon.cli("queue", "flush", "--domain", "a.test").stdout
    [got] = sink.wait_for(1)
    assert got.rcpt_tos == ["one@a.test"]
    daemon.wait_event("delivered", id=both)
    time.sleep(0.3)
    assert b_sink.recipients() == []  # a deleted recipient is never attempted again


def test_summary_is_qshape(
    relay: RelayFactory, sink: MxSink, dns_server: DnsServer, mx: MxNet
) -> None:
    b_sink = second_domain(dns_server, mx)
    daemon = relay(HOUR)
    deferred(daemon, (sink, "one@a.test"), (b_sink, "two@b.test"))
    deferred(daemon, (b_sink, "three@b.test"))
    shape = daemon.cli("queue", "summary", "--json")
    rows = {r["domain"]: r for r in json.loads(shape.stdout)["rows"]}
    assert (rows["TOTAL"]["total"], rows["b.test"]["total"], rows["a.test"]["total"]) == (2, 2, 1)
    assert rows["b.test"]["buckets"]["5"] == 2
    text = daemon.cli("queue", "summary").stdout.splitlines()
    assert text[0].split()[:3] == ["T", "5", "10"]
    assert text[1].split()[:3] == ["TOTAL", "2", "2"] and text[2].split()[:2] == ["b.test", "2"]
    assert daemon.stop() == 0  # the same counts read from the files instead of the index
    offline = json.loads(daemon.cli("queue", "summary", "--json").stdout)
    assert offline["rows"] == json.loads(shape.stdout)["rows"] and offline["daemon"] is False


def test_show_has_the_full_attempt_history(relay: RelayFactory, sink: MxSink) -> None:
    sink.script_rcpt("user@a.test", "451 4.2.0 one", "452 4.2.2 two", "250 2.1.5 ok")
    daemon = relay({"delivery": {"retry": {"schedule": ["1h"]}}})
    queue_id = daemon.send(["user@a.test"])
    daemon.wait_event("retry_scheduled", id=queue_id)
    daemon.cli("queue", "flush", queue_id)
    daemon.wait_event("retry_scheduled", id=queue_id, count=2)
    shown = json.loads(daemon.cli("queue", "show", queue_id).stdout)
    history = shown["recipients"][0]["history"]
    assert [(h["reply"]["code"], h["outcome"]) for h in history] == [
        (451, "deferred"),
        (452, "deferred"),
    ]
    assert all(h["mx"] == "mx.a.test" and h["ip"] == "127.0.0.2" for h in history)
    assert all(h["at"].endswith("Z") and h["tls"] is False for h in history)


def control_clients(daemon: Relay) -> int:
    """Connections the scheduler has accepted on its control socket and still holds: a CLI
    action waiting for its answer."""
    fds = Path(f"/proc/{daemon.worker_pid('scheduler')}/fd")
    inodes = set()
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            inodes.add(os.readlink(fd).removeprefix("socket:[").removesuffix("]"))
    rows = [line.split() for line in Path("/proc/net/unix").read_text().splitlines()[1:]]
    # Num RefCount Protocol Flags Type St Inode Path; St 03: connected.
    return sum(
        1 for row in rows if len(row) == 8 and row[5] == "03" and row[6] in inodes
        and row[7].endswith("/control.sock")
    )  # fmt: skip


def delete_during_attempt(daemon: Relay, sink: MxSink, msg_id: str) -> str:
    """`relay queue delete msg_id` while sink holds its reply to the attempt in flight; the reply
    goes once the scheduler has the request (the CLI's start-up alone can take seconds on a
    busy machine). What the CLI printed."""
    before = control_clients(daemon)
    done: list[subprocess.CompletedProcess[str]] = []
    worker = threading.Thread(
        target=lambda: done.append(daemon.cli("queue", "delete", msg_id, check=False))
    )
    worker.start()
    try:
        eventually(lambda: control_clients(daemon) > before, timeout=30)
        time.sleep(0.5)  # for the scheduler to read the request it has accepted
    finally:
        sink.release()
        worker.join(30)
    [proc] = done
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_delete_racing_a_delivery_is_one_or_the_other(relay: RelayFactory, sink: MxSink) -> None:
    """A delete that arrives mid-attempt waits for it: the message is delivered (and the delete
    says there was nothing left) or deleted (and never delivered) — never both."""
    sink.script_data(HELD + "250 2.0.0 ok")
    daemon = relay()
    delivered_id = daemon.send(["first@a.test"])
    daemon.wait_event("attempt", id=delivered_id)
    out = delete_during_attempt(daemon, sink, delivered_id)
    assert "deleted 0 messages" in out and "finished during its delivery attempt" in out
    sink.wait_for(1)

    sink.script_data(HELD + "451 4.3.0 later")
    kept_id = daemon.send(["second@a.test"])
    daemon.wait_event("attempt", id=kept_id)
    assert "deleted 1 message" in delete_during_attempt(daemon, sink, kept_id)
    time.sleep(1.5)  # the 1 s retry would have happened by now
    assert len(daemon.events("attempt", id=kept_id)) == 1
    assert [m.rcpt_tos for m in sink.received] == [["first@a.test"]]
    assert daemon.cli_json("queue", "list") == []
