"""Webhooks, the service: every configured endpoint's sender and outbox (spool `hooks/`), their
secrets read again when the file changes, each try counted and logged, and the backlog gauges
refreshed; what the hooks worker runs (relay/daemon/workers.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path

from relay.config import webhooks as settings
from relay.config.webhooks import WebhookConfig
from relay.hooks import payload
from relay.hooks.outbox import Outbox
from relay.hooks.sender import Report, Sender, backlog_fields
from relay.observe import logs, metrics
from relay.spool import cursor

GAUGES_EVERY = 1.0  # seconds between refreshes of the backlog gauges
RESULTS = {payload.DONE: "delivered", payload.RETRY: "retry", payload.FAILED: "failed",
           payload.GONE: "gone"}  # fmt: skip


def outbox_path(hooks_dir: Path, name: str) -> Path:
    return hooks_dir / f"{name}.sqlite"


def opened(path: Path, events_dir: Path) -> Outbox:
    """The endpoint's outbox; a new endpoint's starts at the journal's end: it is sent what
    happens from now on, not the retention window's past (`relay webhook replay` is not for
    events it never had)."""
    fresh = not path.exists()
    outbox = Outbox(path)
    if fresh:
        cursor.catch_up(
            outbox, events_dir, lambda file, _, offset: outbox.take(file, [], offset, bool)
        )
    return outbox


class Secrets:
    """One endpoint's secret file, read again when its size or time changes; a file that
    cannot be read keeps the last good secrets (and is logged once per change)."""

    def __init__(self, hook: WebhookConfig) -> None:
        self.hook = hook
        self.stamp: tuple[int, int] | None = None
        self.secrets: list[str] = []

    def __call__(self) -> list[str]:
        path = self.hook.secret_file
        with contextlib.suppress(OSError):
            stat = path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp != self.stamp:
                self.stamp = stamp
                self._read(path)
        if not self.secrets:
            raise settings.SecretFileError(f"{path}: no usable secret (relay webhook secret)")
        return self.secrets

    def _read(self, path: Path) -> None:
        try:
            self.secrets = settings.read_secrets(path)
        except settings.SecretFileError as exc:
            logs.event("error", level="error", stage="webhooks", webhook=self.hook.name,
                       error=str(exc))  # fmt: skip


class Webhooks:
    """The senders of every endpoint in hooks; run() until stop."""

    def __init__(self, hooks: Sequence[WebhookConfig], hooks_dir: Path, events_dir: Path) -> None:
        self.outboxes = {h.name: opened(outbox_path(hooks_dir, h.name), events_dir) for h in hooks}
        self.senders = [
            Sender(h, self.outboxes[h.name], events_dir, Secrets(h), self._reporter(h.name))
            for h in hooks
        ]
        for hook in hooks:
            for result in metrics.WEBHOOK_RESULTS:
                metrics.WEBHOOK_DELIVERIES.labels(hook.name, result)

    async def run(self, stop: asyncio.Event) -> None:
        gauges = asyncio.ensure_future(self._gauges(stop))
        await asyncio.gather(*(sender.run(stop) for sender in self.senders))
        await gauges
        for outbox in self.outboxes.values():
            outbox.close()

    def _reporter(self, name: str) -> Report:
        def report(outcome: str, error: str | None) -> None:
            result = RESULTS[outcome]
            metrics.WEBHOOK_DELIVERIES.labels(name, result).inc()
            if outcome != payload.DONE:
                logs.event("webhook_failed", level="warning", webhook=name, result=result,
                           error=error)  # fmt: skip

        return report

    async def _gauges(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for name, outbox in self.outboxes.items():
                fields = await asyncio.to_thread(backlog_fields, outbox)
                metrics.WEBHOOK_PENDING.labels(name).set(fields["pending"])
                metrics.WEBHOOK_PARKED.labels(name).set(fields["parked"])
                metrics.WEBHOOK_LAG.labels(name).set(fields["lag_seconds"])
                metrics.WEBHOOK_DISABLED.labels(name).set(fields["disabled"] is not None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), GAUGES_EVERY)
