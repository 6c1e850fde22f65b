"""The disk reserve through the real daemon: below spool.min_free new mail gets 452 4.3.1 and
/readyz 503 while queued mail is still delivered; back above it, mail is taken again without a
restart. The reserve is moved with SIGHUP, never the disk: the file system's whole size is a
reserve no free space can meet, and 1 MiB one that any usable disk does."""

from __future__ import annotations

import functools
import os
import signal
import time
from pathlib import Path

from tests.support.daemon import Relay, RelayFactory, eventually, under_systemd
from tests.support.mx import MxSink

NO_STORAGE = (452, b"4.3.1 Insufficient system storage")


def whole_disk(daemon: Relay) -> int:
    """The size of the spool's file system: more than it can ever have free."""
    st = os.statvfs(daemon.spool)
    return st.f_blocks * st.f_frsize


def reload(daemon: Relay, min_free: int) -> None:
    """Set spool.min_free and SIGHUP; return once the supervisor and the intake applied it."""
    mark = len(daemon.lines)
    daemon.change_config(spool__min_free=min_free)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_event("reloaded", since=mark, process="supervisor")
    daemon.wait_event("reloaded", since=mark, process="intake")


def test_below_the_reserve_new_mail_waits_and_queued_mail_leaves(
    relay: RelayFactory, sink: MxSink
) -> None:
    sink.script_rcpt("queued@a.test", "451 4.2.0 greylisted", "250 2.1.5 ok")
    daemon = relay({"delivery": {"retry": {"schedule": ["1h"]}}})
    queued = daemon.send(["queued@a.test"])
    daemon.wait_event("retry_scheduled", id=queued)

    reserve = whole_disk(daemon)
    reload(daemon, reserve)
    with daemon.smtp() as client:
        assert client.mail("app@sender.test") == NO_STORAGE
        assert client.mail("app@sender.test") == NO_STORAGE  # every new transaction
    rejected = daemon.wait_event("rejected", reason="disk_reserve", count=2)  # logged meanwhile
    assert len(rejected) == 2 and rejected[0]["detail"].startswith("spool: below min_free: ")
    status, body = daemon.get("/readyz")
    assert status == 503
    assert body.startswith("spool: below min_free: ") and f"reserve {reserve}\n" in body
    assert daemon.metric("relay_messages_rejected_total", reason="disk_reserve") == 2.0
    assert daemon.metric("relay_spool_reserve_bytes") == reserve
    assert daemon.metric("relay_spool_free_bytes") < reserve

    # Below the reserve the operator's commands and delivery go on.
    assert "flushed 1 message" in daemon.cli("queue", "flush", queued).stdout
    sink.wait_for(1)
    daemon.wait_event("delivered", id=queued)
    assert daemon.get("/readyz")[0] == 503

    reload(daemon, 1 << 20)
    fresh = daemon.send(["fresh@a.test"])
    sink.wait_for(2)
    daemon.wait_event("delivered", id=fresh)
    eventually(lambda: daemon.get("/readyz") == (200, "ready\n"))
    assert daemon.metric("relay_spool_reserve_bytes") == 1 << 20
    assert len(daemon.events("started")) == 3  # the same three workers throughout


def test_a_declared_size_that_does_not_fit_above_the_reserve(
    relay: RelayFactory, sink: MxSink
) -> None:
    daemon = relay({"smtp": {"max_message_size": 1 << 60}})  # no 552 for SIZE before ours
    too_big = whole_disk(daemon)
    with daemon.smtp() as client:
        assert client.mail("app@sender.test", [f"SIZE={too_big}"]) == NO_STORAGE
        assert client.mail("app@sender.test", ["SIZE=1000"])[0] == 250
        assert client.rcpt("user@a.test")[0] == 250
        assert client.data(b"Subject: fits\r\n\r\nhello\r\n")[0] == 250
    sink.wait_for(1)
    [rejected] = daemon.wait_event("rejected", reason="disk_reserve")
    assert rejected["detail"].startswith(f"spool: SIZE={too_big} is more than the ")


def test_no_reserve_refuses_nothing(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay({"smtp": {"max_message_size": 1 << 60}, "spool": {"min_free": 0}})
    with daemon.smtp() as client:
        assert client.mail("app@sender.test", [f"SIZE={whole_disk(daemon)}"])[0] == 250
    assert daemon.get("/readyz") == (200, "ready\n")
    assert daemon.metric("relay_spool_reserve_bytes") == 0.0
    assert daemon.metric("relay_spool_reserve_inodes") == 0.0


def test_below_the_reserve_systemd_keeps_it_running(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    """Not ready is not dead: the watchdog is still fed, so systemd does not restart a relay
    that is delivering its queue."""
    start = functools.partial(relay, {"spool": {"min_free": 1 << 62}})
    with under_systemd(tmp_path, start) as (notify, daemon):
        assert daemon.get("/readyz")[0] == 503
        started = time.monotonic()
        pings = 0
        while pings < 3 and time.monotonic() - started < 10:
            pings += notify.recv(4096).decode() == "WATCHDOG=1"
        assert pings == 3
