"""Spool stage: the on-disk queue (content, state, dead letters), its atomic transitions and its
start-up recovery; the only module that touches spool files."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay.mail.reply import Reply
from relay.observe import logs

FORMAT_VERSION = 1
ID_RE = re.compile(r"^[0-9a-f]{20}$")
QUEUE, DEAD, MSG, TMP, CORRUPT, RUN = "queue", "dead", "msg", "tmp", "corrupt", "run"
STATE_SUFFIX = ".json"
FINAL = frozenset({"delivered", "failed", "expired", "deleted"})
HISTORY_LIMIT = 100  # attempts kept per recipient (the oldest are dropped beyond that)
READ_SIZE = 64 * 1024  # bytes per read(2) of a state file (most fit in one)
FAILED = frozenset({"failed", "expired"})
Failure = BaseException | None  # a batch operation's result for one item
COPY_SIZE = 256 * 1024  # bytes per read or copy of a spill file
# copy_file_range(2) cannot serve these files (another file system, an old kernel, …).
NO_COPY_RANGE = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})
_LIBC = ctypes.CDLL(None, use_errno=True)


class SpoolError(Exception):
    """A spool operation failed (I/O, missing entry, unreadable state)."""


class CorruptEntry(SpoolError):
    """A state file exists but cannot be parsed or is inconsistent."""


def new_id() -> str:
    """Sortable by arrival (48-bit milliseconds) and unique (32 random bits); safe as file name."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(4)}"


def is_id(text: str) -> bool:
    return ID_RE.match(text) is not None


@dataclass
class Recipient:
    """One envelope recipient and everything known about its delivery."""

    address: str
    status: str = "queued"  # queued | deferred | delivered | failed | expired | deleted
    attempts: int = 0
    first_attempt: float | None = None
    last_attempt: float | None = None
    reply: Reply | None = None
    mx: str | None = None
    ip: str | None = None
    # One entry per attempt: {"at", "outcome", "reply", "mx", "ip", "tls"}.
    history: list[dict[str, Any]] = field(default_factory=list)

    def record(self, at: float, outcome: str, reply: Reply, mx: str | None, ip: str | None,
               tls: bool) -> None:  # fmt: skip
        """Apply one attempt's result: status, counters, last reply and the history line."""
        self.status = outcome
        self.attempts += 1
        self.first_attempt = self.first_attempt or at
        self.last_attempt = at
        self.reply, self.mx, self.ip = reply, mx, ip
        entry = {"at": at, "outcome": outcome, "reply": reply.as_dict(), "mx": mx, "ip": ip}
        self.history = [*self.history, {**entry, "tls": tls}][-HISTORY_LIMIT:]

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def as_dict(self) -> dict[str, Any]:
        data = dict(vars(self))
        data["domain"] = self.domain
        data["reply"] = self.reply.as_dict() if self.reply else None
        if self.status in FAILED:
            data["reason"] = "permanent" if self.status == "failed" else "expired"
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipient:
        reply = data.get("reply")
        return cls(
            address=str(data["address"]),
            status=str(data.get("status", "queued")),
            attempts=int(data.get("attempts", 0)),
            first_attempt=data.get("first_attempt"),
            last_attempt=data.get("last_attempt"),
            reply=Reply.from_dict(reply) if reply else None,
            mx=data.get("mx"),
            ip=data.get("ip"),
            history=list(data.get("history") or []),
        )


