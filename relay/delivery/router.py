"""Delivery, the router: a recipient domain's route, through the smarthosts of the first route
rule that matches it, else to the domain's MX hosts."""

from __future__ import annotations

from relay.config.model import Config
from relay.delivery.resolver import Resolver, Route


class Router:
    """Where mail for a recipient domain goes: through the smarthosts of the first route rule
    that matches it, else to the domain's MX hosts."""

    def __init__(self, cfg: Config, resolver: Resolver) -> None:
        self._cfg = cfg
        self._resolver = resolver

    async def route(self, domain: str) -> Route:
        """The route for domain; ResolveError when DNS alone settles the attempt."""
        name = domain.strip().rstrip(".").lower()
        rule = self._cfg.route_rule(name)
        if rule is None:
            return await self._resolver.route(domain)  # as it was given: a literal keeps its case
        return await self._resolver.smarthosts(name, rule.via)
