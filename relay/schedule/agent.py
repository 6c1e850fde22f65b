"""Schedule, the delivery agent: what the scheduler asks of the delivery stage (a route per
domain, one transaction per domain, idle connections swept and closed), as a Protocol that the
daemon's SMTP agent and the tests' fake agent both satisfy."""

from __future__ import annotations

from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, Protocol

from relay.config.model import Config
from relay.delivery.courier import RecipientResult
from relay.delivery.resolver import Route
from relay.mail.dsnparams import DsnRequest


class Agent(Protocol):
    """Routes and delivers for the scheduler; it reports, it never retries later."""

    async def route(self, domain: str) -> Route:
        """The route for domain; ResolveError when DNS alone settles the attempt."""
        ...

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
        """One transaction offering the message to route's hosts: a result per recipient, in
        input order; connections are pooled under destination, keeping at most idle_room of
        its idle ones. dsn: the RFC 3461 parameters, passed on where the next hop takes them
        (RecipientResult.dsn_relayed)."""
        ...

    async def sweep(self) -> None:
        """Close the connections idle for too long."""
        ...

    async def close(self) -> None:
        """Close every idle connection (the scheduler stops)."""
        ...

    def reconfigure(self, cfg: Config) -> Coroutine[Any, Any, None] | None:
        """Take a reloaded configuration for the transactions that start from now on; returns
        the closing of what it retired (a courier's idle connections) for the caller to run
        in the background, or None."""
        ...
