"""Schedule, dispatch: due messages into the ready queues of their destinations, after one MX
lookup per domain whose destination is not known yet, and out of them as the relay's capacity
and each destination's limits allow."""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Any, cast

from relay.delivery.resolver import ResolveError
from relay.observe import logs
from relay.schedule.agent import Agent
from relay.schedule.destinations import Destinations
from relay.schedule.index import Entry, Index
from relay.schedule.shaping import Ready

Spawn = Callable[[Coroutine[Any, Any, None]], None]


class Dispatch:
    """The ready queues (by lane, fresh-or-retried turn and destination) and the entries
    waiting for a domain's MX to learn their destination."""

    def __init__(
        self,
        index: Index,
        destinations: Destinations,
        agent: Agent,
        ready: Ready,
        spawn: Spawn,
    ) -> None:
        self.index = index
        self.destinations = destinations
        self.agent = agent
        self.ready = ready
        self.spawn = spawn
        self.resolving: dict[str, list[Entry]] = {}  # domain: entries waiting for its MX

    def due(self) -> None:
        """Move every message whose time has come into the ready queues."""
        for entry in self.index.due(time.monotonic()):
            self.index.change(entry, ready=True, scheduled=False, quota=False)
            self._route_or_resolve(entry)

    def _route_or_resolve(self, entry: Entry) -> None:
        """Queue entry at its first destination, or wait for the MX of a domain whose
        destination is not known yet (one lookup per domain, however many wait for it)."""
        now = time.monotonic()
        routes = [(domain, self.destinations.cached(domain, now)) for domain in entry.domains]
        missing = [domain for domain, dest in routes if dest is None]
        if not missing:
            entry.routes = tuple((domain, dest or domain) for domain, dest in routes)
            self.ready.push(entry, (entry.dests or ("",))[0])
            return
        for domain in missing:
            waiting = self.resolving.setdefault(domain, [])
            if not waiting:
                self.spawn(self._learn_destination(domain))
            if entry not in waiting:
                waiting.append(entry)

    async def _learn_destination(self, domain: str) -> None:
        """Resolve domain's first MX (or smarthost) to find whose limits it shares."""
        try:
            route = await self.agent.route(domain)
            host: str | None = route.hosts[0].name
        except Exception as exc:  # the attempt itself reports DNS trouble to the recipients
            if not isinstance(exc, ResolveError):
                logs.failure("scheduler", exc, domain=domain)
            host = None
        self.destinations.learn(domain, host)
        for entry in self.resolving.pop(domain, []):
            current = self.index.get(entry.id) is entry and entry.ready and not entry.routes
            if current and not any(entry in self.resolving.get(d, ()) for d in entry.domains):
                self._route_or_resolve(entry)
        self.index.wake.set()

    def start(self, room: int) -> list[Entry]:
        """Take up to room ready messages whose destinations allow a start now, each holding a
        slot at every destination it goes to; the caller runs their attempts."""
        now = time.monotonic()
        started: list[Entry] = []
        while len(started) < room:
            found = self.ready.pick(lambda name: self.destinations.opens(name, now))
            if found is None:
                break
            entry = cast(Entry, found[0])
            if self.index.get(entry.id) is not entry or not entry.ready:
                continue  # left the queue while it waited
            blocked = next((d for d in entry.dests if not self.destinations.opens(d, now)), None)
            if blocked is not None:  # a message to several destinations waits for each
                self.ready.push(entry, blocked, front=True)
                continue
            self.destinations.start(entry.dests, now)
            self.index.change(entry, running=True, ready=False)
            started.append(entry)
        return started

    def unready(self, entry: Entry) -> None:
        """Take entry out of the ready queues and MX waits (deleted, held, operated on)."""
        if not entry.ready:
            return
        for dest in entry.dests:
            if self.ready.remove(entry, dest):
                break
        for domain in entry.domains:
            waiting = self.resolving.get(domain)
            if waiting is not None and entry in waiting:
                waiting.remove(entry)
        self.index.change(entry, ready=False)
        entry.routes = ()

    def drop(self, msg_id: str) -> None:
        """Forget msg_id: out of the ready queues, the MX waits and the index."""
        entry = self.index.get(msg_id)
        if entry is not None:
            self.unready(entry)
            self.index.remove(entry)

    def next_wake(self, full: bool) -> float:
        """The index's next due time, or when a waiting destination opens (rate slot or end
        of a suspension); a busy destination or a full relay wakes us when an attempt ends."""
        due = self.index.next_due()
        if full or not self.ready:
            return due
        now = time.monotonic()
        opens = (self.destinations.get(dest).opens_at(now) for dest, _ in self.ready.waiting())
        return min(due, *opens)

    def waiting(self, now: float) -> dict[str, int]:
        """Ready messages by why they wait: their destination's suspension, its limits or
        throttling, or only the relay's own capacity or their MX lookup ("queued")."""
        counts = {"suspended": 0, "throttled": 0, "queued": self.index.states["ready"]}
        for name, waiting in self.ready.waiting():
            counts[self.destinations.get(name).waits_for(now)] += waiting
            counts["queued"] -= waiting
        return counts
