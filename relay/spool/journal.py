"""Spool, the event journal: a writer appending events as JSON lines to a file of its own in
spool/events/ (rotated by size and age), made durable before the change it describes, and the
reader of complete lines from an offset (docs/events.md)."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.spool.durable import fsync_dir, unlink

SUFFIX = ".jsonl"
ROTATE_BYTES = 64 * 1024 * 1024
ROTATE_SECONDS = 3600.0
READ_LIMIT = 4 * 1024 * 1024  # bytes a read() takes at most (more when one line is longer)
WRITER_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
INTAKE, SCHEDULER = "intake", "scheduler"  # the daemon's writers; a CLI's is cli_writer()
NAME_RE = re.compile(r"^([a-z][a-z0-9-]{0,31})\.(\d{16})\.jsonl$")
Event = dict[str, Any]


def cli_writer() -> str:
    """The writer name of a CLI command acting on a stopped spool: cli-<pid>."""
    return f"cli-{os.getpid()}"


def micros(moment_us: int) -> str:
    """A UTC time in µs as events carry it: ISO 8601 with microseconds and Z."""
    seconds, us = divmod(moment_us, 1_000_000)
    return f"{_second(seconds)}.{us:06d}Z"


@functools.lru_cache(maxsize=4)
def _second(seconds: int) -> str:
    """The date and time to the second (formatted once for all the events of that second)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


@dataclass
class _File:
    """The file a writer appends to: its descriptor (holding an exclusive flock while open),
    name, and how many of its bytes are written and known durable."""

    fd: int
    path: Path
    opened: float  # time.monotonic()
    written: int = 0
    synced: int = 0
    closed: bool = False


