"""Intake stage, directives: the X-Relay-* header fields an application may set to steer its
message (today X-Relay-Send-At), read and removed before the message is signed and spooled."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

SEND_AT = b"x-relay-send-at"
HEADER_END = re.compile(rb"\r\n\r\n")
EPOCH_RE = re.compile(r"^\d{1,12}(\.\d+)?$")


class DirectiveError(ValueError):
    """A directive the relay cannot follow; str() is the whole SMTP reply."""


@dataclass(frozen=True)
class Directives:
    send_at: float | None = None  # UTC epoch seconds; None = as soon as possible


def extract(content: bytes) -> tuple[bytes, Directives]:
    """The message without its X-Relay-* fields, and what they asked for."""
    end = HEADER_END.search(content)
    head_len = end.start() + 2 if end else len(content)
    fields = _fields(content[:head_len])
    values = [_value(raw) for name, raw in fields if name == SEND_AT]
    if not values:
        return content, Directives()
    if len(values) > 1:
        raise DirectiveError("550 5.6.0 More than one X-Relay-Send-At header field")
    kept = b"".join(raw for name, raw in fields if name != SEND_AT)
    return kept + content[head_len:], Directives(send_at=parse_time(values[0]))


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
