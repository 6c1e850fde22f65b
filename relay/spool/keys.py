"""Spool, idempotency keys: the index of the keys messages were accepted with (a tenant's key →
the message's id, its content hash, when), compact enough for millions, and its rebuild at
start-up from the event journal's `received` events and the queue's listings (docs/spool.md
"Idempotency keys"). Run as `python -m relay.spool.keys SPOOL WINDOW`, it rebuilds the
index and writes it to stdout (the intake does so in a process of its own at start)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from relay.spool import journal
from relay.spool.layout import DEAD, QUEUE, Layout

# One record: the digest of tenant and key, the message id (20 hex digits), the content hash
# (20 hex digits), the second it was accepted (UTC epoch): 40 bytes, in buckets of bytearrays.
RECORD = struct.Struct("<16s10s10sI")
DIGEST = 16
BUCKETS = 1 << 16
CHUNK = 4 * 1024 * 1024  # bytes of journal read at a time by the rebuild
KEYED = b'"idempotency_key":'
RECEIVED = b'"event":"received"'
ID_RE = re.compile(rb'"id":"([0-9a-f]{20})"')
STRING = re.compile(rb'"([^"\\]*(?:\\.[^"\\]*)*)"')  # a JSON string, escapes kept
HEX20 = re.compile(rb'"([0-9a-f]{20})"')
EVENT_ID = b'{"event_id":"'
# (name, where to look for it: from the start or the end, its value's form)
FIELDS = (
    (b'"id":', bytes.find, HEX20),
    (b'"tenant":', bytes.find, STRING),
    (b'"idempotency_key":', bytes.rfind, STRING),
    (b'"content_hash":', bytes.rfind, HEX20),
)


@dataclass(frozen=True)
class Entry:
    """What a key is remembered with: the message it made, that content's hash, and when."""

    msg_id: str
    content_hash: str
    at: float  # UTC epoch seconds (whole seconds once stored)


def digest(tenant: str, key: str) -> bytes:
    """The index's name for a tenant's key: 128 bits of BLAKE2b (keys are never kept)."""
    data = tenant.encode() + b"\0" + key.encode()
    return hashlib.blake2b(data, digest_size=DIGEST).digest()


class KeyIndex:
    """Keys accepted within `window` seconds: 40 bytes a key in 65,536 buckets (bytearrays
    searched with bytes.find), so a million keys take about 45 MiB, a lookup a few µs, and
    nothing ever rehashes them all at once. A bucket sheds its expired records when a key is
    added to it; an expired record still found is treated as absent."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._buckets: list[bytearray] = [bytearray() for _ in range(BUCKETS)]
        self._count = 0  # records held, expired ones not yet shed included

    def __len__(self) -> int:
        return self._count

    def get(self, tenant: str, key: str, now: float) -> Entry | None:
        """The entry of a tenant's key accepted within the window before now, else None."""
        name = digest(tenant, key)
        bucket = self._bucket(name)
        at = _find(bucket, name)
        if at < 0:
            return None
        _, msg_id, content, second = RECORD.unpack_from(bucket, at)
        if second + self.window <= now:
            return None
        return Entry(msg_id.hex(), content.hex(), float(second))

    def put(self, tenant: str, key: str, entry: Entry) -> None:
        """Remember a key (replacing an expired record of it)."""
        name = digest(tenant, key)
        bucket = self._bucket(name)
        self._shed(bucket, entry.at)
        record = RECORD.pack(
            name, bytes.fromhex(entry.msg_id), bytes.fromhex(entry.content_hash), int(entry.at)
        )
        self.add(name, record)

    def add(self, name: bytes, record: bytes) -> None:
        """put() of a record already packed (the rebuild)."""
        bucket = self._bucket(name)
        at = _find(bucket, name)
        if at >= 0:
            bucket[at : at + RECORD.size] = record
        else:
            bucket += record
            self._count += 1

    def drop(self, msg_ids: set[bytes]) -> None:
        """Forget the keys of these messages (ids as 10 bytes): one pass over every record."""
        if not msg_ids:
            return
        size = RECORD.size
        for bucket in self._buckets:
            for at in range(len(bucket) - size, -1, -size):
                if bytes(bucket[at + DIGEST : at + DIGEST + 10]) in msg_ids:
                    del bucket[at : at + size]
                    self._count -= 1

    def nbytes(self) -> int:
        """The memory the records and their buckets take (for the bench)."""
        return sys.getsizeof(self._buckets) + sum(sys.getsizeof(b) for b in self._buckets)

    def _bucket(self, name: bytes) -> bytearray:
        return self._buckets[int.from_bytes(name[:4], "little") % BUCKETS]

    def _shed(self, bucket: bytearray, now: float) -> None:
        """Drop the bucket's leading run of expired records (records are added in time order,
        so that is almost always every expired one)."""
        cut, size = 0, RECORD.size
        while cut < len(bucket) and _second(bucket, cut) + self.window <= now:
            cut += size
        if cut:
            del bucket[:cut]
            self._count -= cut // size


