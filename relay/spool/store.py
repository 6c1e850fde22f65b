"""Spool, the store: the on-disk queue (content, state, dead letters) and its atomic
transitions, each after the events that describe it (relay.spool.journal); every write goes
through relay.spool.durable."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from relay.mail import events
from relay.spool import recovery
from relay.spool.durable import flush, fsync_dir, read, unlink, write_all
from relay.spool.journal import Journal
from relay.spool.layout import DEAD, MSG, QUEUE, TMP, Layout
from relay.spool.message import Message, encode
from relay.spool.spill import Content, Spill

Failure = BaseException | None  # a batch operation's result for one item


class SpoolError(Exception):
    """A spool operation failed (I/O, missing entry, unreadable state)."""


class CorruptEntry(SpoolError):
    """A state file exists but cannot be parsed or is inconsistent."""


class Spool(Layout):
    """A spool directory; see docs/spool.md for the format and the order of every write."""

    journal: Journal | None = None  # this process's events, once open_journal() named it

    def open_journal(self, writer: str) -> Journal:
        """This process's event journal, as writer (intake, scheduler, cli-<pid>; opened once).
        From then on every change of a state file first makes the events appended before it
        durable (docs/events.md "Durability"); the intake's are flushed by its group commit."""
        if self.journal is None:
            self.journal = Journal(self.events_dir, writer, self.root / TMP)
        elif self.journal.writer != writer:
            raise ValueError(f"the journal is open as {self.journal.writer}, not {writer}")
        return self.journal

    def _sync_journal(self) -> None:
        if self.journal is not None:
            self.journal.sync()

    # --- intake ------------------------------------------------------------------------------

    def spill(self) -> Spill:
        """A new nameless file in tmp/ for the body of a message being received."""
        return Spill(self.root / TMP)

    def write_content(self, msg_id: str, content: Content) -> None:
        """Write a large message's content to msg/<id> ahead of accept_batch (which is then
        given None), in a worker thread of its own, so that a batch never waits for a copy."""
        self._create(self.content_path(msg_id), content)

    def accept(self, msg: Message, content: Content | None) -> None:
        """Make one new message durable: accept_batch() for a batch of one; raises its error.
        Blocking: call it from a worker thread."""
        [failure] = self.accept_batch([(msg, content)])
        if failure is not None:
            raise failure

    def accept_batch(self, batch: Sequence[tuple[Message, Content | None]]) -> list[Failure]:
        """Make new messages durable with one flush for all (group commit, docs/spool.md):
        each content is written under its final name in msg/ (content without a state was
        never acknowledged; recover() removes it) and each state to tmp/; one syncfs makes
        them and msg/'s entries durable; only then are the states renamed into queue/ and
        queue/ fsync'd. A state file therefore never appears before its content is durable
        (docs/architecture.md invariant 1). Each message's `received` event is appended to the
        journal before the syncfs, which makes it durable with the message (docs/events.md).
        A content of None was written by write_content(). A result per message: None, or its
        error."""
        results: list[Failure] = [None] * len(batch)
        staged: list[tuple[int, str, Path]] = []
        for index, (msg, content) in enumerate(batch):
            try:
                if content is not None:
                    self._create(self.content_path(msg.id), content)
                staged.append((index, msg.id, self._stage(msg.id, [encode(msg)])))
            except OSError as exc:
                results[index] = exc
                self._discard(msg.id)
        try:
            self._received([batch[index][0] for index, _, _ in staged])
            self._commit(staged)
        except OSError as exc:
            for index, msg_id, state in staged:
                results[index] = exc
                unlink(state)
                self._discard(msg_id)
        return results

    def _received(self, msgs: list[Message]) -> None:
        """The `received` events of messages about to be committed, in one write."""
        if self.journal is not None and msgs:
            now = time.time()
            self.journal.append([events.record(events.RECEIVED, msg, now, **keyed(msg))
                                 for msg in msgs])  # fmt: skip

    def _commit(self, staged: list[tuple[int, str, Path]]) -> None:
        written = [
            path for _, msg_id, state in staged for path in (self.content_path(msg_id), state)
        ]
        if self.journal is not None and self.journal.path is not None:
            written.append(self.journal.path)  # where syncfs is missing: fsync'd with the rest
        flush(self.root, written, self.root / MSG)
        if self.journal is not None:
            self.journal.durable()
        for _, msg_id, state in staged:
            os.replace(state, self.state_path(msg_id))
        fsync_dir(self.root / QUEUE)

    def _stage(self, name: str, chunks: Iterable[bytes], *, sync: bool = False) -> Path:
        """Write chunks to a new file in tmp/ (fsync'd if sync); its path."""
        tmp = self.root / TMP / f"{name}.{secrets.token_hex(4)}"
        self._create(tmp, chunks, sync=sync)
        return tmp

    @staticmethod
    def _create(path: Path, chunks: Iterable[bytes | Spill], *, sync: bool = False) -> None:
        """Write chunks to a file that must not exist yet (fsync'd if sync); none on failure."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for chunk in chunks:
                if isinstance(chunk, Spill):
                    chunk.copy_into(fd)
                else:
                    write_all(fd, chunk)
            if sync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            unlink(path)
            raise
        os.close(fd)

    def _discard(self, msg_id: str) -> None:
        """Undo a failed accept; what cannot be removed now is removed by recover()."""
        for path in (self.state_path(msg_id), self.content_path(msg_id)):
            with contextlib.suppress(OSError):
                path.unlink()

    # --- state -------------------------------------------------------------------------------

    def load(self, msg_id: str, where: str = QUEUE) -> Message:
        path = self._state_file(msg_id, where)
        try:
            raw = read(path)
        except FileNotFoundError:
            raise SpoolError(f"{msg_id}: not in {where}") from None
        except OSError as exc:
            raise SpoolError(f"{msg_id}: cannot read {path}: {exc.strerror}") from None
        try:
            msg = Message.from_dict(json.loads(raw))
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptEntry(f"{path}: {exc}") from None
        if msg.id != msg_id:
            raise CorruptEntry(f"{path}: holds id {msg.id!r}")
        return msg

    def save(self, msg: Message) -> None:
        """Atomically replace the queue state of msg (write temp, fsync, rename, fsync dir)."""
        self._write(self.state_path(msg.id), [encode(msg)])

    def dead_letter(self, msg: Message) -> Message:
        """Merge msg's failed recipients into its dead-letter record; idempotent.

        The queue state is saved first by the caller, so a crash in between is repaired by
        calling this again when the message is next loaded.
        """
        record = self._dead_record(msg)
        known = {r.address: r for r in record.recipients}
        fresh = [r for r in msg.failed() if known.get(r.address) != r]
        if not fresh:
            return record
        for rcpt in fresh:
            known[rcpt.address] = rcpt
        record.recipients = list(known.values())
        record.dead_at = time.time()
        self._write(self.state_path(msg.id, DEAD), [encode(record)])
        return record

    def _dead_record(self, msg: Message) -> Message:
        try:
            return self.load(msg.id, DEAD)
        except CorruptEntry as exc:
            self.quarantine(msg.id, DEAD, str(exc))  # and start a fresh record
        except SpoolError:
            pass
        return Message(**{**vars(msg), "recipients": []})

    def remove(self, msg_id: str, where: str = QUEUE) -> None:
        """Remove a queue or dead-letter entry; its content goes when no other entry needs it."""
        self._sync_journal()
        self._unlink_entry(msg_id, where)
        fsync_dir(self.root / where)

    def remove_batch(self, ids: Sequence[str]) -> list[Failure]:
        """remove() for many finished queue entries with one directory fsync for all."""
        results: list[Failure] = [None] * len(ids)
        self._sync_journal()
        for index, msg_id in enumerate(ids):
            try:
                self._unlink_entry(msg_id, QUEUE)
            except OSError as exc:
                results[index] = exc
        fsync_dir(self.root / QUEUE)
        return results

    def _unlink_entry(self, msg_id: str, where: str) -> None:
        other = DEAD if where == QUEUE else QUEUE
        unlink(self.state_path(msg_id, where))
        if not self.state_path(msg_id, other).exists():
            unlink(self.content_path(msg_id))

    def requeue(self, msg_id: str, now: float) -> Message:
        """Move a dead-letter record's recipients back into the queue, due now.

        If the message still has live recipients in the queue they are kept; the failed ones
        come back as queued with their history (attempt counts, last reply) intact. Its
        `requeued` event (rcpts: the recipients brought back) is journaled first.
        """
        record = self.load(msg_id, DEAD)
        try:
            msg = self.load(msg_id)
        except CorruptEntry:
            raise
        except SpoolError:
            msg = record
        revived = {r.address for r in record.recipients}
        for rcpt in msg.recipients:
            if rcpt.address in revived:
                rcpt.status = "queued"
        msg.dead_at, msg.next_attempt, msg.attempts, msg.requeued_at = None, now, 0, now
        if self.journal is not None:
            rcpts = [r.address for r in msg.recipients if r.address in revived]
            self.journal.append([events.record(events.REQUEUED, msg, now, rcpts=rcpts)])
        self.save(msg)
        unlink(self.state_path(msg_id, DEAD))
        fsync_dir(self.root / DEAD)
        return msg

    # --- recovery (relay.spool.recovery) ---------------------------------------------------

    def quarantine(self, msg_id: str, where: str, reason: str) -> None:
        """Move an unreadable state file into corrupt/ (its content too unless still needed)."""
        recovery.quarantine(self, msg_id, where, reason)

    def recover(self) -> dict[str, int]:
        """Start-up repair with no intake running; counts for the log."""
        return recovery.recover(self)

    # --- durable writes (the one helper every write goes through) ----------------------------

    def _write(self, path: Path, chunks: Iterable[bytes]) -> None:
        """Write to tmp/, fsync, rename over `path`, fsync its directory; the journal's events
        first."""
        self._sync_journal()
        tmp = self._stage(path.name, chunks, sync=True)
        try:
            os.replace(tmp, path)
        except BaseException:
            unlink(tmp)
            raise
        fsync_dir(path.parent)


def keyed(msg: Message) -> dict[str, Any]:
    """A `received` event's idempotency fields: the key and content hash, when it has a key."""
    if msg.idempotency_key is None or msg.content_hash is None:
        return {}
    return {"idempotency_key": msg.idempotency_key, "content_hash": msg.content_hash}


def iter_messages(spool: Spool, where: str) -> Iterator[Message]:
    """Every readable entry of `where`, oldest first; unreadable ones are skipped."""
    for msg_id in spool.ids(where):
        with contextlib.suppress(SpoolError):
            yield spool.load(msg_id, where)
