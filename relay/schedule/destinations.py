"""Schedule, the destinations: whose limits each recipient domain shares, learnt from its first
MX and kept a while, and each destination's live shaping state with its gauges and log lines."""

from __future__ import annotations

import time
from collections.abc import Iterable

from relay.config.model import Config
from relay.observe import logs, metrics
from relay.schedule.shaping import NEUTRAL, Destination, Signal

# How long a recipient domain's destination (its limits' owner, learnt from its MX) is kept.
DESTINATION_TTL = 300.0
DESTINATION_CACHE = 100_000


class Destinations:
    """The destinations with something to remember (busy, throttled, suspended, a rate slot,
    mail waiting) and the destination of each recently routed domain."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.live: dict[str, Destination] = {}
        self.cache: dict[str, tuple[str, float]] = {}  # domain: (destination, expiry)
        self.shown: set[str] = set()  # destinations with throttle gauges

    def get(self, name: str) -> Destination:
        """The destination called name, starting fresh under its configured limits."""
        dest = self.live.get(name)
        if dest is None:
            dest = self.live[name] = Destination(name, self.cfg.limits(name))
        return dest

    def opens(self, name: str, now: float) -> bool:
        """Whether a message may start at name now."""
        return self.get(name).opens_at(now) <= now

    def cached(self, domain: str, now: float) -> str | None:
        """domain's destination, if learnt less than DESTINATION_TTL ago."""
        cached = self.cache.get(domain)
        return cached[0] if cached is not None and cached[1] > now else None

    def learn(self, domain: str, host: str | None) -> None:
        """Remember domain's destination from its first MX (or smarthost) host, None if the
        lookup failed."""
        if len(self.cache) >= DESTINATION_CACHE:
            self.cache.pop(next(iter(self.cache)))
        expiry = time.monotonic() + DESTINATION_TTL
        self.cache[domain] = (self.cfg.destination(domain, host), expiry)

    def start(self, names: Iterable[str], now: float) -> None:
        """A message starts: it holds one slot at each of these destinations."""
        for name in names:
            self.get(name).start(now, self.cfg.throttle)

    def release(self, names: Iterable[str], signals: dict[str, Signal]) -> None:
        """Give back the destinations' slots, each learning from its transactions' replies."""
        now = time.monotonic()
        throttle = self.cfg.throttle
        for name in names:
            dest = self.get(name)
            if dest.finish(signals.get(name, Signal(NEUTRAL)), now, throttle):
                self.shown.add(name)  # its gauges from now on, back to 0 included
                logs.event(
                    "throttle_changed", destination=name, throttle_level=dest.level,
                    connections=dest.connections(),
                    interval=round(dest.interval(throttle), 3),
                    suspended_for=round(max(0.0, dest.suspended_until - now), 3),
                    reply=dest.last_reply,
                )  # fmt: skip

    def gauges(self, now: float) -> None:
        """Refresh the throttle gauges; forget the destinations with nothing to remember."""
        for name, dest in list(self.live.items()):
            if name in self.shown:
                metrics.THROTTLE_LEVEL.labels(name).set(dest.level)
                metrics.SUSPENDED.labels(name).set(dest.suspended(now))
            if dest.idle(now) and name not in self.shown:
                del self.live[name]  # nothing to remember about it

    def reconfigure(self, cfg: Config) -> None:
        """Reloaded limits for every destination; routing by the old settings is forgotten."""
        old, self.cfg = self.cfg, cfg
        for name, dest in self.live.items():
            dest.limits = cfg.limits(name)
        if (cfg.destinations, cfg.providers, cfg.routes) != (
            old.destinations,
            old.providers,
            old.routes,
        ):
            self.cache.clear()
