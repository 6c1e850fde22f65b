"""Webhooks, the sender: one endpoint's loop, which reads the journal into its outbox and posts
what is due, up to max_in_flight at once, oldest event first, applying each answer (done,
again by the schedule or Retry-After, failed for good, or the endpoint gone). A slow or dead
endpoint holds up only its own loop."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from relay.hooks import payload
from relay.hooks.outbox import Outbox, Owed
from relay.mail.events import iso
from relay.spool import cursor

# report(outcome, error): told of each try, for metrics and logs
Report = Callable[[str, str | None], None]
POLL = 0.5  # seconds between looks at the journal and the outbox when nothing is due sooner
BATCH = 100  # events asked of the outbox at a time


class Hook(Protocol):
    """What the sender reads of an endpoint's configuration (relay.config.webhooks)."""

    @property
    def name(self) -> str: ...
    @property
    def url(self) -> str: ...
    @property
    def events(self) -> Collection[str]: ...
    @property
    def tenants(self) -> Collection[str]: ...
    @property
    def final_only(self) -> bool: ...
    @property
    def timeout(self) -> float: ...
    @property
    def max_in_flight(self) -> int: ...
    @property
    def ca_file(self) -> Path | None: ...


class Sender:
    """One endpoint: its outbox fed from the journal in events_dir, its requests in flight.
    secrets() gives the endpoint's current secrets (its file, read again when it changes);
    report(outcome, error) is told of each try (for metrics and logs)."""

    def __init__(
        self,
        hook: Hook,
        outbox: Outbox,
        events_dir: Path,
        secrets: Callable[[], list[str]],
        report: Report = lambda outcome, error: None,
    ) -> None:
        self.hook, self.outbox, self.events_dir = hook, outbox, events_dir
        self.secrets, self.report = secrets, report
        self.in_flight: dict[str, asyncio.Task[None]] = {}
        self.wanted = functools.partial(
            payload.wanted, kinds=hook.events, tenants=hook.tenants, final_only=hook.final_only
        )
        self.session: aiohttp.ClientSession | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Read and send until stop is set; requests in flight are then cancelled (their events
        stay owed and go again after the restart)."""
        connector = aiohttp.TCPConnector(ssl=tls_context(self.hook.ca_file), limit=0)
        async with aiohttp.ClientSession(connector=connector) as self.session:
            while not stop.is_set():
                await self.step()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), await self.pause())
            for task in list(self.in_flight.values()):
                task.cancel()
            await asyncio.gather(*self.in_flight.values(), return_exceptions=True)

    async def step(self) -> None:
        """Take in the journal's new events, then start what is due while there is room."""
        await asyncio.to_thread(self.read)
        room = self.hook.max_in_flight - len(self.in_flight)
        if room <= 0 or self.outbox.flag("disabled") is not None:
            return
        owed = await asyncio.to_thread(
            self.outbox.due, time.time(), min(room, BATCH), list(self.in_flight)
        )
        for item in owed:
            task = asyncio.ensure_future(self.deliver(item))
            self.in_flight[item.event_id] = task
            task.add_done_callback(functools.partial(self._landed, item.event_id))

    def _landed(self, event_id: str, _: asyncio.Task[None]) -> None:
        self.in_flight.pop(event_id, None)

    def read(self) -> int:
        """The journal's new events this endpoint wants, into its outbox (a worker thread)."""

        def take(file: str, events: list[dict[str, Any]], offset: int) -> int:
            return self.outbox.take(file, events, offset, self.wanted)

        return cursor.catch_up(self.outbox, self.events_dir, take)

    async def pause(self) -> float:
        """How long to wait before the next step: POLL, or less when an event is due sooner."""
        if self.in_flight and len(self.in_flight) >= self.hook.max_in_flight:
            return POLL
        due = await asyncio.to_thread(self.outbox.next_due)
        return POLL if due is None else min(POLL, max(0.0, due - time.time()))

    async def deliver(self, item: Owed) -> None:
        """One try of one event, and what its answer means for it."""
        status, retry_after, error = await self.post(item)
        verdict = payload.verdict(status, retry_after, time.time())
        self.report(verdict.outcome, error)
        await asyncio.to_thread(self.settle, item, verdict, error or f"HTTP {status}")

    async def post(self, item: Owed) -> tuple[int | None, str | None, str | None]:
        """(status, Retry-After, None), or (None, None, what failed) without an answer."""
        assert self.session is not None
        try:
            secrets = await asyncio.to_thread(self.secrets)
        except Exception as exc:  # no usable secret: never send unsigned; try again later
            return None, None, f"secret_file: {exc}"
        head = payload.headers(item.event_id, time.time(), item.body, secrets)
        timeout = aiohttp.ClientTimeout(total=self.hook.timeout)
        try:
            async with self.session.post(
                self.hook.url, data=item.body, headers=head, timeout=timeout, allow_redirects=False
            ) as answer:
                await answer.read()
                return answer.status, answer.headers.get("Retry-After"), None
        except TimeoutError:
            return None, None, f"no answer within {self.hook.timeout:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            return None, None, f"{type(exc).__name__}: {exc}"

    def settle(self, item: Owed, verdict: payload.Verdict, error: str) -> None:
        """Apply a verdict to the outbox (a worker thread)."""
        if verdict.outcome in (payload.DONE, payload.FAILED):
            self.outbox.done(item.event_id)
            return
        if verdict.outcome == payload.GONE:
            self.outbox.set_flag("disabled", f"410 Gone at {iso(time.time())}")
        delay = verdict.after
        if delay is None:
            delay = payload.next_delay(item.failures + 1)
        self.outbox.again(item.event_id, None if delay is None else time.time() + delay, error)


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """The system's CAs, and ca_file's too when given."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context


def backlog_fields(outbox: Outbox) -> Mapping[str, Any]:
    """What `relay webhook list` and the metrics show of an outbox."""
    backlog = outbox.backlog()
    lag = 0.0 if backlog.oldest is None else max(0.0, time.time() - backlog.oldest)
    return {
        "pending": backlog.ready,
        "parked": backlog.parked,
        "lag_seconds": round(lag, 3),
        "disabled": outbox.flag("disabled"),
        "last_error": outbox.flag("last_error"),
    }
