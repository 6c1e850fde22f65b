"""Suppression, the check: whether a recipient is on its tenant's list, as the intake asks at
RCPT and the scheduler before every attempt, from a read-only connection to the store opened
at the first question. A store that cannot be read suppresses nothing (logged): a broken list
must not stop the mail."""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

from relay.config.suppression import SuppressionConfig
from relay.observe import logs, metrics
from relay.suppression.store import SHARED, Entry, Suppressions

REPLY_SUPPRESSED = "550 5.7.1 <{}>: recipient suppressed ({} since {})"


def since(entry: Entry) -> str:
    """The UTC day the entry was made: YYYY-MM-DD."""
    return datetime.fromtimestamp(entry.created, UTC).strftime("%Y-%m-%d")


def refusal_of(address: str, entry: Entry) -> str:
    """The RCPT reply refusing address for entry."""
    return REPLY_SUPPRESSED.format(address, entry.kind, since(entry))


class Check:
    """The lists as one process reads them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.store: Suppressions | None = None

    def find(
        self, cfg: SuppressionConfig, tenant: str, address: str, now: float | None = None
    ) -> Entry | None:
        """The live entry suppressing address for tenant (the shared list's while
        suppression.shared is on), or None."""
        try:
            if self.store is None:
                self.store = Suppressions(self.path, reader=True)
            key = SHARED if cfg.shared else tenant
            return self.store.find(key, address, time.time() if now is None else now)
        except sqlite3.Error as exc:
            logs.failure("suppression", exc, path=str(self.path))
            self.close()
            return None

    def refusal(self, cfg: SuppressionConfig, tenant: str, address: str) -> str | None:
        """The RCPT reply for a suppressed recipient while suppression.action is reject;
        None to take it (with accept, the scheduler drops it before any attempt)."""
        if cfg.action != "reject":
            return None
        entry = self.find(cfg, tenant, address.strip("<>"))
        if entry is None:
            return None
        metrics.SUPPRESSED.labels("rcpt").inc()
        return refusal_of(address.strip("<>"), entry)

    def close(self) -> None:
        if self.store is not None:
            store, self.store = self.store, None
            store.close()