@dataclass
class Message:
    """The envelope and delivery state of one queued message (never its content)."""

    id: str
    sender: str
    recipients: list[Recipient]
    queued_at: float
    next_attempt: float
    size: int = 0
    attempts: int = 0
    smtputf8: bool = False
    client: dict[str, str] = field(default_factory=dict)
    dead_at: float | None = None
    requeued_at: float | None = None  # a requeue from the dead letters starts a fresh max_age
    held: bool = False  # `relay queue hold`: never attempted until released
    send_at: float | None = None  # X-Relay-Send-At: not attempted before this UTC time
    lane: str = "normal"  # priority lane: high | normal | low
    quota_until: float | None = None  # over its sending quota: not attempted before this time

    @property
    def born(self) -> float:
        """Start of the message's max_age window: its arrival, its scheduled time, the end of
        its quota wait, or its requeue from the dead letters."""
        return self.requeued_at or max(self.queued_at, self.send_at or 0.0, self.quota_until or 0.0)

    def scheduled(self, now: float) -> bool:
        """Waiting for its X-Relay-Send-At time."""
        return self.send_at is not None and self.send_at > now

    def over_quota(self, now: float) -> bool:
        """Waiting for room in its sending quota."""
        return self.quota_until is not None and self.quota_until > now

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if not r.final]

    def failed(self) -> list[Recipient]:
        return [r for r in self.recipients if r.status in FAILED]

    def as_dict(self) -> dict[str, Any]:
        data = dict(vars(self))
        data["version"] = FORMAT_VERSION
        data["recipients"] = [r.as_dict() for r in self.recipients]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Message:
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"unknown format version {data.get('version')!r}")
        recipients = [Recipient.from_dict(r) for r in data["recipients"]]
        if not recipients:
            raise ValueError("no recipients")
        return cls(
            id=str(data["id"]),
            sender=str(data["sender"]),
            recipients=recipients,
            queued_at=float(data["queued_at"]),
            next_attempt=float(data["next_attempt"]),
            size=int(data.get("size", 0)),
            attempts=int(data.get("attempts", 0)),
            smtputf8=bool(data.get("smtputf8", False)),
            client=dict(data.get("client") or {}),
            dead_at=data.get("dead_at"),
            requeued_at=data.get("requeued_at"),
            held=bool(data.get("held", False)),
            send_at=data.get("send_at"),
            lane=str(data.get("lane", "normal")),
            quota_until=data.get("quota_until"),
        )


@dataclass(frozen=True)
class Space:
    """Room on the spool's file system as statvfs(3) gives it to an unprivileged process: the
    blocks and inodes reserved for root (ext4's 5%) are not free."""

    free_bytes: int
    total_bytes: int
    free_inodes: int
    total_inodes: int  # 0: the file system has no fixed inode count (btrfs)


class Spill:
    """The body of a message while it arrives, beyond what its session keeps in memory: a file
    in tmp/ without a name (O_TMPFILE, or unlinked at once where the file system lacks it), so
    that a cut session, a refusal or a crash leaves nothing behind. Its bytes are copied into
    msg/<id> when the message is accepted. Its methods run in worker threads; close() from the
    event loop waits for none of them: the descriptor is closed when the last one is done."""

    def __init__(self, directory: Path) -> None:
        try:
            self._fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
        except (AttributeError, IsADirectoryError, NotADirectoryError):  # no O_TMPFILE here
            path = directory / f"spill.{secrets.token_hex(8)}"
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            _unlink(path)
        self.size = 0
        self._lock = threading.Lock()
        self._users = 0
        self._closed = False

    def write(self, data: bytes | bytearray) -> None:
        with self._using() as fd:
            _write_all(fd, data)
            self.size += len(data)

    def chunks(self) -> Iterator[bytes]:
        """The bytes written, COPY_SIZE at a time."""
        with self._using() as fd:
            for offset in range(0, self.size, COPY_SIZE):
                yield os.pread(fd, COPY_SIZE, offset)

    def copy_into(self, target: int) -> None:
        """Append every byte written to the file open as target, inside the kernel where it
        can (copy_file_range), else through a buffer; OSError if fewer bytes were there."""
        with self._using() as fd:
            copied = 0
            try:
                while copied < self.size:
                    step = os.copy_file_range(fd, target, self.size - copied, copied)
                    if step == 0:
                        break
                    copied += step
            except OSError as exc:
                if exc.errno not in NO_COPY_RANGE:
                    raise
                os.lseek(target, -copied, os.SEEK_CUR)  # start again through a buffer
                copied = 0
                for data in self.chunks():
                    _write_all(target, data)
                    copied += len(data)
        if copied != self.size:
            raise OSError(f"spill file ends at {copied} of {self.size} bytes")

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._release()

    @contextlib.contextmanager
    def _using(self) -> Iterator[int]:
        with self._lock:
            if self._closed:
                raise OSError(f"spill file already closed ({self.size} bytes)")
            self._users += 1
        try:
            yield self._fd
        finally:
            with self._lock:
                self._users -= 1
                self._release()

    def _release(self) -> None:
        """Close the descriptor once it is closed and unused (the lock held)."""
        if self._closed and self._users == 0:
            os.close(self._fd)


