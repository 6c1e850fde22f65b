"""Lifecycle of the real daemon: SIGTERM drains within the grace period and loses nothing,
SIGHUP reloads, systemd's notify protocol and unit file."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from relay.spool.message import Message, Recipient
from relay.spool.store import Spool
from tests.support.daemon import Relay, RelayFactory, under_systemd
from tests.support.mx import HANG, MxSink
from tests.support.prometheus import apt_lock
from tests.support.smtp import RawClient

ROOT = Path(__file__).resolve().parents[2]


def banner(daemon: Relay) -> bytes:
    with RawClient(daemon.port, timeout=5) as client:
        return client.line()


def open_transaction(daemon: Relay) -> RawClient:
    """A client that has started a transaction (MAIL FROM) and is not done yet."""
    client = RawClient(daemon.port)
    client.reply()
    assert client.ask(b"EHLO slow.test\r\n", b"MAIL FROM:<app@sender.test>\r\n")[1].startswith(
        b"250 "
    )
    return client


def test_sigterm_drains_open_transactions_and_refuses_new_sessions(
    relay: RelayFactory, sink: MxSink
) -> None:
    daemon = relay({"lifecycle": {"grace": "20s"}})
    client = open_transaction(daemon)
    assert daemon.proc is not None
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.wait_event("stopping", process="intake")
    assert banner(daemon).startswith(b"421 4.3.2 ")  # new sessions: 421, not a hang
    with client:
        for line in (b"RCPT TO:<late@a.test>\r\n", b"DATA\r\n", b"Subject: x\r\n\r\nhi\r\n.\r\n"):
            [reply] = client.ask(line)
        assert reply.startswith(b"250 2.0.0 queued as ")  # the open transaction completes
        assert client.ask(b"MAIL FROM:<app@sender.test>\r\n")[0].startswith(b"421 4.3.2 ")
    assert daemon.wait_exit(15) == 0
    assert time.monotonic() - started < 15
    [stopped] = daemon.events("stopped", process="intake")
    assert stopped["sessions_cut"] == 0
    queue_id = reply.rsplit(b" ", 1)[1].decode()
    assert (
        queue_id in [m.data.decode().split(" id ")[1][:20] for m in sink.received]
        or (daemon.spool / "queue" / f"{queue_id}.json").exists()
    )


def test_grace_end_cuts_what_is_left_and_says_how_many(relay: RelayFactory, sink: MxSink) -> None:
    sink.script_data(HANG)
    daemon = relay({"lifecycle": {"grace": "2s"}, "delivery": {"data_timeout": "60s"}})
    queue_id = daemon.send(["user@a.test"])
    daemon.wait_event("attempt", id=queue_id)
    with open_transaction(daemon):
        started = time.monotonic()
        assert daemon.stop(timeout=20) == 0
    assert time.monotonic() - started < 8  # grace 2 s, not the 60 s data timeout
    [intake] = daemon.events("stopped", process="intake")
    [scheduler] = daemon.events("stopped", process="scheduler")
    assert (intake["sessions_cut"], scheduler["deliveries_cut"]) == (1, 1)
    # The cut delivery was not lost: it is still queued and goes out after a restart.
    sink.script_data("250 2.0.0 ok")
    daemon.start()
    sink.wait_for(1)


def test_second_sigterm_cuts_at_once(relay: RelayFactory, sink: MxSink) -> None:
    sink.script_data(HANG)
    daemon = relay({"lifecycle": {"grace": "60s"}, "delivery": {"data_timeout": "60s"}})
    daemon.send(["user@a.test"])
    daemon.wait_event("attempt")
    assert daemon.proc is not None
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.wait_event("stopping", process="scheduler")
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.wait_exit(15) == 0
    assert time.monotonic() - started < 10
    assert daemon.events("stopped", process="scheduler")[0]["deliveries_cut"] == 1


def test_sigterm_under_load_loses_nothing(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay({"lifecycle": {"grace": "10s"}})
    acked: list[str] = []
    stop = threading.Event()

    def client(n: int) -> None:
        for i in range(300):
            if stop.is_set():
                return
            try:
                acked.append(daemon.send([f"c{n}m{i}@a.test"]))
            except Exception:  # refused, or 421, once draining: not acknowledged
                return

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    while len(acked) < 50:
        time.sleep(0.01)
    started = time.monotonic()
    assert daemon.stop(timeout=30) == 0
    assert time.monotonic() - started < 12
    stop.set()
    for thread in threads:
        thread.join(30)
    queued = {p.name[:-5] for p in (daemon.spool / "queue").glob("*.json")}
    delivered = {m.data.decode().split(" id ")[1][:20] for m in sink.received}
    assert set(acked) <= delivered | queued, "an acknowledged message is neither sent nor queued"
    daemon.start()
    sink.wait_for(len(set(acked)), timeout=30)


def test_sighup_applies_a_changed_retry_schedule(relay: RelayFactory, sink: MxSink) -> None:
    sink.script_rcpt("slow@a.test", "451 4.2.0 later", "451 4.2.0 later", "250 2.1.5 ok")
    daemon = relay({"delivery": {"retry": {"schedule": ["1h"]}}})
    queue_id = daemon.send(["slow@a.test"])
    daemon.wait_event("retry_scheduled", id=queue_id)
    daemon.change_config(delivery__retry__schedule=["1s"], smtp__listen=["127.0.0.1:1"])
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    [reloaded] = daemon.wait_event("reloaded", process="supervisor")
    assert reloaded["restart_needed_for"] == ["smtp.listen"]
    # The deferred message now waits 1 s, not 1 h, and new mail retries every second too.
    sink.wait_for(1, timeout=15)
    daemon.wait_event("delivered", id=queue_id)  # the log lines, read after the sink has it
    assert len(daemon.events("attempt", id=queue_id)) == 3
    assert banner(daemon).startswith(b"220 ")  # still listening where it was


def test_sighup_with_a_broken_file_keeps_running(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay()
    daemon.config.write_text("delivery: {retry: {schedule: [soon]}}\n")
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    [failed] = daemon.wait_event("reload_failed", process="supervisor")
    assert "delivery.retry.schedule: [0] 'soon' is not a duration" in failed["error"]
    daemon.send(["user@a.test"])
    sink.wait_for(1)


def test_the_scheduler_yields_the_cpu_to_the_intake(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay()

    def nice(role: str) -> int:  # field 19 of /proc/PID/stat, counted after the ") "
        stat = Path(f"/proc/{daemon.worker_pid(role)}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[16])

    assert nice("scheduler") - nice("intake") == 5
    daemon.send(["user@a.test"])
    sink.wait_for(1)


def test_systemd_notify_protocol(relay: RelayFactory, sink: MxSink, tmp_path: Path) -> None:
    """The messages systemd's Type=notify and WatchdogSec rely on."""
    with under_systemd(tmp_path, relay) as (notify, daemon):
        received = [notify.recv(4096).decode() for _ in range(2)]
        assert received[0].startswith("READY=1")
        assert "WATCHDOG=1" in received[1]
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        messages = [notify.recv(4096).decode() for _ in range(4)]
        assert any(m.startswith("RELOADING=1\nMONOTONIC_USEC=") for m in messages)
        daemon.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while "STOPPING=1" not in messages and time.monotonic() < deadline:
            messages.append(notify.recv(4096).decode())
        assert "STOPPING=1" in messages
        assert daemon.wait_exit(15) == 0


