"""Spool, the maildrop: the directory `relay sendmail` drops messages into (written by any local
user, read by the relay alone, docs/sendmail.md) and the daemon picks them up from; one file a
message, a JSON envelope line and then the message, untrusted until the intake took it."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MODE = 0o3733  # setgid (files get the relay's group), sticky, write-only for others
FILE_MODE = 0o640  # its owner and the relay's group
REJECTED = "rejected"
ENVELOPE_MAX = 1024 * 1024  # bytes of the envelope line
STALE = 3600.0  # a temporary file this old was left by a killed writer
VERSION = 1


class Malformed(ValueError):
    """A dropped file the relay cannot take: why, in one line."""


@dataclass(frozen=True)
class Envelope:
    """What `relay sendmail` was asked: the envelope sender ("" for <>), the recipients and the
    DSN parameters (RFC 3461; None: not given)."""

    sender: str
    recipients: list[str]
    ret: str | None = None
    envid: str | None = None
    notify: list[str] | None = None


@dataclass(frozen=True)
class Dropped:
    """One file picked up: its envelope, the message, and the local user who wrote it (the
    file's owner, whatever the envelope line says)."""

    name: str
    envelope: Envelope
    data: bytes
    uid: int
    at: float  # when it was dropped (from the file: the same each time it is read)


def drop(directory: Path, envelope: Envelope, data: bytes) -> str:
    """Write one message durably; its name. OSError when the directory cannot take it."""
    name = f"{time.time_ns():x}.{secrets.token_hex(8)}"
    temporary = directory / f".{name}.tmp"
    at = time.time()
    line = json.dumps({"version": VERSION, **asdict(envelope), "size": len(data), "at": at})
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(line.encode() + b"\n" + data)
            out.flush()
            os.fsync(out.fileno())
        os.rename(temporary, directory / name)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    _sync_directory(directory)
    return name


def _sync_directory(directory: Path) -> None:
    """fsync the directory, where we may read it (the relay's group, root); others cannot open
    it, and their file's fsync commits its creation on ext4 and xfs (docs/sendmail.md)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except PermissionError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def waiting(directory: Path, now: float | None = None) -> list[Path]:
    """The files to pick up, oldest first; temporary files left by killed writers go."""
    now = time.time() if now is None else now
    found: list[tuple[float, Path]] = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if not entry.is_file(follow_symlinks=False):
                continue
            mtime = entry.stat(follow_symlinks=False).st_mtime
            if not entry.name.startswith("."):
                found.append((mtime, Path(entry.path)))
            elif entry.name.endswith(".tmp") and now - mtime > STALE:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
    return [path for _, path in sorted(found)]


def read(path: Path, max_size: int) -> Dropped:
    """One dropped file, checked as untrusted input; Malformed says what is wrong."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as file:
        uid = os.fstat(file.fileno()).st_uid
        line = file.readline(ENVELOPE_MAX + 1)
        data = file.read(max_size + 1) if max_size else file.read()
    if not line.endswith(b"\n"):
        raise Malformed("no envelope line (or one over 1 MiB)")
    if max_size and len(data) > max_size:
        raise Malformed(f"the message is over smtp.max_message_size ({max_size} bytes)")
    header = _header(line)
    if header.get("size") != len(data):
        raise Malformed(f"{len(data)} bytes of message, the envelope says {header.get('size')}")
    envelope, at = envelope_of(header), header.get("at")
    if not isinstance(at, int | float):
        raise Malformed("the envelope has no time it was dropped at")
    return Dropped(path.name, envelope, data, uid, float(at))


def _header(line: bytes) -> dict[str, Any]:
    try:
        header = json.loads(line)
    except ValueError:
        raise Malformed("the envelope line is not JSON") from None
    if not isinstance(header, dict) or header.get("version") != VERSION:
        raise Malformed(f"not a maildrop file of version {VERSION}")
    return header


def envelope_of(header: dict[str, Any]) -> Envelope:
    """The envelope of a file's header, each field of its type; Malformed if not."""
    sender, rcpts = header.get("sender"), header.get("recipients")
    if not isinstance(sender, str) or not isinstance(rcpts, list) or not rcpts:
        raise Malformed("the envelope needs a sender and at least one recipient")
    if not all(isinstance(r, str) and r for r in rcpts):
        raise Malformed("a recipient is not an address")
    notify = header.get("notify")
    if notify is not None and not (
        isinstance(notify, list) and all(isinstance(n, str) for n in notify)
    ):
        raise Malformed("notify is not a list of words")
    for name in ("ret", "envid"):
        if header.get(name) is not None and not isinstance(header.get(name), str):
            raise Malformed(f"{name} is not text")
    return Envelope(sender, rcpts, header.get("ret"), header.get("envid"), notify)


def too_many(recipients: list[str], limit: int) -> str | None:
    """Why a message with these recipients cannot be taken in one transaction of the intake
    (smtp.max_recipients: it would answer the rest 452, at every try), or None."""
    if len(recipients) <= limit:
        return None
    return f"{len(recipients)} recipients, more than smtp.max_recipients ({limit})"


def is_text(value: Any) -> bool:
    return isinstance(value, str)


def reject(path: Path) -> Path:
    """Move a file the relay cannot take into rejected/ (made 0700 if missing); its new path."""
    rejected = path.parent / REJECTED
    rejected.mkdir(mode=0o700, exist_ok=True)
    target = rejected / path.name
    os.rename(path, target)
    return target
