"""Load for end-to-end tests, and what the tests that load a relay share: clients submitting
until told to stop, a kill -9 of the whole daemon under that load, the queue ids that reached
a sink, whether a process is alive, and a relay with an SMTP AUTH user."""

from __future__ import annotations

import os
import re
import smtplib
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from relay.spool.journal import files, read
from tests.support.daemon import Relay, RelayFactory
from tests.support.mx import MxSink

ID_IN_RECEIVED = re.compile(rb"with E?SMTP id ([0-9a-f]{20})")
CONCURRENCY = 8  # delivery.concurrency of the loaded relays
PASSWORD = "correct horse battery"


def load(daemon: Relay, acked: list[str], stop: threading.Event, clients: int, limit: int) -> None:
    """Submit until stopped or `limit` messages per client; record every acknowledged id.
    Client n's message i goes to c{n}m{i}@a.test (a sink may script that recipient)."""

    def client(n: int) -> None:
        for i in range(limit):
            if stop.is_set():
                return
            try:
                acked.append(daemon.send([f"c{n}m{i}@a.test"]))
            except (OSError, smtplib.SMTPException, AssertionError):
                return  # the relay died mid-session: not acknowledged, not our problem

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)


def kill9_under_load(daemon: Relay, at_least: int = 150) -> list[str]:
    """Load the relay from six clients and kill -9 its whole process group (supervisor and
    every worker at the same instant) once at_least messages were acknowledged; their ids."""
    acked: list[str] = []
    stop = threading.Event()
    loader = threading.Thread(target=load, args=(daemon, acked, stop, 6, 400))
    loader.start()
    deadline = time.monotonic() + 20
    while len(acked) < at_least and time.monotonic() < deadline:
        time.sleep(0.01)
    daemon.kill9()
    stop.set()
    loader.join(60)
    assert len(acked) >= at_least
    return acked


def delivered_ids(sink: MxSink) -> Counter[str]:
    """How many times the sink received each queue id (from the relay's Received field)."""
    ids: Counter[str] = Counter()
    for message in sink.received:
        match = ID_IN_RECEIVED.search(message.data)
        assert match, message.data[:200]
        ids[match.group(1).decode()] += 1
    return ids


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead, just not reaped yet
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def with_user(relay: RelayFactory, settings: dict[str, Any], tmp_path: Path) -> Relay:
    """A relay whose users file holds alice (sender domain sender.test), AUTH in clear on
    loopback; started after alice is added."""
    auth = {"users_file": str(tmp_path / "users"), "plaintext_on_loopback": True}
    daemon = relay({"smtp": {"auth": auth}, **settings}, start=False)
    proc = subprocess.run(
        [sys.executable, "-m", "relay", "user", "add", "alice", "--domains", "sender.test",
         "--password-stdin", "--config", str(daemon.config)],
        input=PASSWORD + "\n", capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    daemon.start()
    return daemon


def journal(daemon: Relay) -> list[dict[str, Any]]:
    """Every complete event in the spool's journal files, in the order of their ids (time)."""
    found = [e for path in files(daemon.spool / "events") for e in read(path, 0)[0]]
    return sorted(found, key=lambda e: str(e["event_id"]))
