"""Delivery, the agent: the router, resolver and courier the scheduler delivers through, with
what a reload renews of them."""

from __future__ import annotations

from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from relay.config.model import Config
from relay.delivery.courier import Courier, RecipientResult
from relay.delivery.resolver import Resolver, Route
from relay.delivery.router import Router
from relay.mail.dsnparams import DsnRequest


class SmtpAgent:
    """Delivers over SMTP: routes by the route rules or MX, one transaction per deliver()."""

    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg
        self._resolver = Resolver(cfg.delivery.dns)
        self._router = Router(cfg, self._resolver)
        self._courier = Courier(cfg.delivery)

    async def route(self, domain: str) -> Route:
        """The route for domain; ResolveError when DNS alone settles the attempt."""
        return await self._router.route(domain)

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
        """The courier's transaction (Courier.deliver)."""
        return await self._courier.deliver(
            route,
            sender,
            recipients,
            body,
            size=size,
            smtputf8=smtputf8,
            destination=destination,
            idle_room=idle_room,
            dsn=dsn,
        )

    async def sweep(self) -> None:
        await self._courier.sweep()

    async def close(self) -> None:
        await self._courier.close()

    def reconfigure(self, cfg: Config) -> Coroutine[Any, Any, None] | None:
        """A new courier when delivery settings changed (the old one's idle connections are
        returned to be closed; busy ones end with their transaction), a new resolver when DNS
        settings changed, a new router always."""
        old, self._cfg = self._cfg, cfg
        retired = None
        if cfg.delivery != old.delivery:
            retired, self._courier = self._courier, Courier(cfg.delivery)
        if cfg.delivery.dns != old.delivery.dns:
            self._resolver = Resolver(cfg.delivery.dns)
        self._router = Router(cfg, self._resolver)
        return None if retired is None else retired.close()
