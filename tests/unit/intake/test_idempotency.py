"""Idempotency at intake: the X-Relay-Idempotency-Key directive, the content hash (what counts
as the same message), and the check and record around the durable write, concurrent claims of
one key included (relay.intake.idempotency)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from relay.intake.directives import DirectiveError, extract
from relay.intake.idempotency import CONFLICT, NEW, REPLAY, Idempotency, content_hash, smtp_data
from relay.spool.journal import INTAKE
from relay.spool.keys import KeyIndex
from relay.spool.message import Message, Recipient, new_id
from relay.spool.store import Spool

ID1, ID2 = "0" * 19 + "1", "0" * 19 + "2"
H1, H2 = "11" * 10, "22" * 10


@pytest.mark.parametrize(
    ("message", "kept", "key"),
    [
        (b"Subject: a\r\n\r\nb\r\n", b"Subject: a\r\n\r\nb\r\n", None),
        (b"X-Relay-Idempotency-Key: order-42\r\nSubject: a\r\n\r\nb\r\n", b"Subject: a\r\n\r\nb\r\n", "order-42"),
        (b"x-relay-idempotency-key:\r\n  a b~!\r\n\r\n", b"\r\n", "a b~!"),
        (b"X-Relay-Idempotency-Key: " + b"k" * 256 + b"\r\n\r\n", b"\r\n", "k" * 256),
    ],
)  # fmt: skip
def test_the_key_is_read_and_removed(message: bytes, kept: bytes, key: str | None) -> None:
    content, asked = extract(message)
    assert (content, asked.idempotency_key) == (kept, key)


@pytest.mark.parametrize(
    "field",
    [
        b"X-Relay-Idempotency-Key:",
        b"X-Relay-Idempotency-Key: " + b"k" * 257,
        "X-Relay-Idempotency-Key: caf\u00e9".encode(),
        b"X-Relay-Idempotency-Key: a\x01b",
    ],
)
def test_a_bad_key_is_a_5xx_naming_the_field(field: bytes) -> None:
    with pytest.raises(DirectiveError) as info:
        extract(field + b"\r\n\r\nbody\r\n")
    assert str(info.value).startswith("550 5.6.0 X-Relay-Idempotency-Key: ")


def test_two_keys_are_refused() -> None:
    with pytest.raises(DirectiveError, match="More than one X-Relay-Idempotency-Key"):
        extract(b"X-Relay-Idempotency-Key: a\r\nX-Relay-Idempotency-Key: a\r\n\r\n")


BASE = (b"Date: Mon, 1 Dec 2026 10:00:00 +0000\r\nMessage-ID: <1@a>\r\nSubject: s\r\n"
        b"X-Relay-Idempotency-Key: k\r\n\r\n", b"body\r\n")  # fmt: skip


def digest(sender: str, rcpts: list[str], head: bytes, body: bytes) -> str:
    return content_hash(sender, rcpts, smtp_data(head, [body]))


@pytest.mark.parametrize(
    ("sender", "rcpts", "head", "body", "same"),
    [
        ("a@x", ["b@y", "c@y"], *BASE, True),
        ("a@x", ["c@y", "b@y"], *BASE, True),  # recipients in another order
        ("a@x", ["b@y", "c@y"], BASE[0].replace(b"10:00:00", b"10:00:07").replace(b"<1@a>", b"<2@a>"), BASE[1], True),
        ("a@x", ["b@y", "c@y"], BASE[0].replace(b"Key: k", b"Key: other"), BASE[1], True),
        ("a@x", ["b@y", "c@y"], BASE[0].replace(b"Subject: s", b"Subject: t"), BASE[1], False),
        ("a@x", ["b@y", "c@y"], BASE[0], b"body!\r\n", False),
        ("z@x", ["b@y", "c@y"], *BASE, False),
        ("a@x", ["b@y"], *BASE, False),
        ("a@x", ["b@y", "c@y"], BASE[0].replace(b"Subject", b"X-Relay-Priority: high\r\nSubject"), BASE[1], False),
    ],
)  # fmt: skip
def test_what_counts_as_the_same_message(
    sender: str, rcpts: list[str], head: bytes, body: bytes, same: bool
) -> None:
    assert (digest(sender, rcpts, head, body) == digest("a@x", ["b@y", "c@y"], *BASE)) is same
    assert len(digest(sender, rcpts, head, body)) == 20


def test_claim_then_replay_or_conflict() -> None:
    async def run() -> None:
        keys = Idempotency(KeyIndex(window=60))
        first = await keys.claim("acme", "k", H1)
        assert first.outcome == NEW
        keys.settle(first, ID1)
        again = await keys.claim("acme", "k", H1)
        assert (again.outcome, again.msg_id) == (REPLAY, ID1)
        assert (await keys.claim("acme", "k", H2)).outcome == CONFLICT
        assert (await keys.claim("other", "k", H2)).outcome == NEW  # another tenant's key

    asyncio.run(run())


@pytest.mark.parametrize(("written", "second"), [(ID1, REPLAY), (None, NEW)])
def test_a_concurrent_claim_waits_for_the_first(written: str | None, second: str) -> None:
    async def run() -> None:
        keys = Idempotency(KeyIndex(window=60))
        first = await keys.claim("acme", "k", H1)
        waiting = asyncio.ensure_future(keys.claim("acme", "k", H1))
        other = await keys.claim("acme", "k", H2)  # other content under a key in flight
        await asyncio.sleep(0.01)
        assert not waiting.done() and other.outcome == CONFLICT
        keys.settle(first, written)  # durable as ID1, or the write failed
        claim = await waiting
        assert claim.outcome == second and claim.msg_id == written
        keys.settle(first, ID2)  # settling twice changes nothing
        found = keys.index.get("acme", "k", time.time())
        assert (found.msg_id if found else None) == written

    asyncio.run(run())


def test_many_at_once_make_one_message() -> None:
    async def run() -> list[str]:
        keys = Idempotency(KeyIndex(window=60))

        async def submit(n: int) -> str:
            claim = await keys.claim("t", "k", H1)
            if claim.outcome == NEW:
                await asyncio.sleep(0.01)  # the durable write
                keys.settle(claim, f"{n:020x}")
                return f"{n:020x}"
            assert claim.msg_id is not None
            return claim.msg_id

        return await asyncio.gather(*(submit(n) for n in range(20)))

    assert len(set(asyncio.run(run()))) == 1


def test_the_spools_keys_come_in_before_any_claim(tmp_path: Path) -> None:
    """start() rebuilds the index in a process of its own; a claim waits for it."""
    spool = Spool(tmp_path)
    spool.prepare()
    spool.open_journal(INTAKE)
    msg = Message(new_id(), "a@x.test", [Recipient("b@y.test")], time.time(), time.time())
    msg.idempotency_key, msg.content_hash = "k", H1
    spool.accept(msg, [b"Subject: x\r\n\r\nbody\r\n"])

    async def run() -> None:
        keys = Idempotency(KeyIndex(window=60), spool)
        keys.start()
        claim = await keys.claim("default", "k", H1)
        assert (claim.outcome, claim.msg_id) == (REPLAY, msg.id)
        assert (await keys.claim("default", "k", H2)).outcome == CONFLICT
        keys.window = 30
        assert keys.index.window == 30

    asyncio.run(run())


def test_a_failed_rebuild_fails_the_claim_and_is_tried_again(tmp_path: Path) -> None:
    async def run() -> None:
        spool = Spool(tmp_path / "missing")  # no queue/: the rebuild's process fails
        keys = Idempotency(KeyIndex(window=60), spool)
        with pytest.raises(RuntimeError, match="rebuilding the idempotency keys failed"):
            await keys.claim("default", "k", H1)
        spool.prepare()
        assert (await keys.claim("default", "k", H1)).outcome == NEW

    asyncio.run(run())
