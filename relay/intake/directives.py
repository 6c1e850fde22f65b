"""Intake, directives: the X-Relay-* header fields an application may set to steer its
message (X-Relay-Send-At, X-Relay-Priority, X-Relay-Batch-Id, X-Relay-Idempotency-Key), read and
removed before the message is signed and spooled."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from relay.config.lanes import LANES

SEND_AT = b"x-relay-send-at"
PRIORITY = b"x-relay-priority"
BATCH_ID = b"x-relay-batch-id"
IDEMPOTENCY_KEY = b"x-relay-idempotency-key"
NAMES = {SEND_AT: "X-Relay-Send-At", PRIORITY: "X-Relay-Priority", BATCH_ID: "X-Relay-Batch-Id",
         IDEMPOTENCY_KEY: "X-Relay-Idempotency-Key"}  # fmt: skip
BATCH_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
KEY_RE = re.compile(r"^[\x20-\x7e]{1,256}$")  # printable ASCII
HEADER_END = re.compile(rb"\r\n\r\n")
EPOCH_RE = re.compile(r"^\d{1,12}(\.\d+)?$")


class DirectiveError(ValueError):
    """A directive the relay cannot follow; str() is the whole SMTP reply."""


@dataclass(frozen=True)
class Directives:
    send_at: float | None = None  # UTC epoch seconds; None = as soon as possible
    priority: str | None = None  # high | normal | low; None = not asked (or not honoured)
    batch_id: str | None = None  # the application's batch this message belongs to
    idempotency_key: str | None = None  # one message per key (relay.intake.idempotency)


def extract(content: bytes, *, priority: bool = True) -> tuple[bytes, Directives]:
    """The message without its X-Relay-* fields, and what they asked for.

    With priority False (lanes.header off) X-Relay-Priority is still removed, since it is an
    instruction to this relay and never meant for the recipient (and the message leaves the
    same whichever way the operator sets it), but it is neither read nor validated: no client
    is refused for a field the operator chose to ignore."""
    end = HEADER_END.search(content)
    head_len = end.start() + 2 if end else len(content)
    fields = _fields(content[:head_len])
    if not any(name in NAMES for name, _ in fields):
        return content, Directives()
    send_at = _single(fields, SEND_AT)
    asked = _single(fields, PRIORITY) if priority else None
    batch_id = _single(fields, BATCH_ID)
    key = _single(fields, IDEMPOTENCY_KEY)
    kept = b"".join(raw for name, raw in fields if name not in NAMES)
    return kept + content[head_len:], Directives(
        send_at=None if send_at is None else parse_time(send_at),
        priority=None if asked is None else parse_priority(asked),
        batch_id=None if batch_id is None else parse_batch_id(batch_id),
        idempotency_key=None if key is None else parse_key(key),
    )


def without(content: bytes, names: frozenset[bytes]) -> bytes:
    """content without the header fields named (lowercase) in names."""
    end = HEADER_END.search(content)
    head_len = end.start() + 2 if end else len(content)
    kept = b"".join(raw for name, raw in _fields(content[:head_len]) if name not in names)
    return kept + content[head_len:]


def _single(fields: list[tuple[bytes, bytes]], wanted: bytes) -> str | None:
    """The value of the one field named wanted, None without one; DirectiveError for two."""
    values = [_value(raw) for name, raw in fields if name == wanted]
    if len(values) > 1:
        raise DirectiveError(f"550 5.6.0 More than one {NAMES[wanted]} header field")
    return values[0] if values else None


def _fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """(lowercase name, raw bytes) of each header field; a line starting with white space
    continues the field before it (RFC 5322 §2.2.3)."""
    fields: list[list[bytes]] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        else:
            fields.append([line])
    return [(lines[0].partition(b":")[0].strip().lower(), b"".join(lines)) for lines in fields]


def _value(raw: bytes) -> str:
    return " ".join(raw.partition(b":")[2].decode("utf-8", "replace").split())


def parse_time(text: str) -> float:
    """RFC 3339 with a zone (2026-11-22T09:00:00Z) or Unix epoch seconds."""
    if EPOCH_RE.match(text):
        return float(text)
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise DirectiveError(
            f"550 5.6.0 X-Relay-Send-At: {text[:64]!r} is not an RFC 3339 time with a zone "
            "(2026-11-22T09:00:00Z) or Unix epoch seconds"
        )
    return moment.timestamp()


def parse_priority(text: str) -> str:
    """high, normal or low, in any case."""
    if text.lower() not in LANES:
        raise DirectiveError(
            f"550 5.6.0 X-Relay-Priority: {text[:64]!r} is not a priority (use {', '.join(LANES)})"
        )
    return text.lower()


def parse_batch_id(text: str) -> str:
    """1 to 64 letters, digits, dots, underscores and hyphens, kept as given."""
    return _matching(
        BATCH_ID_RE, "X-Relay-Batch-Id", text, "a batch id (1-64 of A-Z a-z 0-9 . _ -)"
    )


def parse_key(text: str) -> str:
    """1 to 256 printable ASCII characters (space included), kept as given."""
    return _matching(
        KEY_RE, "X-Relay-Idempotency-Key", text,
        "an idempotency key (1-256 printable ASCII characters)",
    )  # fmt: skip


def _matching(pattern: re.Pattern[str], name: str, text: str, what: str) -> str:
    """text if pattern matches it; else the 550 naming the field and what it must be."""
    if not pattern.match(text):
        raise DirectiveError(f"550 5.6.0 {name}: {text[:64]!r} is not {what}")
    return text
