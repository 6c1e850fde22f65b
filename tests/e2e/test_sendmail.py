"""`relay-sendmail` as the programs that run sendmail(8) use it: PHP's mail(), git send-email, a
cron job's pipe while the daemon is down, a thousand drops waiting for it; what the pickup does
with a file it cannot take; the one-line errors and sysexits codes."""

from __future__ import annotations

import collections
import json
import os
import pwd
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Relay, RelayFactory
from tests.support.mx import MxSink, Received

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
SENDMAIL = BIN / "relay-sendmail"
USER = pwd.getpwuid(os.getuid()).pw_name  # who runs relay-sendmail: the default sender's name
DOMAIN = "relay.test"  # smtp.hostname of the test daemon: sendmail.default_domain's default
MAILDROP_MODE = 0o3733  # as the README's install step makes it: anyone may add, nobody list
QUEUED_AS = re.compile(rb"\(relay\) with local id ([0-9a-f]{20})")  # the intake's Received
PICKUP = 15.0  # seconds from a file in the maildrop to the sink: a 0.5 s poll, then delivery
BULK = 1000
SINGLE = 40  # of them dropped by a relay-sendmail process each
SESSIONS = 4  # the rest by this many `relay-sendmail -bs` sessions


def with_maildrop(relay: RelayFactory, tmp_path: Path, start: bool = True) -> Relay:
    """A daemon whose maildrop is tmp_path/maildrop, made as the install steps make it."""
    maildrop = tmp_path / "maildrop"
    maildrop.mkdir()
    maildrop.chmod(MAILDROP_MODE)
    return relay({"sendmail": {"maildrop": str(maildrop)}}, start=start)


def maildrop_of(daemon: Relay) -> Path:
    return daemon.root.parent / "maildrop"


def waiting(daemon: Relay) -> list[str]:
    """The files in the maildrop the daemon has still to pick up."""
    return sorted(p.name for p in maildrop_of(daemon).iterdir() if p.is_file())


def environment(daemon: Relay) -> dict[str, str]:
    """A user's environment: relay-sendmail on PATH, the daemon's config in RELAY_CONFIG."""
    assert SENDMAIL.exists(), f"{SENDMAIL} is missing: reinstall the package (pip install -e .)"
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
    return {**os.environ, "PATH": path, "RELAY_CONFIG": str(daemon.config)}


def sendmail(
    daemon: Relay, *args: str, stdin: bytes, timeout: float = 30
) -> subprocess.CompletedProcess[bytes]:
    """Run relay-sendmail ARGS with the message on standard input."""
    return subprocess.run(
        [str(SENDMAIL), *args], input=stdin, capture_output=True, env=environment(daemon),
        timeout=timeout, check=False,
    )  # fmt: skip


def delivered(daemon: Relay, sink: MxSink, count: int, timeout: float = PICKUP) -> list[Received]:
    """The sink's messages once it has count of them; the daemon's last lines if it never does."""
    try:
        return sink.wait_for(count, timeout)
    except AssertionError as exc:
        raise AssertionError(f"{str(exc)[:2000]}; {daemon.tail(25)}") from None


def header(message: Received) -> list[bytes]:
    """The message's header lines as the sink received them."""
    head, _, _ = message.data.partition(b"\r\n\r\n")
    return head.split(b"\r\n")


def field_names(message: Received) -> set[str]:
    return {line.split(b":", 1)[0].decode().lower() for line in header(message) if b":" in line}


def subject(message: Received) -> str:
    [line] = [line for line in header(message) if line.lower().startswith(b"subject:")]
    return line.split(b":", 1)[1].decode().strip()