def _find(bucket: bytearray, name: bytes) -> int:
    """The offset of the record named name in bucket, or -1 (a match off a record's start is
    a chance match inside another record's fields: searched on)."""
    at = bucket.find(name)
    while at >= 0 and at % RECORD.size:
        at = bucket.find(name, at + 1)
    return at


def _second(bucket: bytearray, at: int) -> int:
    second: int = struct.unpack_from("<I", bucket, at + RECORD.size - 4)[0]
    return second


# --- the rebuild -------------------------------------------------------------------------------


def rebuild(spool: Layout, window: float, now: float | None = None) -> KeyIndex:
    """The index as the disk says: every `received` event with a key in the window whose message
    is known to have been made durable (its state file is in queue/ or dead/, or a later event
    is about it). A `received` event without either is a message whose group commit failed or
    never finished (docs/events.md "Durability"): never acknowledged, so its key is dropped.
    Two passes over the window's journal files: the keyed `received` events, then (while some
    are still unconfirmed) the other events' message ids."""
    now = time.time() if now is None else now
    index = KeyIndex(window)
    known = {bytes.fromhex(i) for where in (QUEUE, DEAD) for i in spool.ids(where)}
    unconfirmed: set[bytes] = set()
    for line in _lines(spool.events_dir, now - window):
        if KEYED in line and RECEIVED in line and (found := _received(line)) is not None:
            name, record = found
            if _second_of(record) + window > now:
                index.add(name, record)
                if record[DIGEST : DIGEST + 10] not in known:
                    unconfirmed.add(record[DIGEST : DIGEST + 10])
    for line in _lines(spool.events_dir, now - window) if unconfirmed else ():
        if RECEIVED not in line and (match := ID_RE.search(line)) is not None:
            unconfirmed.discard(bytes.fromhex(match.group(1).decode()))
            if not unconfirmed:
                break
    index.drop(unconfirmed)
    return index


def _received(line: bytes) -> tuple[bytes, bytes] | None:
    """(digest, record) of a keyed `received` event's line; None for a torn or odd one. Read
    by looking for each field's name in the journal's compact JSON (a string value never holds
    an unescaped quote, so a name cannot be found inside another field's value: json.loads
    would take twice as long); JSON's escapes are undone where a value has any."""
    values = []
    for name, look, form in FIELDS:
        at = look(line, name)
        match = form.match(line, at + len(name)) if at >= 0 else None
        if match is None:
            return None
        values.append(match.group(1))
    msg_id, tenant, key, content = values
    if not line.startswith(EVENT_ID) or not line[13:29].isdigit():
        return None
    try:
        name = digest(_text(tenant), _text(key))
    except ValueError:
        return None
    second = int(line[13:29]) // 1_000_000
    return name, RECORD.pack(name, bytes.fromhex(msg_id.decode()),
                             bytes.fromhex(content.decode()), second)  # fmt: skip


def _text(raw: bytes) -> str:
    """A JSON string's value from between its quotes."""
    text: str = json.loads(b'"' + raw + b'"') if b"\\" in raw else raw.decode()
    return text


def _second_of(record: bytes) -> int:
    second: int = struct.unpack_from("<I", record, RECORD.size - 4)[0]
    return second


def _lines(directory: Path, since: float) -> Iterator[bytes]:
    """Every line of the journal files written to since `since` (UTC epoch), oldest first."""
    for path in journal.files(directory):
        try:
            if os.stat(path).st_mtime < since:
                continue
            with open(path, "rb") as file:
                rest = b""
                while chunk := file.read(CHUNK):
                    lines = (rest + chunk).split(b"\n")
                    rest = lines.pop()
                    yield from lines
                if rest:
                    yield rest  # a torn last line: parsed, or its id taken, like the others
        except FileNotFoundError:  # pruned meanwhile: its events are older than retention
            continue


# --- the rebuild in a process of its own ------------------------------------------------------


def dump(index: KeyIndex) -> bytes:
    """The index's records as bytes: each bucket's length (4 bytes), then its records."""
    return b"".join(len(b).to_bytes(4, "little") + b for b in index._buckets)


def load(data: bytes, window: float) -> KeyIndex:
    """The index dump() wrote; ValueError if data is not one."""
    index, at = KeyIndex(window), 0
    for n in range(BUCKETS):
        size = int.from_bytes(data[at : at + 4], "little")
        bucket = index._buckets[n] = bytearray(data[at + 4 : at + 4 + size])
        if len(bucket) != size or size % RECORD.size:
            raise ValueError("not an idempotency key index")
        index._count += size // RECORD.size
        at += 4 + size
    if at != len(data):
        raise ValueError("not an idempotency key index")
    return index


def main(argv: list[str]) -> int:
    """`python -m relay.spool.keys SPOOL WINDOW`: the rebuilt index on stdout."""
    root, window = Path(argv[0]), float(argv[1])
    os.nice(10)  # the intake's and the scheduler's work comes first
    sys.stdout.buffer.write(dump(rebuild(Layout(root), window)))
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
