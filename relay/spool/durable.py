"""Spool, durable writes: the file primitives every spool write goes through (whole reads
and writes by plain system calls, fsync of files and directories, one syncfs for a batch)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

READ_SIZE = 64 * 1024  # bytes per read(2) of a state file (most fit in one)
_LIBC = ctypes.CDLL(None, use_errno=True)


def read(path: str) -> bytes:
    """A whole file by plain read(2)s: no buffer object, no tty probe, no seek."""
    fd = os.open(path, os.O_RDONLY)
    try:
        parts = [os.read(fd, READ_SIZE)]
        while len(parts[-1]) == READ_SIZE:
            parts.append(os.read(fd, READ_SIZE))
    finally:
        os.close(fd)
    return b"".join(parts)


def write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def flush(root: Path, paths: Sequence[Path], directory: Path) -> None:
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
    fsync_dir(directory)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_private(path: Path, text: str) -> None:
    """Replace a small file of secrets atomically and durably (written, fsync'd, renamed, its
    directory fsync'd: a crash leaves the old file or the new one), readable by its owner only
    (0600) and owned as the file it replaces, so the relay's user can still read a file that
    root rewrote."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            with contextlib.suppress(FileNotFoundError, PermissionError):
                before = path.stat()
                os.fchown(fh.fileno(), before.st_uid, before.st_gid)
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