def test_php_mail_with_to_cc_and_bcc(
    relay: RelayFactory, sink: MxSink, tmp_path: Path, php: Path
) -> None:
    daemon = with_maildrop(relay, tmp_path)
    code = (
        '$ok = mail("to@a.test", "From PHP", "Hello from PHP.\\nA second line.\\n",'
        ' "From: App <app@sender.test>\\r\\nCc: cc@a.test\\r\\nBcc: hidden@a.test");'
        " exit($ok ? 0 : 3);"
    )
    path = f"{SENDMAIL} -t -i --config {daemon.config}"
    proc = subprocess.run(
        [str(php), "-d", f"sendmail_path={path}", "-r", code],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    [message] = delivered(daemon, sink, 1)
    assert sorted(message.rcpt_tos) == ["cc@a.test", "hidden@a.test", "to@a.test"]
    assert message.mail_from == f"{USER}@{DOMAIN}"
    names = field_names(message)
    assert "bcc" not in names and b"hidden@a.test" not in message.data
    assert {"to", "cc", "from", "subject", "date", "message-id"} <= names
    assert subject(message) == "From PHP"
    assert b"\r\n\r\nHello from PHP.\r\nA second line.\r\n" in message.data
    [taken] = daemon.wait_event("picked_up")
    assert taken["user"] == USER and taken["uid"] == os.getuid()
    assert waiting(daemon) == []


def test_git_send_email_sends_a_patch(
    relay: RelayFactory, sink: MxSink, tmp_path: Path, git_send_email: Path
) -> None:
    daemon = with_maildrop(relay, tmp_path)
    repo = tmp_path / "repo"
    env = {**environment(daemon), "HOME": str(tmp_path), "GIT_CONFIG_NOSYSTEM": "1"}

    def git(*args: str) -> str:
        proc = subprocess.run(
            [str(git_send_email), *args], cwd=repo, env=env, stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        return proc.stdout

    repo.mkdir()
    git("init", "-q")
    git("config", "user.name", "Dev")
    git("config", "user.email", "dev@sender.test")
    (repo / "greeting.txt").write_text("hello, relay\n")
    git("add", "greeting.txt")
    git("commit", "-q", "-m", "Add a greeting")
    [patch] = git("format-patch", "-1", "-o", str(tmp_path / "patches")).split()
    git(
        "-c", f"sendemail.sendmailcmd={SENDMAIL}", "send-email", "--to=dev@a.test",
        "--from=Dev <dev@sender.test>", "--confirm=never", "--suppress-cc=all", patch,
    )  # fmt: skip
    [message] = delivered(daemon, sink, 1)
    assert message.rcpt_tos == ["dev@a.test"]
    assert subject(message) == "[PATCH] Add a greeting"
    assert b"\r\n+hello, relay\r\n" in message.data
    assert b"From: Dev <dev@sender.test>" in header(message)


def test_cron_pipe_while_the_daemon_is_down(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    daemon = with_maildrop(relay, tmp_path, start=False)
    proc = subprocess.run(
        ["sh", "-c", "echo body | relay-sendmail -f root user@a.test"],
        capture_output=True, text=True, env=environment(daemon), timeout=30, check=False,
    )  # fmt: skip
    assert (proc.returncode, proc.stderr) == (0, "")
    assert len(waiting(daemon)) == 1
    assert sink.received == []
    daemon.start()
    [message] = delivered(daemon, sink, 1)
    assert message.rcpt_tos == ["user@a.test"]
    assert message.mail_from == f"root@{DOMAIN}"  # a bare name qualified, as sendmail does
    assert message.data.endswith(b"\r\n\r\nbody\r\n")
    assert {"from", "date", "message-id"} <= field_names(message)
    [taken] = daemon.wait_event("picked_up")
    assert taken["user"] == USER
    assert waiting(daemon) == []


def with_recipients(dropped: Path, rcpts: list[str]) -> bytes:
    """A file like dropped (relay-sendmail's own) whose envelope lists rcpts instead."""
    line, _, data = dropped.read_bytes().partition(b"\n")
    envelope: dict[str, Any] = json.loads(line)
    changed = [key for key, value in envelope.items() if value == ["good@a.test"]]
    assert changed, f"no recipient list in the envelope line {envelope}"
    return json.dumps({**envelope, **{key: rcpts for key in changed}}).encode() + b"\n" + data


def place(maildrop: Path, name: str, content: bytes) -> None:
    """Write a file into the maildrop as a writer should: whole, then renamed into view."""
    temporary = maildrop / f".{name}.tmp"
    temporary.write_bytes(content)
    temporary.rename(maildrop / name)


def test_malformed_files_are_rejected_and_the_good_one_delivered(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    daemon = with_maildrop(relay, tmp_path, start=False)
    maildrop = maildrop_of(daemon)
    good = sendmail(daemon, "good@a.test", stdin=b"Subject: good\n\nkeep me\n")
    assert good.returncode == 0, good.stderr
    [good_name] = waiting(daemon)
    place(maildrop, "0-garbage", b"\x00\xffnot an envelope\nSubject: x\r\n\r\nx\r\n")
    place(maildrop, "0-no-recipients", with_recipients(maildrop / good_name, []))
    many = [f"u{n}@a.test" for n in range(101)]  # over smtp.max_recipients: not retried forever
    place(maildrop, "0-too-many", with_recipients(maildrop / good_name, many))
    daemon.start()
    [message] = delivered(daemon, sink, 1)
    assert message.rcpt_tos == ["good@a.test"] and subject(message) == "good"
    rejected = daemon.wait_event("maildrop_rejected", count=3, timeout=PICKUP)
    reasons = {Path(e["file"]).name: e["reason"] for e in rejected}
    assert sorted(reasons) == ["0-garbage", "0-no-recipients", "0-too-many"] and all(
        reasons.values()
    )
    assert reasons["0-too-many"] == "101 recipients, more than smtp.max_recipients (100)"
    assert sorted(p.name for p in (maildrop / "rejected").iterdir()) == [
        "0-garbage", "0-no-recipients", "0-too-many",
    ]  # fmt: skip
    # While it runs, the daemon watches the maildrop: a bad file dropped now goes the same way.
    place(maildrop, "1-garbage", b"garbage without a line end")
    [late] = daemon.wait_event("maildrop_rejected", count=4, timeout=PICKUP)[3:]
    assert Path(late["file"]).name == "1-garbage"
    assert (maildrop / "rejected" / "1-garbage").read_bytes() == b"garbage without a line end"
    assert waiting(daemon) == []
    assert len(sink.received) == 1


def numbered(n: int) -> bytes:
    """Message n of the thousand, as a script writes it (LF line ends)."""
    return f"Subject: drop {n:04d}\n\nmessage {n}\n".encode()


def session(numbers: range) -> bytes:
    """A whole `sendmail -bs` session dropping these messages, QUIT at the end."""
    out = [b"EHLO cron.test\r\n"]
    for n in numbers:
        text = numbered(n).replace(b"\n", b"\r\n")
        out.append(
            f"MAIL FROM:<cron@sender.test>\r\nRCPT TO:<bulk{n % 10}@a.test>\r\nDATA\r\n".encode()
        )
        out.append(text + b".\r\n")
    return b"".join([*out, b"QUIT\r\n"])


@pytest.mark.timeout(300)
def test_a_thousand_drops_while_down_are_delivered_once(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    """Dropped by 40 processes (one a message, as cron jobs run it) and 4 `-bs`
    sessions of the rest, all at once: the maildrop takes concurrent writers. (A thousand
    processes would cost a CPU second each to start: minutes of the suite.)"""
    daemon = with_maildrop(relay, tmp_path, start=False)

    def drop(numbers: range) -> tuple[int, bytes]:
        if len(numbers) == 1:
            proc = sendmail(
                daemon, "-i", f"bulk{numbers[0] % 10}@a.test", stdin=numbered(numbers[0])
            )
            return proc.returncode, proc.stderr
        proc = sendmail(daemon, "-bs", stdin=session(numbers), timeout=120)
        queued = proc.stdout.count(b"\r\n250 2.0.0 Ok: queued as maildrop/")
        return proc.returncode, proc.stderr if queued == len(numbers) else proc.stdout[-500:]

    per_session = (BULK - SINGLE) // SESSIONS
    work = [range(n, n + per_session) for n in range(SINGLE, BULK, per_session)]
    work += [range(n, n + 1) for n in range(SINGLE)]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=SESSIONS + 2) as pool:  # 2 for the single ones
        results = list(pool.map(drop, work))
    dropped = time.monotonic() - started
    assert [r for r in results if r != (0, b"")] == []
    assert len(waiting(daemon)) == BULK
    daemon.start()
    started = time.monotonic()
    delivered(daemon, sink, BULK, timeout=180)
    took = time.monotonic() - started
    time.sleep(2)  # a second copy of any of them would come now
    counts = collections.Counter(subject(m) for m in sink.received)
    assert counts == {f"drop {n:04d}": 1 for n in range(BULK)}
    assert len(daemon.events("picked_up")) == BULK
    assert waiting(daemon) == []
    print(f"{BULK} drops in {dropped:.1f}s; delivered {took:.1f}s after the start")


def test_kill_9_during_the_pickup_loses_nothing_and_repeats_nothing(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    """Killed (the whole process group) while the pickup takes 300 files: after the restart
    each message was queued once (a file taken again is answered by its idempotency key with
    the same queue id). A delivery in flight at the kill may reach the sink twice, as with any
    MTA: the same queue id both times."""
    daemon = with_maildrop(relay, tmp_path, start=False)
    total = 300
    proc = sendmail(daemon, "-bs", stdin=session(range(total)), timeout=120)
    assert proc.returncode == 0 and len(waiting(daemon)) == total, proc.stdout[-300:]
    daemon.start()
    deadline = time.monotonic() + 30
    while len(daemon.events("picked_up")) < 50 and time.monotonic() < deadline:
        time.sleep(0.01)
    daemon.kill9()
    left = len(waiting(daemon))
    assert 0 < left < total, f"the kill came at {left} files waiting: no pickup under way"
    daemon.start()
    delivered(daemon, sink, total, timeout=120)
    time.sleep(2)  # a message queued twice would be delivered by now
    queued: dict[str, set[str]] = collections.defaultdict(set)
    for message in sink.received:
        match = QUEUED_AS.search(message.data)
        assert match, message.data[:300]
        queued[subject(message)].add(match.group(1).decode())
    assert {name: len(ids) for name, ids in queued.items()} == {
        f"drop {n:04d}": 1 for n in range(total)
    }
    assert waiting(daemon) == []


def test_a_file_taken_again_after_a_crash_makes_no_second_message(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    """What a kill between the intake's 250 and the file's removal leaves: the message queued
    (and here delivered) and its file still in the maildrop. Taken again, the idempotency key
    answers with the first message's id: nothing is queued or sent twice."""
    daemon = with_maildrop(relay, tmp_path, start=False)
    assert sendmail(daemon, "-i", "once@a.test", stdin=numbered(1)).returncode == 0
    [name] = waiting(daemon)
    saved = (maildrop_of(daemon) / name).read_bytes()
    daemon.start()
    delivered(daemon, sink, 1)
    daemon.stop()
    (maildrop_of(daemon) / name).write_bytes(saved)  # as the kill left it
    daemon.start()
    deadline = time.monotonic() + PICKUP
    while waiting(daemon) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2)  # a second message would be delivered by now
    first, again = daemon.events("picked_up")
    assert first["id"] == again["id"] and len(sink.received) == 1


def test_bp_lists_the_queue_and_q_flushes_it(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    daemon = with_maildrop(relay, tmp_path)
    listed = sendmail(daemon, "-bp", stdin=b"")
    assert (listed.returncode, listed.stdout.strip()) == (0, b"Mail queue is empty")
    flushed = sendmail(daemon, "-q", stdin=b"")
    assert flushed.returncode == 0, flushed.stderr


def test_errors_are_one_line_with_sysexits_codes(relay: RelayFactory, tmp_path: Path) -> None:
    daemon = with_maildrop(relay, tmp_path, start=False)
    cases = [
        ((), b"Subject: nobody\n\nto no one\n", 65),  # no recipients
        (("-t",), b"Subject: nobody\n\nno To, Cc or Bcc\n", 65),
        (("user@a.test",), b"", 65),  # an empty message
        (tuple(f"u{n}@a.test" for n in range(101)), b"Subject: x\n\nx\n", 65),  # > max_recipients
        (("--no-such-flag", "user@a.test"), b"Subject: x\n\nx\n", 64),
    ]
    for args, stdin, expected in cases:
        proc = sendmail(daemon, *args, stdin=stdin)
        lines = proc.stderr.decode().splitlines()
        assert (proc.returncode, len(lines)) == (expected, 1), (args, proc.stderr)
        assert proc.stdout == b""
    assert waiting(daemon) == []