class Journal:
    """One writer's events: appended to spool/events/<writer>.<started>.jsonl, a new file at
    each start and after max_bytes or max_age, so a file has one writer that never comes back.

    Thread-safe: the scheduler appends on its event loop and syncs in worker threads; the
    intake appends in its group commit's thread."""

    def __init__(
        self,
        directory: Path,
        writer: str,
        staging: Path,
        *,
        max_bytes: int = ROTATE_BYTES,
        max_age: float = ROTATE_SECONDS,
    ) -> None:
        if not WRITER_RE.match(writer):
            raise ValueError(f"journal writer {writer!r} is not a name like intake or cli-42")
        self.directory = directory
        self.writer = writer
        self.staging = staging  # where a new file is made ready (the spool's tmp/)
        self.max_bytes = max_bytes
        self.max_age = max_age
        self._file: _File | None = None
        self._last_us = 0  # the last event's time: ids and timestamps strictly increase
        self._seq = 0  # events written to the current file
        self._lock = threading.Lock()  # the file, the clock and the counters
        self._syncing = threading.Lock()  # one fdatasync at a time, shared by its waiters

    @property
    def path(self) -> Path | None:
        """The file being appended to (None before the first event)."""
        return None if self._file is None else self._file.path

    def append(self, records: Iterable[Event]) -> list[str]:
        """Write records, each given its event_id and timestamp, as lines in one write(2);
        their ids. Not durable yet: sync(), or a syncfs of the spool, makes them so. On a
        failed write the file is given up (its last line may be torn; readers skip it) and
        the next append starts a new one."""
        records = list(records)
        if not records:
            return []
        with self._lock:
            file = self._current()
            ids, lines = [], []
            for record in records:
                self._last_us = max(time.time_ns() // 1000, self._last_us + 1)
                self._seq += 1
                event_id = f"{self._last_us:016d}-{file.path.name[: -len(SUFFIX)]}-{self._seq}"
                line = {"event_id": event_id, "event": record["event"],
                        "timestamp": micros(self._last_us), **record}  # fmt: skip
                lines.append(json.dumps(line, separators=(",", ":")))
                ids.append(event_id)
            self._write(file, ("\n".join(lines) + "\n").encode())
            return ids

    def sync(self) -> None:
        """Make every event appended so far durable (fdatasync), before a state change that
        they describe is written. Callers that sync together share one fdatasync: who waits
        for another's finds its events synced already."""
        with self._lock:
            file = self._file
            if file is None or file.synced >= file.written:
                return
            mine = file.written
        with self._syncing:
            with self._lock:
                if file.synced >= mine:  # another caller's fdatasync covered these events
                    return
                if file.closed:  # given up after a failed write, and its fdatasync failed
                    raise OSError(f"{file.path}: events written before a failure not durable")
                fd, target = os.dup(file.fd), file.written  # rotation may close file.fd
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
            with self._lock:
                file.synced = max(file.synced, target)

    def durable(self) -> None:
        """Everything appended before a syncfs of the spool's file system that has just
        returned is durable (the intake's group commit): a later sync() has nothing to do."""
        with self._lock:
            if self._file is not None:
                self._file.synced = self._file.written

    def close(self) -> None:
        """Flush and close the current file (a CLI command's end, a stop)."""
        with self._lock:
            if self._file is not None:
                self._retire(self._file)

    def _current(self) -> _File:
        """The file to append to: a new one at the first event and after a rotation."""
        file = self._file
        if file is not None and (
            file.written >= self.max_bytes or time.monotonic() - file.opened >= self.max_age
        ):
            self._retire(file)
            file = None
        if file is None:
            file = self._file = self._open()
            self._seq = 0
        return file

    def _open(self) -> _File:
        """A new file named by the writer and the time it is opened (µs; the next free µs if
        that name is taken). It is created and locked in the staging directory, then linked
        into the journal's: a reader never sees it unlocked while it is being written."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        staged = self.staging / f"journal.{self.writer}.{secrets.token_hex(4)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        fd = os.open(staged, flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
            started = max(time.time_ns() // 1000, self._last_us + 1)
            while True:
                path = self.directory / f"{self.writer}.{started:016d}{SUFFIX}"
                try:
                    os.link(staged, path)
                    break
                except FileExistsError:
                    started += 1
            fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            raise
        finally:
            unlink(staged)
        self._last_us = max(self._last_us, started)
        return _File(fd, path, time.monotonic())

    def _write(self, file: _File, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(file.fd, view) :]
        except BaseException:
            file.written += len(data) - len(view)
            with contextlib.suppress(OSError):  # what was written before stays durable
                self._retire(file)
            raise
        file.written += len(data)

    def _retire(self, file: _File) -> None:
        """Stop writing to file: its events made durable, then closed, which drops its lock,
        so readers know it is complete (a torn last line is then never finished)."""
        self._file = None
        try:
            if file.synced < file.written:
                os.fdatasync(file.fd)
                file.synced = file.written
        finally:
            file.closed = True
            os.close(file.fd)


# --- reading ----------------------------------------------------------------------------------


def files(directory: Path) -> list[Path]:
    """The journal's files, oldest first (by the time each was opened, then by writer)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = [(m.group(2), m.group(1), n) for n in names if (m := NAME_RE.match(n))]
    return [directory / name for _, _, name in sorted(found)]


def writer_of(path: Path) -> tuple[str, int]:
    """(writer, started in µs) from a journal file's name; ValueError if it is not one."""
    match = NAME_RE.match(path.name)
    if match is None:
        raise ValueError(f"{path.name}: not a journal file name")
    return match.group(1), int(match.group(2))


def read(path: Path, offset: int, limit: int = READ_LIMIT) -> tuple[list[Event], int]:
    """The complete events after byte offset (about limit bytes of them at most), and the
    offset to read on from. A line cut short at the end is left for the next read while its
    writer may still finish it, and skipped once the file is no longer written (its writer
    closed it or died: the torn last line of a crash). A line that is not a JSON object
    (only a damaged disk makes one) is skipped."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        finished = _finished(fd)  # then the size is final: nothing is written after it
        available = os.fstat(fd).st_size - offset
        data = os.pread(fd, max(0, min(available, limit)), offset)
        while b"\n" not in data and 0 < len(data) < available:  # a line longer than limit
            data += os.pread(fd, min(available - len(data), limit), offset + len(data))
    finally:
        os.close(fd)
    cut = data.rfind(b"\n") + 1
    events = [e for line in data[:cut].split(b"\n") if (e := _parse(line)) is not None]
    torn = finished and len(data) == available
    return events, offset + (len(data) if torn else cut)


def _finished(fd: int) -> bool:
    """No writer holds the file: its lock is free (the writer closed it or died). A file
    system without flock makes every file look written: a torn line then stays unread."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def finished(path: Path) -> bool:
    """No writer holds the journal file at path: it is never appended to again."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _finished(fd)
    finally:
        os.close(fd)


def _parse(line: bytes) -> Event | None:
    if not line:
        return None
    with contextlib.suppress(ValueError):
        event = json.loads(line)
        if isinstance(event, dict):
            return event
    return None
