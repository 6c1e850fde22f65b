"""Spool, spill files: the body of a message while it arrives, in a nameless file in tmp/
that nothing can find and that vanishes with its last descriptor."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from relay.spool.durable import unlink, write_all

COPY_SIZE = 256 * 1024  # bytes per read or copy of a spill file
# copy_file_range(2) cannot serve these files (another file system, an old kernel, …).
NO_COPY_RANGE = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})


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
            unlink(path)
        self.size = 0
        self._lock = threading.Lock()
        self._users = 0
        self._closed = False

    def write(self, data: bytes | bytearray) -> None:
        with self._using() as fd:
            write_all(fd, data)
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
                    write_all(target, data)
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
