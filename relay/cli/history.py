"""Command line, the history: `relay history rebuild` derives the message history again from
the event journal alone (docs/events.md), with the relay stopped."""

from __future__ import annotations

import argparse
import contextlib
import os

from relay.cli.fail import Fail
from relay.history import ingest
from relay.history.store import History
from relay.spool.run import DAEMON_LOCK, spool_lock
from relay.spool.store import Spool

EX_TEMPFAIL = 75


def rebuild(spool: Spool, args: argparse.Namespace) -> int:
    """Delete the history database and take the whole journal in again."""
    with spool_lock(spool, DAEMON_LOCK, wait=0) as offline:
        if not offline:
            raise Fail(
                "history rebuild: the relay is running and its API process writes the history; "
                "stop it first",
                EX_TEMPFAIL,
            )
        path = spool.history_path
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{path}{suffix}")
        history = History(path)
        try:
            events = ingest.catch_up(history, spool.events_dir)
            messages = history.count()
        finally:
            history.close()
    print(f"relay: history rebuilt from the event journal: {events} events, {messages} messages")
    return 0
