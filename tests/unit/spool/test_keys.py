"""The idempotency key index: remembered per tenant for the window, replaced once expired, shed
from memory, and rebuilt from the journal and the queue's listings counting only messages known
to be durable (docs/spool.md "Idempotency keys")."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from relay.mail import events
from relay.spool import keys
from relay.spool.journal import INTAKE, SCHEDULER, Journal
from relay.spool.keys import RECORD, Entry, KeyIndex, rebuild
from relay.spool.layout import EVENTS, TMP
from relay.spool.message import Message, Recipient, new_id
from relay.spool.store import Spool, keyed

T0 = 1_800_000_000.0
H1, H2 = "11" * 10, "22" * 10


def entry(n: int, at: float = T0, content: str = H1) -> Entry:
    return Entry(f"{n:020x}", content, at)


@pytest.mark.parametrize(
    ("tenant", "key", "now", "found"),
    [
        ("acme", "k1", T0, True),
        ("acme", "k1", T0 + 99.9, True),
        ("acme", "k1", T0 + 100, False),  # the window is over
        ("other", "k1", T0, False),  # keys are the tenant's own
        ("acme", "K1", T0, False),
        ("acme", "k2", T0, False),
    ],
)
def test_get_within_window_and_tenant(tenant: str, key: str, now: float, found: bool) -> None:
    index = KeyIndex(window=100)
    index.put("acme", "k1", entry(1))
    got = index.get(tenant, key, now)
    assert (got == entry(1)) if found else got is None


def test_an_expired_key_is_replaced_and_shed() -> None:
    index = KeyIndex(window=100)
    index.put("acme", "k", entry(1))
    index.put("acme", "k", entry(2, T0 + 150, H2))  # the same key after its window
    assert index.get("acme", "k", T0 + 160) == entry(2, T0 + 150, H2)
    assert len(index) == 1
    many = KeyIndex(window=100)
    for n in range(200_000):  # every bucket gets a few keys
        many.put("t", f"k{n}", entry(n))
    many.put("t", "late", entry(1, T0 + 500))
    for n in range(200_000):
        many.put("t", f"again{n}", entry(n, T0 + 500))
    assert len(many) < 200_002 + 200_000 // 2  # the first 200,000 were shed on the way
    assert many.get("t", "k5", T0 + 501) is None and many.get("t", "again5", T0 + 501)


def test_a_chance_match_inside_a_record_is_not_a_key() -> None:
    bucket = bytearray(RECORD.pack(b"\x01" * 16, b"\x02" * 10, b"\x03" * 10, 5))
    bucket += RECORD.pack(b"\x02" * 16, b"\x02" * 10, b"\x03" * 10, 5)
    assert keys._find(bucket, b"\x02" * 16) == RECORD.size  # not at offset 16


def test_memory_is_about_45_bytes_a_key() -> None:
    index = KeyIndex(window=86400)
    for n in range(100_000):
        index.put("default", f"order-{n}", entry(n))
    assert index.nbytes() < 100_000 * 48 + keys.BUCKETS * 80


def accept(spool: Spool, key: str | None, tenant: str = "default") -> Message:
    msg = Message(new_id(), "a@x.test", [Recipient("b@y.test")], time.time(), time.time())
    msg.tenant, msg.idempotency_key = tenant, key
    msg.content_hash = None if key is None else H1
    spool.accept(msg, [b"Subject: x\r\n\r\nbody\r\n"])
    return msg


def test_rebuild_keeps_what_was_made_durable_and_nothing_else(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.prepare()
    spool.open_journal(INTAKE)
    queued = accept(spool, "queued", tenant="acme")
    finished = accept(spool, "finished")
    plain = accept(spool, None)
    spool.remove(finished.id)  # delivered and removed: its later event says it was durable
    scheduler = Journal(tmp_path / EVENTS, SCHEDULER, tmp_path / TMP)
    scheduler.append(
        [events.record(events.DELIVERED, finished, time.time(), finished.recipients[0])]
    )
    # A group commit that never finished: its received event is there, its message is not.
    lost = Message(new_id(), "a@x.test", [Recipient("b@y.test")], time.time(), time.time())
    lost.idempotency_key, lost.content_hash = "lost", H2
    assert spool.journal is not None
    spool.journal.append([events.record(events.RECEIVED, lost, time.time(), **keyed(lost))])
    index = rebuild(spool, window=3600)
    assert index.get("acme", "queued", time.time()) == Entry(
        queued.id, H1, index_time(index, "acme", "queued")
    )
    assert index.get("default", "finished", time.time()).msg_id == finished.id  # type: ignore[union-attr]
    assert index.get("default", "lost", time.time()) is None
    assert index.get("default", "queued", time.time()) is None
    assert len(index) == 2 and plain.idempotency_key is None
    assert (
        rebuild(spool, window=3600, now=time.time() + 3600).get(
            "acme", "queued", time.time() + 3600
        )
        is None
    )


def index_time(index: KeyIndex, tenant: str, key: str) -> float:
    found = index.get(tenant, key, time.time())
    assert found is not None
    return found.at


def test_rebuild_after_a_lost_commit_keeps_the_retry(tmp_path: Path) -> None:
    """A commit that never finished (no state, no later event), then the client's retry made a
    message with the same key: the retry's id is the key's. A later event in a file opened
    before the received one's still counts; keys with JSON escapes come back as given."""
    spool = Spool(tmp_path)
    spool.prepare()
    scheduler = Journal(tmp_path / EVENTS, SCHEDULER, tmp_path / TMP)
    scheduler.append([{"event": "held", "id": "0" * 20}])  # opened first, written to later
    spool.open_journal(INTAKE)
    assert spool.journal is not None
    lost = Message(new_id(), "a@x.test", [Recipient("b@y.test")], time.time(), time.time())
    lost.idempotency_key, lost.content_hash = 'k "q" \\ x', H2
    spool.journal.append([events.record(events.RECEIVED, lost, time.time(), **keyed(lost))])
    retry = accept(spool, 'k "q" \\ x')
    done = accept(spool, "done")
    spool.remove(done.id)
    scheduler.append([events.record(events.DELIVERED, done, time.time(), done.recipients[0])])
    index = rebuild(spool, window=3600)
    assert index.get("default", 'k "q" \\ x', time.time()) == Entry(
        retry.id, H1, index_time(index, "default", 'k "q" \\ x')
    )
    assert index.get("default", "done", time.time()) is not None
    assert len(index) == 2


def test_dump_and_load() -> None:
    index = KeyIndex(window=100)
    for n in range(1000):
        index.put("t", f"k{n}", entry(n))
    back = keys.load(keys.dump(index), 100)
    assert len(back) == 1000 and back.get("t", "k7", T0) == entry(7)
    with pytest.raises(ValueError):
        keys.load(keys.dump(index)[:-3], 100)