Content = Sequence[bytes | Spill]  # a message's content in order, as it is written to msg/


class Spool:
    """A spool directory; see docs/spool.md for the format and the order of every write."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._run_fd: int | None = None
        self._space: tuple[float, Space] | None = None  # the last reading, by monotonic time

    # --- layout ------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the directory tree (0700) if it does not exist yet."""
        for name in (QUEUE, DEAD, MSG, TMP, CORRUPT, RUN):
            (self.root / name).mkdir(mode=0o700, parents=True, exist_ok=True)

    def content_path(self, msg_id: str) -> Path:
        return self.root / MSG / msg_id

    def state_path(self, msg_id: str, where: str = QUEUE) -> Path:
        return Path(self._state_file(msg_id, where))

    def _state_file(self, msg_id: str, where: str) -> str:
        """state_path() as a plain string: pathlib's joins cost a fifth of indexing a large
        queue, so load() uses this."""
        return f"{self.root}/{where}/{msg_id}{STATE_SUFFIX}"

    def run_path(self, name: str) -> Path:
        return self.root / RUN / name

    def socket_address(self, name: str) -> str:
        """A path for a UNIX socket in run/ that fits sun_path (108 bytes) however deep the
        spool is, through this process's descriptor of the run/ directory when needed."""
        full = str(self.run_path(name))
        if len(full) < 100:
            return full
        if self._run_fd is None:
            self._run_fd = os.open(self.root / RUN, os.O_RDONLY | os.O_DIRECTORY)
        return f"/proc/self/fd/{self._run_fd}/{name}"

    def space(self, max_age: float = 0.0) -> Space:
        """The file system's free and total bytes and inodes; a reading younger than max_age
        seconds is reused (one statvfs a second is enough to see a disk fill, and MAIL FROM
        asks at every transaction). OSError if the spool is gone."""
        now = time.monotonic()
        if self._space is not None and now - self._space[0] < max_age:
            return self._space[1]
        st = os.statvfs(self.root)
        space = Space(st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize, st.f_favail, st.f_files)
        self._space = (now, space)
        return space

    def ids(self, where: str = QUEUE) -> list[str]:
        """Ids with a state file in `where`, oldest first."""
        names = os.listdir(self.root / where)
        return sorted(n[: -len(STATE_SUFFIX)] for n in names if n.endswith(STATE_SUFFIX))

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
        (DESIGN invariant 1). A content of None was written by write_content(). A result per
        message: None, or its error."""
        results: list[Failure] = [None] * len(batch)
        staged: list[tuple[int, str, Path]] = []
        for index, (msg, content) in enumerate(batch):
            try:
                if content is not None:
                    self._create(self.content_path(msg.id), content)
                staged.append((index, msg.id, self._stage(msg.id, [_encode(msg)])))
            except OSError as exc:
                results[index] = exc
                self._discard(msg.id)
        try:
            self._commit(staged)
        except OSError as exc:
            for index, msg_id, state in staged:
                results[index] = exc
                _unlink(state)
                self._discard(msg_id)
        return results

    def _commit(self, staged: list[tuple[int, str, Path]]) -> None:
        written = [
            path for _, msg_id, state in staged for path in (self.content_path(msg_id), state)
        ]
        _flush(self.root, written, self.root / MSG)
        for _, msg_id, state in staged:
            os.replace(state, self.state_path(msg_id))
        _fsync_dir(self.root / QUEUE)

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
                    _write_all(fd, chunk)
            if sync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink(path)
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
            raw = _read(path)
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
        self._write(self.state_path(msg.id), [_encode(msg)])

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
        self._write(self.state_path(msg.id, DEAD), [_encode(record)])
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
        self._unlink_entry(msg_id, where)
        _fsync_dir(self.root / where)

    def remove_batch(self, ids: Sequence[str]) -> list[Failure]:
        """remove() for many finished queue entries with one directory fsync for all."""
        results: list[Failure] = [None] * len(ids)
        for index, msg_id in enumerate(ids):
            try:
                self._unlink_entry(msg_id, QUEUE)
            except OSError as exc:
                results[index] = exc
        _fsync_dir(self.root / QUEUE)
        return results

    def _unlink_entry(self, msg_id: str, where: str) -> None:
        other = DEAD if where == QUEUE else QUEUE
        _unlink(self.state_path(msg_id, where))
        if not self.state_path(msg_id, other).exists():
            _unlink(self.content_path(msg_id))

    def requeue(self, msg_id: str, now: float) -> Message:
        """Move a dead-letter record's recipients back into the queue, due now.

        If the message still has live recipients in the queue they are kept; the failed ones
        come back as queued with their history (attempt counts, last reply) intact.
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
        self.save(msg)
        _unlink(self.state_path(msg_id, DEAD))
        _fsync_dir(self.root / DEAD)
        return msg

    # --- recovery ----------------------------------------------------------------------------

    def quarantine(self, msg_id: str, where: str, reason: str) -> None:
        """Move an unreadable state file into corrupt/ with a log line; its content goes too
        unless the other state (queue or dead) still needs it."""
        target = self.root / CORRUPT
        other = DEAD if where == QUEUE else QUEUE
        paths = [self.state_path(msg_id, where)]
        if not self.state_path(msg_id, other).exists():
            paths.append(self.content_path(msg_id))
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, target / f"{where}.{path.name}")
        _fsync_dir(target)
        logs.event("quarantined", level="warning", id=msg_id, where=where, reason=reason)

    def recover(self) -> dict[str, int]:
        """Start-up repair with no intake running: drop temp files and never-acknowledged
        content, quarantine state whose content is missing. Returns counts for the log.

        It compares directory listings only, so it takes seconds even for a million messages;
        a state file that cannot be parsed is quarantined by whoever reads it first (the
        scheduler's index, or a dead-letter merge)."""
        counts = {"temp_removed": 0, "orphans_removed": 0, "quarantined": 0}
        for name in os.listdir(self.root / TMP):
            _unlink(self.root / TMP / name)
            counts["temp_removed"] += 1
        queued, dead = set(self.ids(QUEUE)), set(self.ids(DEAD))
        contents = set(os.listdir(self.root / MSG))
        for where, ids in ((QUEUE, queued), (DEAD, dead)):
            for msg_id in sorted(ids - contents):
                missing = f"content file {self.content_path(msg_id)} is missing"
                self.quarantine(msg_id, where, missing)
                counts["quarantined"] += 1
        for msg_id in contents - queued - dead:
            # Content without state was never acknowledged: the state is written last.
            _unlink(self.content_path(msg_id))
            counts["orphans_removed"] += 1
        return counts

    # --- durable writes (the one helper every write goes through) ----------------------------

    def _write(self, path: Path, chunks: Iterable[bytes]) -> None:
        """Write to tmp/, fsync, rename over `path`, fsync its directory."""
        tmp = self._stage(path.name, chunks, sync=True)
        try:
            os.replace(tmp, path)
        except BaseException:
            _unlink(tmp)
            raise
        _fsync_dir(path.parent)


def iter_messages(spool: Spool, where: str) -> Iterator[Message]:
    """Every readable entry of `where`, oldest first; unreadable ones are skipped."""
    for msg_id in spool.ids(where):
        with contextlib.suppress(SpoolError):
            yield spool.load(msg_id, where)


def _encode(msg: Message) -> bytes:
    return json.dumps(msg.as_dict(), separators=(",", ":")).encode()


def _read(path: str) -> bytes:
    """A whole file by plain read(2)s: no buffer object, no tty probe, no seek."""
    fd = os.open(path, os.O_RDONLY)
    try:
        parts = [os.read(fd, READ_SIZE)]
        while len(parts[-1]) == READ_SIZE:
            parts.append(os.read(fd, READ_SIZE))
    finally:
        os.close(fd)
    return b"".join(parts)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _flush(root: Path, paths: Sequence[Path], directory: Path) -> None:
    """Make the data of paths and the entries of directory durable: one syncfs(2) of the
    spool's file system for all of them where the C library has it (Linux), else an fsync
    each."""
    syncfs = getattr(_LIBC, "syncfs", None)
    if syncfs is not None:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if syncfs(fd) != 0:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code))
        finally:
            os.close(fd)
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_dir(directory)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