def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:  # a machine without systemd: install its tools
        with apt_lock():  # not while another worker installs prometheus
            subprocess.run(["apt-get", "install", "-y", "-qq", "systemd"], check=True, timeout=600)
    unit = (ROOT / "systemd" / "relay.service").read_text()
    # Point it at this checkout so the executables it names exist.
    (tmp_path / "relay.service").write_text(unit.replace("/opt/relay", str(ROOT)))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "relay.service")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for directive in ("Type=notify", "WatchdogSec=", "ExecReload=", "User=relay",
                      "ProtectSystem=strict", "NoNewPrivileges=yes",
                      "AmbientCapabilities=CAP_NET_BIND_SERVICE", "ReadWritePaths=/var/spool/relay"):  # fmt: skip
        assert directive in unit


def test_start_over_a_large_queue_delivers_new_mail_and_indexes_everything(
    relay: RelayFactory, sink: MxSink
) -> None:
    """Start-up reads no state file before the workers run, and the scheduler indexes the
    queue in batches while it delivers; a live summary then counts the whole index."""
    daemon = relay(start=False)
    store = Spool(daemon.spool)
    store.prepare()
    now = time.time()
    for i in range(5000):
        msg_id = f"{int(now * 1000) - 100_000 + i:012x}{i:08x}"
        rcpt = Recipient(f"user{i}@d{i % 7}.test", status="deferred", attempts=1)
        msg = Message(msg_id, "app@a.test", [rcpt], now - 60, now + 3600, attempts=1)
        store.content_path(msg_id).write_bytes(b"Subject: old\r\n\r\nold\r\n")
        store.state_path(msg_id).write_text(json.dumps(msg.as_dict()))
    daemon.start()
    [recovered] = daemon.events("recovered")
    assert recovered["quarantined"] == 0
    daemon.send(["new@a.test"])
    sink.wait_for(1)
    [indexed] = daemon.wait_event("indexed", timeout=60)
    assert indexed["messages"] >= 5000
    rows = json.loads(daemon.cli("queue", "summary", "--json").stdout)["rows"]
    totals = {row["domain"]: row["total"] for row in rows}
    assert sum(totals[f"d{k}.test"] for k in range(7)) == 5000 <= totals["TOTAL"]
