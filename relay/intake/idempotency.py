"""Intake, idempotency: a tenant's idempotency key checked before a message's durable write and
recorded after it, so that one key makes one message (the same content again is answered with
the original id, other content under it is refused), also when two submissions carry it at the
same moment; and the hash of what an SMTP client submitted (docs/spool.md "Idempotency keys")."""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import PIPE

from relay.intake import directives
from relay.spool.keys import Entry, KeyIndex, load
from relay.spool.layout import Layout

NEW, REPLAY, CONFLICT = "new", "replay", "conflict"
HASH_BYTES = 10  # content hashes are 80 bits (20 hex digits): compared only under one key
# Left out of an SMTP message's hash with the key itself: mail libraries stamp these afresh on
# every attempt, so a faithful retry differs in them and nothing else.
UNHASHED = frozenset({directives.IDEMPOTENCY_KEY, b"date", b"message-id"})
REPLY_CONFLICT = "550 5.7.0 X-Relay-Idempotency-Key {!r} was used for a different message"


@dataclass
class Claim:
    """claim()'s answer. NEW: go on and write the message, then settle(); REPLAY: the key's
    message is msg_id, answer as for it; CONFLICT: the key made another message (msg_id)."""

    outcome: str
    tenant: str
    key: str
    content_hash: str
    msg_id: str | None = None
    _done: asyncio.Future[str | None] | None = field(default=None, repr=False)


class Idempotency:
    """The check and the record around a durable write, for any submission path (SMTP now, the
    HTTP API's Idempotency-Key next): claim(tenant, key, content_hash) first; on NEW write the
    message and settle(claim, msg_id) once it is durable, or settle(claim, None) if it failed.
    While a claim is unsettled, another with the same key waits for it (same content) or is a
    CONFLICT (other content): one key, one message.

    The keys a spool already holds are read by start() in a process of its own (a million take
    some 10-30 s: mail without a key flows meanwhile, and the intake's core is not taken);
    claims wait until they are in."""

    def __init__(self, index: KeyIndex, spool: Layout | None = None) -> None:
        self.index = index
        self._spool = spool  # where start() rebuilds the index from; None: it is complete
        self._loading: asyncio.Future[KeyIndex] | None = None
        self._inflight: dict[tuple[str, str], Claim] = {}

    @property
    def window(self) -> float:
        return self.index.window

    @window.setter
    def window(self, seconds: float) -> None:
        self.index.window = seconds

    def start(self) -> None:
        """Begin rebuilding the index from the spool, if it has not begun (needs a running loop)."""
        if self._spool is not None and self._loading is None:
            loop = asyncio.get_running_loop()  # RuntimeError without one
            self._loading = loop.create_task(self._rebuild(self._spool.root))

    async def _rebuild(self, root: Path) -> KeyIndex:
        """relay.spool.keys.rebuild in a child process (`python -m relay.spool.keys`)."""
        window = self.index.window
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay.spool.keys", str(root), repr(window),
            stdin=asyncio.subprocess.DEVNULL, stdout=PIPE, stderr=PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        if proc.returncode != 0:
            why = err.decode(errors="replace").strip().splitlines()[-1:] or [f"{proc.returncode}"]
            raise RuntimeError(f"rebuilding the idempotency keys failed: {why[0]}")
        return load(out, window)

    async def ready(self) -> None:
        """Wait until the spool's keys are in; raise what the rebuild failed with (the next
        call tries again)."""
        if self._spool is None:
            return
        self.start()
        assert self._loading is not None
        try:
            index = await asyncio.shield(self._loading)
        except BaseException:
            if self._loading.done():
                self._loading = None
            raise
        if self._spool is not None:  # the first waiter takes it in
            index.window, self._spool = self.index.window, None
            self.index = index

    async def claim(self, tenant: str, key: str, content_hash: str) -> Claim:
        await self.ready()
        while True:
            entry = self.index.get(tenant, key, time.time())
            if entry is not None:
                same = entry.content_hash == content_hash
                return Claim(REPLAY if same else CONFLICT, tenant, key, content_hash, entry.msg_id)
            running = self._inflight.get((tenant, key))
            if running is None or running._done is None:
                done = asyncio.get_running_loop().create_future()
                claim = Claim(NEW, tenant, key, content_hash, _done=done)
                self._inflight[(tenant, key)] = claim
                return claim
            if running.content_hash != content_hash:
                return Claim(CONFLICT, tenant, key, content_hash)
            await asyncio.shield(running._done)  # recorded (then a replay) or failed: again

    def settle(self, claim: Claim, msg_id: str | None, at: float | None = None) -> None:
        """A NEW claim's end: its message durable as msg_id (remembered from `at`, default
        now), or None when it was not written. Anything else: nothing to do."""
        if claim.outcome != NEW or claim._done is None or claim._done.done():
            return
        if self._inflight.get((claim.tenant, claim.key)) is claim:
            del self._inflight[(claim.tenant, claim.key)]
        if msg_id is not None:
            entry = Entry(msg_id, claim.content_hash, time.time() if at is None else at)
            self.index.put(claim.tenant, claim.key, entry)
        claim._done.set_result(msg_id)


def content_hash(sender: str, recipients: Sequence[str], data: Iterable[bytes]) -> str:
    """What makes a message, hashed: the envelope sender, the recipients (sorted: their order
    changes nothing that is sent), and the data as submitted; 20 hex digits of BLAKE2b.
    Every part is length-prefixed, so no two different submissions hash the same bytes."""
    h = hashlib.blake2b(digest_size=HASH_BYTES, person=b"relay-idem-v1")
    h.update(len(recipients).to_bytes(4, "big"))
    for item in (sender, *sorted(recipients)):
        raw = item.encode("utf-8", "surrogateescape")
        h.update(len(raw).to_bytes(4, "big") + raw)
    for piece in data:
        h.update(piece)
    return h.hexdigest()


def smtp_data(head: bytes, body: Iterable[bytes]) -> Iterable[bytes]:
    """An SMTP message's data as hashed: its header block without the idempotency key, Date and
    Message-ID fields (UNHASHED), then its body."""
    yield directives.without(head, UNHASHED)
    yield from body
