"""Webhooks, their status: each configured endpoint's state, events pending and parked, lag and
last error, read from its outbox without ever making one (`relay webhook list` and the status
page)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from relay.config.webhooks import WebhookConfig
from relay.hooks.outbox import Outbox
from relay.hooks.sender import backlog_fields
from relay.hooks.service import outbox_path

# A hook the hooks worker never ran with: nothing owed yet.
NO_OUTBOX: Mapping[str, Any] = {
    "pending": 0, "parked": 0, "lag_seconds": 0.0, "disabled": None, "last_error": None
}  # fmt: skip


class Unreadable(Exception):
    """An outbox that exists but cannot be opened or read; str() names its file."""


@contextlib.contextmanager
def opened(hooks_dir: Path, name: str) -> Iterator[Outbox | None]:
    """The hook's outbox, or None while it has none (the hooks worker never ran with it): a
    new outbox starts at the journal's end, so a reader must never be the one to make it."""
    path = outbox_path(hooks_dir, name)
    if not path.exists():
        yield None
        return
    try:
        outbox = Outbox(path)
    except (OSError, sqlite3.Error) as exc:
        raise Unreadable(f"{path}: cannot open: {exc}") from None
    try:
        yield outbox
    except sqlite3.Error as exc:
        raise Unreadable(f"{path}: {exc}") from None
    finally:
        outbox.close()


def describe(hooks_dir: Path, hook: WebhookConfig) -> dict[str, Any]:
    """One hook as `relay webhook list --json` shows it; Unreadable if its outbox is."""
    with opened(hooks_dir, hook.name) as outbox:
        fields = NO_OUTBOX if outbox is None else backlog_fields(outbox)
    return {
        "name": hook.name,
        "url": hook.url,
        "state": "active" if fields["disabled"] is None else "disabled",
        **fields,
    }
