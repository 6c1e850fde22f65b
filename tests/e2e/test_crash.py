"""Crash safety through the real daemon: kill -9 under load, a dying worker, corrupt and
half-written spool files found at start-up."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from tests.support.daemon import RelayFactory
from tests.support.dns import DnsServer
from tests.support.load import CONCURRENCY, delivered_ids, kill9_under_load, pid_alive
from tests.support.mx import MxNet, MxSink


def test_kill9_under_load_loses_nothing_acknowledged(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay({"delivery": {"concurrency": CONCURRENCY}})
    acked = kill9_under_load(daemon)
    before = len(sink.received)
    daemon.start()
    daemon.wait_event("recovered")
    expected = set(acked)
    deadline = time.monotonic() + 60
    while not expected <= set(delivered_ids(sink)) and time.monotonic() < deadline:
        time.sleep(0.1)
    got = delivered_ids(sink)
    assert expected <= set(got), f"lost {len(expected - set(got))} acknowledged messages"
    duplicates = sum(n - 1 for n in got.values())
    # A restart may repeat only the transactions in flight at the kill.
    assert duplicates <= CONCURRENCY, (duplicates, before)
    daemon.wait_event("ready", process="supervisor")
    deadline = time.monotonic() + 10
    while daemon.cli_json("queue", "list") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert daemon.cli_json("queue", "list") == []
    assert os.listdir(daemon.spool / "corrupt") == []
    assert os.listdir(daemon.spool / "msg") == []


def test_killed_worker_is_restarted_and_mail_flows(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay()
    for role in ("scheduler", "intake"):
        old = daemon.worker_pid(role)
        os.kill(old, signal.SIGKILL)
        daemon.wait_event("child_exited", role=role)
        daemon.wait_event("started", role=role, count=2)
        assert daemon.worker_pid(role) != old
        daemon.wait_event("ready", process=role, count=2)
    daemon.send(["after@a.test"])
    sink.wait_for(1)


def test_corrupt_state_is_quarantined_and_the_rest_delivered(
    relay: RelayFactory, dns_server: DnsServer, mx: MxNet
) -> None:
    sink = mx.sink("127.0.0.2")
    sink.stop()  # nothing can be delivered while we prepare the spool
    dns_server.mx("a.test", (10, "mx.a.test"))
    dns_server.a("mx.a.test", "127.0.0.2")
    daemon = relay({"delivery": {"retry": {"schedule": ["1h"]}}})
    good = daemon.send(["good@a.test"])
    bad = daemon.send(["bad@a.test"])
    daemon.wait_event("deferred", count=2)
    assert daemon.stop() == 0
    (daemon.spool / "queue" / f"{bad}.json").write_text('{"version": 1, "id": ')  # torn
    (daemon.spool / "tmp" / "leftover.abcd").write_bytes(b"half a message")
    (daemon.spool / "msg" / "0123456789abcdef0123").write_bytes(b"never acknowledged")
    sink.start()
    daemon.start()
    [quarantined] = daemon.wait_event("quarantined", id=bad)
    assert "queue" in quarantined["where"] and quarantined["reason"]
    [recovered] = daemon.events("recovered")[-1:]
    assert (recovered["temp_removed"], recovered["orphans_removed"]) == (1, 1)
    assert sorted(os.listdir(daemon.spool / "corrupt")) == [f"queue.{bad}", f"queue.{bad}.json"]
    daemon.cli("queue", "flush", "ALL")
    sink.wait_for(1)
    assert [m.rcpt_tos for m in sink.received] == [["good@a.test"]]
    daemon.wait_event("delivered", id=good)
    assert daemon.cli_json("queue", "list") == []


@pytest.mark.parametrize("lines", [1, 20_000], ids=["small", "spilled"])
def test_intake_write_failure_is_a_4xx_and_leaves_nothing(
    relay: RelayFactory, sink: MxSink, lines: int
) -> None:
    daemon = relay()
    tmp = daemon.spool / "tmp"
    tmp.rmdir()
    tmp.write_bytes(b"")  # tmp/ is now a file: every spool write fails (as on a full disk)
    with daemon.smtp() as client:
        client.mail("app@sender.test")
        client.rcpt("user@a.test")
        code, text = client.data(b"Subject: x\r\n\r\n" + b"body line\r\n" * lines)
    assert (code, text[:5]) == (451, b"4.3.0")
    assert os.listdir(daemon.spool / "queue") == []
    assert os.listdir(daemon.spool / "msg") == []
    [error] = daemon.wait_event("error", stage="intake")
    assert "tmp" in json.dumps(error)
    tmp.unlink()
    tmp.mkdir()
    daemon.send(["user@a.test"])  # and it recovers by itself once the disk is fine


def test_kill9_of_the_supervisor_alone_takes_the_workers_down(
    relay: RelayFactory, sink: MxSink
) -> None:
    daemon = relay()
    workers = [daemon.worker_pid(role) for role in ("intake", "scheduler")]
    assert daemon.proc is not None
    os.kill(daemon.proc.pid, signal.SIGKILL)  # only the supervisor
    daemon.proc.wait(10)
    deadline = time.monotonic() + 10
    while any(pid_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pid_alive(pid) for pid in workers), "a worker outlived its supervisor"
    daemon.start()  # the port and the spool are free again
    daemon.send(["after@a.test"])
    sink.wait_for(1)


def test_port_in_use_fails_start_with_one_error(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay(start=False)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", daemon.port))
        squatter.listen()
        with pytest.raises(AssertionError):
            daemon.start(timeout=15)
        assert daemon.proc is not None and daemon.proc.wait(20) == 1
    [error] = daemon.events("error", stage="intake")
    assert "address already in use" in error["error"].lower() and error["action"] == "listen"
    assert str(daemon.port) in error["error"]
