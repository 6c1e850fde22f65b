"""The scheduler's fake delivery agent (the one fake the issue asks for), a real spool on disk,
and a running scheduler to drive them in-process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay import config
from relay.config.model import Config
from relay.delivery.courier import RecipientResult
from relay.delivery.resolver import Host, ResolveError, Route
from relay.mail.dsnparams import DsnRequest
from relay.mail.reply import Reply
from relay.schedule.scheduler import Scheduler
from relay.spool.message import Message, Recipient, new_id
from relay.spool.store import Spool

BODY = (b"Subject: t\r\n\r\nhello\r\n",)
OK = "250 2.0.0 ok"


def reply(text: str) -> Reply:
    """ "451 4.3.0 later" as a Reply."""
    code, _, message = text.partition(" ")
    return Reply.parse(int(code), message)


@dataclass(frozen=True)
class Call:
    """One transaction the scheduler asked for."""

    domain: str
    recipients: tuple[str, ...]
    destination: str
    at: float  # time.time() it started


class FakeAgent:
    """Answers from a script: per recipient address, or else per domain, the reply of each
    successive transaction (the last one repeats; 250 when unscripted). A domain in `dns`
    does not resolve: its transactions end with that reply. Each transaction takes `hold`
    seconds, then waits for `gate`; every call is recorded."""

    def __init__(
        self,
        script: Mapping[str, Sequence[str]] | None = None,
        *,
        dns: Mapping[str, str] | None = None,
        mx: Mapping[str, str] | None = None,
        hold: float = 0.0,
    ) -> None:
        self.script = dict(script or {})
        self.dns = dict(dns or {})
        self.mx = dict(mx or {})  # domain: MX host name (mx.<domain> when not given)
        self.hold = hold
        self.gate = asyncio.Event()
        self.gate.set()
        self.calls: list[Call] = []
        self.open: Counter[str] = Counter()  # transactions in flight per destination
        self.most: Counter[str] = Counter()  # the most ever in flight at once per destination
        self.peak = 0  # the most ever in flight at once in all
        self.answered: Counter[str] = Counter()  # transactions per recipient address
        self.reconfigured: list[Config] = []
        self.retired = 0  # closings of retired connections run by the scheduler
        self.closed = False

    async def route(self, domain: str) -> Route:
        if domain in self.dns:
            raise ResolveError(reply(self.dns[domain]))
        host = Host(self.mx.get(domain, f"mx.{domain}"), 10, ("127.0.0.2",))
        return Route(domain, (host,))

    async def deliver(
        self,
        route: Route,
        sender: str,
        recipients: Sequence[str],
        body: Path,
        *,
        size: int,
        smtputf8: bool,
        destination: str,
        idle_room: int,
        dsn: DsnRequest | None = None,
    ) -> list[RecipientResult]:
        assert sender == "" or body.read_bytes() == b"".join(BODY)  # "": a DSN the relay made
        self.calls.append(Call(route.domain, tuple(recipients), destination, time.time()))
        self.open[destination] += 1
        self.most[destination] = max(self.most[destination], self.open[destination])
        self.peak = max(self.peak, self.open.total())
        try:
            await asyncio.sleep(self.hold)
            await self.gate.wait()
        finally:
            self.open[destination] -= 1
        return [self._result(address, route) for address in recipients]

    def _result(self, address: str, route: Route) -> RecipientResult:
        replies = self.script.get(address) or self.script.get(route.domain) or (OK,)
        text = replies[min(self.answered[address], len(replies) - 1)]
        self.answered[address] += 1
        host = route.hosts[0]
        return RecipientResult(address, reply(text), host.name, host.addresses[0], False)

    async def sweep(self) -> None:
        pass

    async def close(self) -> None:
        self.closed = True

    def reconfigure(self, cfg: Config) -> Coroutine[Any, Any, None] | None:
        self.reconfigured.append(cfg)
        return self._retire()

    async def _retire(self) -> None:
        self.retired += 1

    def to(self, domain: str) -> list[Call]:
        """The transactions to domain, in order."""
        return [call for call in self.calls if call.domain == domain]


def settings(overrides: dict[str, Any] | None = None) -> Config:
    """A Config with retries every 0.2 s without jitter and no DSNs (tests of them turn them
    on), overrides merged over it."""
    data: dict[str, Any] = {
        "delivery": {"retry": {"schedule": ["0.2s"], "jitter": 0}},
        "bounces": {"enabled": False},
    }
    for section, values in (overrides or {}).items():
        if section == "delivery" and "retry" in values:
            values = {**values, "retry": {**data["delivery"]["retry"], **values["retry"]}}
        data[section] = {**data.get(section, {}), **values}
    return config.parse(json.dumps(data))  # JSON is YAML


def enqueue(spool: Spool, *rcpts: str, lane: str = "normal", **fields: Any) -> str:
    """A message accepted into the spool, due now; its queue id."""
    time.sleep(0.002)  # ids sort by arrival to the millisecond: keep them in this order
    now = time.time()
    recipients = [Recipient(address) for address in rcpts]
    msg = Message(new_id(), "sender@s.test", recipients, now, now, size=18, lane=lane, **fields)
    spool.accept(msg, BODY)
    return msg.id


def new_spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    return spool


@contextlib.asynccontextmanager
async def running(cfg: Config, spool: Spool, agent: FakeAgent) -> AsyncIterator[Scheduler]:
    """The scheduler's loop over spool (its first scan adopts what is queued), stopped at the
    end."""
    scheduler = Scheduler(cfg, spool, agent, rng=random.Random(1))
    loop = asyncio.create_task(scheduler.run())
    try:
        yield scheduler
    finally:
        await scheduler.stop(grace=2.0)
        await loop


async def until(check: Callable[[], bool], timeout: float = 3.0) -> None:
    """Poll check every 10 ms until it holds; fail at timeout."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)
