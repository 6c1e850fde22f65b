"""Large messages end to end: many sessions in DATA at once cost the intake a bounded amount of
memory (the body is streamed into the spool as it arrives), every message arrives intact, and
a session cut in the middle of its DATA leaves no file and no open descriptor behind."""

from __future__ import annotations

import os
import random
import smtplib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.daemon import Relay, RelayFactory
from tests.support.mx import MxSink

pytestmark = pytest.mark.e2e
MIB = 1024 * 1024


def rss(pid: int) -> int:
    """Resident set size of pid, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@contextmanager
def peak_rss(pid: int) -> Iterator[list[int]]:
    """Sample pid's RSS every 20 ms while the block runs; [peak] afterwards."""
    peak = [rss(pid)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], rss(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join(5)


def message(index: int, size: int) -> bytes:
    """A message of about size bytes: lines of 76 random letters, so nothing compresses."""
    rng = random.Random(index)
    letters = bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(76))
    head = f"From: app@sender.test\r\nTo: user@a.test\r\nSubject: big {index}\r\n\r\n".encode()
    lines = [letters[i:] + letters[:i] + b"\r\n" for i in range(76)]
    body = b"".join(lines[n % 76] for n in range(size // 78))
    return head + body


def send_slowly(port: int, content: bytes, halfway: threading.Barrier) -> tuple[int, bytes]:
    """One session: the first half of DATA, wait for every other session to get there too,
    then the rest; the final reply."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=60) as client:
        client.ehlo()
        client.mail("app@sender.test")
        client.rcpt("user@a.test")
        code, _ = client.docmd("DATA")
        assert code == 354
        assert client.sock is not None
        middle = content.index(b"\r\n", len(content) // 2) + 2
        client.sock.sendall(content[:middle])
        halfway.wait(60)
        client.sock.sendall(content[middle:] + b".\r\n")
        return client.getreply()


def test_sessions_in_data_cost_bounded_memory_and_deliver_intact(
    relay: RelayFactory, sink: MxSink
) -> None:
    sessions, size = 30, 5 * MIB
    daemon = relay()
    daemon.send(["user@a.test"])  # warm up: every code path of a transaction loaded once
    sink.wait_for(1)
    intake = daemon.worker_pid("intake")
    before = rss(intake)
    contents = [message(i, size) for i in range(sessions)]
    halfway = threading.Barrier(sessions)
    replies: list[tuple[int, bytes]] = []

    def session(content: bytes) -> None:
        replies.append(send_slowly(daemon.port, content, halfway))

    threads = [threading.Thread(target=session, args=(c,)) for c in contents]
    with peak_rss(intake) as peak:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    assert [code for code, _ in replies] == [250] * sessions, replies
    # Held whole, 30 messages of 5 MiB took 150 MiB more; streamed, a session holds its header
    # block, up to 128 KiB of body and one 64 KiB read: well under 1 MiB each.
    grown = (peak[0] - before) / MIB
    assert grown < sessions, f"the intake grew by {grown:.0f} MiB for {sessions} sessions"
    got = sink.wait_for(1 + sessions, timeout=120)[1:]
    delivered = sorted(m.data.split(b"\r\n\r\n", 1)[1] for m in got)
    assert delivered == sorted(c.split(b"\r\n\r\n", 1)[1] for c in contents)
    subjects = sorted(m.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0] for m in got)
    assert subjects == sorted(b"big %d" % i for i in range(sessions))


def spool_descriptors(daemon: Relay, pid: int) -> list[str]:
    """What pid holds open inside the spool's tmp/ and msg/ (a spill file shows as deleted)."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith((str(daemon.spool / "tmp"), str(daemon.spool / "msg"))):
            found.append(target)
    return found


def test_a_session_cut_mid_data_leaves_nothing_behind(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay()
    intake = daemon.worker_pid("intake")
    content = message(0, 2 * MIB)
    client = smtplib.SMTP("127.0.0.1", daemon.port, local_hostname="client.test", timeout=30)
    client.ehlo()
    client.mail("app@sender.test")
    client.rcpt("user@a.test")
    assert client.docmd("DATA")[0] == 354
    assert client.sock is not None
    client.sock.sendall(content[: len(content) // 2])
    deadline = time.monotonic() + 10
    while not spool_descriptors(daemon, intake) and time.monotonic() < deadline:
        time.sleep(0.02)
    [spill] = spool_descriptors(daemon, intake)  # the body is on disk, not in memory
    assert spill.endswith("(deleted)") and os.listdir(daemon.spool / "tmp") == []
    client.close()  # the client goes away in the middle of its message
    deadline = time.monotonic() + 10
    while spool_descriptors(daemon, intake) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert spool_descriptors(daemon, intake) == []
    for where in ("tmp", "msg", "queue"):
        assert os.listdir(daemon.spool / where) == [], where
    daemon.send(["user@a.test"])  # and the next one goes through
    assert len(sink.wait_for(1)) == 1
