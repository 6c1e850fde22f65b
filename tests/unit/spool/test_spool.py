"""The spool's transitions and start-up recovery, on real files, as docs/spool.md states them."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from relay.mail.reply import Reply
from relay.spool.layout import DEAD, QUEUE
from relay.spool.message import Message, Recipient, is_id, new_id
from relay.spool.store import CorruptEntry, Spool, SpoolError

BODY = (b"Received: from x\r\n", b"Subject: t\r\n\r\nbody\r\n")


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    return spool


def accepted(spool: Spool, *rcpts: str) -> Message:
    now = time.time()
    msg = Message(new_id(), "a@s.test", [Recipient(r) for r in rcpts or ("u@d.test",)], now, now)
    spool.accept(msg, BODY)
    return msg


def test_ids_sort_by_arrival_and_are_file_safe() -> None:
    first = new_id()
    time.sleep(0.002)
    second = new_id()
    assert first < second and is_id(first) and len(first) == 20
    assert not is_id("../etc/passwd") and not is_id(first.upper())


def test_accept_writes_content_then_state_privately(spool: Spool) -> None:
    msg = accepted(spool)
    assert spool.content_path(msg.id).read_bytes() == b"".join(BODY)
    assert spool.load(msg.id) == msg
    assert stat.S_IMODE(os.stat(spool.state_path(msg.id)).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(spool.root / QUEUE).st_mode) == 0o700
    assert os.listdir(spool.root / "tmp") == []


@pytest.mark.parametrize("broken", ["msg", "queue"])
def test_failed_accept_leaves_nothing(spool: Spool, broken: str) -> None:
    """A write that fails (here: its directory is not one) leaves no trace, content included."""
    directory = spool.root / broken
    directory.rmdir()
    directory.write_bytes(b"")
    msg = Message(new_id(), "a@s.test", [Recipient("u@d.test")], 0.0, 0.0)
    with pytest.raises(OSError):
        spool.accept(msg, BODY)
    assert os.listdir(spool.root / "tmp") == []
    for name in ("msg", "queue"):
        if name != broken:
            assert os.listdir(spool.root / name) == []


def test_dead_letter_merges_and_keeps_content_while_needed(spool: Spool) -> None:
    msg = accepted(spool, "a@d.test", "b@d.test", "c@d.test")
    msg.recipients[0].status = "failed"
    msg.recipients[0].reply = Reply(550, "5.1.1", "unknown")
    spool.save(msg)
    spool.dead_letter(msg)
    msg.recipients[1].status = "expired"
    spool.save(msg)
    record = spool.dead_letter(msg)
    again = spool.dead_letter(msg)  # idempotent
    assert [r.address for r in record.recipients] == ["a@d.test", "b@d.test"]
    assert again.recipients == record.recipients
    spool.remove(msg.id)  # the queue entry is done; the dead letter still needs the content
    assert spool.content_path(msg.id).exists()
    spool.remove(msg.id, DEAD)
    assert not spool.content_path(msg.id).exists()


def test_requeue_brings_failed_recipients_back(spool: Spool) -> None:
    msg = accepted(spool, "a@d.test")
    msg.recipients[0].status, msg.recipients[0].attempts = "failed", 3
    spool.save(msg)
    spool.dead_letter(msg)
    spool.remove(msg.id)
    back = spool.requeue(msg.id, now=123.0)
    assert back.recipients[0].status == "queued" and back.recipients[0].attempts == 3
    assert (back.next_attempt, back.requeued_at, back.born) == (123.0, 123.0, 123.0)
    assert spool.ids(DEAD) == [] and spool.ids(QUEUE) == [msg.id]
    with pytest.raises(SpoolError):
        spool.requeue(msg.id, now=1.0)


def test_recover_cleans_what_was_never_acknowledged(spool: Spool) -> None:
    good = accepted(spool)
    (spool.root / "tmp" / "x.123").write_bytes(b"partial")
    (spool.content_path(new_id())).write_bytes(b"content whose state never landed")
    torn = accepted(spool)
    spool.state_path(torn.id).write_text('{"version": 1, "id"')
    headless = accepted(spool)
    spool.content_path(headless.id).unlink()
    counts = spool.recover()
    assert counts == {"temp_removed": 1, "orphans_removed": 1, "quarantined": 1}
    assert os.listdir(spool.root / "corrupt") == [f"queue.{headless.id}.json"]
    # recover() reads no state file (seconds for a million); the torn one is quarantined by
    # its first reader, the scheduler's index (test_crash_e2e), and never loads as a message.
    assert spool.ids() == sorted([good.id, torn.id])
    with pytest.raises(CorruptEntry):
        spool.load(torn.id)


def test_corrupt_dead_record_is_quarantined_without_the_queued_content(spool: Spool) -> None:
    msg = accepted(spool, "a@d.test", "b@d.test")
    spool.state_path(msg.id, DEAD).write_text("not json")
    msg.recipients[0].status = "failed"
    record = spool.dead_letter(msg)
    assert [r.address for r in record.recipients] == ["a@d.test"]
    assert os.listdir(spool.root / "corrupt") == [f"dead.{msg.id}.json"]
    assert spool.content_path(msg.id).exists()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(version=2),
        lambda d: d.update(recipients=[]),
        lambda d: d.pop("sender"),
        lambda d: d.update(id="0" * 20),
        lambda d: d.update(queued_at="yesterday"),
    ],
)
def test_inconsistent_state_is_corrupt(spool: Spool, mutate: object) -> None:
    msg = accepted(spool)
    data = json.loads(spool.state_path(msg.id).read_text())
    mutate(data)  # type: ignore[operator]
    spool.state_path(msg.id).write_text(json.dumps(data))
    with pytest.raises(CorruptEntry):
        spool.load(msg.id)


def test_accept_batch_makes_every_message_durable_content_first(spool: Spool) -> None:
    now = time.time()
    batch = [
        (Message(new_id(), "a@s.test", [Recipient(f"u{n}@d.test")], now, now), BODY)
        for n in range(5)
    ]
    assert spool.accept_batch(batch) == [None] * 5
    for msg, content in batch:
        assert spool.load(msg.id) == msg
        assert spool.content_path(msg.id).read_bytes() == b"".join(content)
    assert os.listdir(spool.root / "tmp") == []


def test_remove_batch_removes_queue_entries_and_unneeded_content(spool: Spool) -> None:
    kept = accepted(spool)
    gone = [accepted(spool) for _ in range(3)]
    dead = accepted(spool, "x@d.test")
    dead.recipients[0].status = "failed"
    spool.save(dead)
    spool.dead_letter(dead)
    assert spool.remove_batch([m.id for m in [*gone, dead]]) == [None] * 4
    assert spool.ids(QUEUE) == [kept.id]
    assert not any(spool.content_path(m.id).exists() for m in gone)
    assert spool.content_path(dead.id).exists()  # its dead-letter record still needs it


def test_a_spilled_message_is_copied_whole_or_not_at_all(spool: Spool) -> None:
    """Content from a spill file lands in msg/ byte for byte; a spill holding fewer bytes than
    it should fails the write instead of leaving a short message (and leaves no file)."""
    spill = spool.spill()
    body = b"".join(b"line %06d\r\n" % i for i in range(100_000))
    spill.write(body)
    spool.write_content("a" * 20, [b"Received: x\r\n", spill, b"tail\r\n"])
    assert spool.content_path("a" * 20).read_bytes() == b"Received: x\r\n" + body + b"tail\r\n"
    spill.size += 10  # as if a write had been lost
    with pytest.raises(OSError, match="spill file ends at"):
        spool.write_content("b" * 20, [spill])
    assert not spool.content_path("b" * 20).exists()
    spill.close()


def test_what_the_supervisor_asks_counts_and_probes_without_a_trace(spool: Spool) -> None:
    """The dead letters behind relay_dead_letter_messages, and /readyz's probe: a file created
    and removed in tmp/, an OSError when the spool cannot take one."""
    msg = accepted(spool, "a@d.test", "b@d.test")
    msg.recipients[0].status = "failed"
    spool.save(msg)
    spool.dead_letter(msg)
    assert (spool.count(QUEUE), spool.count(DEAD)) == (1, 1)
    spool.check_writable()
    assert os.listdir(spool.root / "tmp") == []
    (spool.root / "tmp").rmdir()
    (spool.root / "tmp").write_bytes(b"")
    with pytest.raises(OSError):
        spool.check_writable()
