"""Delivery, the courier: offers one message to one recipient domain, address by address in
the TLS mode its policy asks for (or through its smarthosts), on an idle session that fits or a
new one, and reports a reply per recipient; retries and backoff belong to the scheduler."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from relay.config.delivery import DeliveryConfig
from relay.delivery import pipelining, tlspolicy
from relay.delivery.connect import Connector, quit_session
from relay.delivery.peer import Message, Peer, RecipientResult, Stale, Unsettled, failed
from relay.delivery.pool import (
    CLOSE_TIMEOUT,
    RSET_TIMEOUT,
    Connection,
    Idle,
    Key,
    Pool,
    hang_up,
    reset,
)
from relay.delivery.resolver import Host, Route
from relay.delivery.tlspolicy import Policy, TlsPolicy
from relay.delivery.transaction import Transaction
from relay.mail.dsnparams import DsnRequest
from relay.mail.reply import Reply, Verdict, classify
from relay.observe import metrics

__all__ = ["Courier", "RecipientResult"]

# How a session came to carry a transaction: opened for it, or an idle one reused (the
# relay_delivery_connections label).
OPENED, REUSED = metrics.CONNECTION_KINDS

Try = tuple[Peer, Policy]  # an address to offer the message to, and the TLS policy there


class Courier:
    """Delivers one message to one domain per deliver() call; it reports, never retries later.
    Sessions that end cleanly wait in a pool for the next delivery to the same peer."""

    def __init__(self, cfg: DeliveryConfig) -> None:
        self._cfg = cfg
        self._policy = TlsPolicy(cfg)
        self._connector = Connector(cfg, self._policy.context)
        self._pool = Pool(cfg.reuse.idle_timeout)
        self._close_timeout = min(cfg.command_timeout, CLOSE_TIMEOUT)

    async def deliver(
        self,
        route: Route,
        sender: str,
        recipients: Sequence[str],
        body: Path,
        *,
        size: int,
        smtputf8: bool = False,
        destination: str | None = None,
        idle_room: int | None = None,
        dsn: DsnRequest | None = None,
    ) -> list[RecipientResult]:
        """Offer the message to route's hosts and addresses in order until one settles it,
        skipping MX hosts an enforced MTA-STS policy does not list (RFC 8461 §4.1). An idle
        session to any of them goes first. Sessions are pooled under destination (None: the
        route's domain); before a connection is opened, the destination's idle sessions beyond
        idle_room (None: no limit) are closed, oldest first. dsn: the message's RFC 3461
        parameters, passed on where the next hop announces DSN (RecipientResult.dsn_relayed).

        One result per recipient, in input order. Network and protocol trouble is reported,
        never raised; when no address settles it, every recipient gets the last error.
        """
        policy = await self._policy.for_route(route)
        hosts = [h for h in route.hosts if h.smarthost or policy.testing or policy.allows(h.name)]
        last = Unsettled(Peer(None, None), _no_host(route, policy, skipped=not hosts))
        tries = [
            (self._peer(h, ip), tlspolicy.for_host(h, policy)) for h in hosts for ip in h.addresses
        ]
        with body.open("rb", buffering=0) as file:
            message = Message(
                sender, tuple(recipients), file, size, smtputf8,
                destination or route.domain, idle_room, dsn,
            )  # fmt: skip
            return await self._offer(tries, message, last)

    def idle(self, destination: str) -> int:
        """Idle pooled sessions held for destination."""
        return self._pool.count(destination)

    async def sweep(self) -> None:
        """QUIT and close the sessions idle for delivery.reuse.idle_timeout or longer."""
        await hang_up(self._pool.expired(), self._close_timeout)

    async def close(self) -> None:
        """QUIT and close every idle session (the daemon stops)."""
        await hang_up(self._pool.drain(), self._close_timeout)

    def _peer(self, host: Host, ip: str) -> Peer:
        smarthost = host.smarthost
        port = self._cfg.port if smarthost is None else smarthost.port
        return Peer(host.name, ip, port=port, smarthost=smarthost)

    async def _offer(
        self, tries: list[Try], message: Message, last: Unsettled
    ) -> list[RecipientResult]:
        """An idle session to any address first, in their order; then new connections to
        addresses whose idle session did not already settle the message in vain."""
        tried: set[Key] = set()
        for peer, policy in tries:
            try:
                results = await self._reuse(peer, message, policy)
            except Unsettled as exc:
                last = exc
                tried.add(peer.key)
                continue
            if results is not None:
                return results
        session = functools.partial(self._session, message)
        for peer, policy in tries:
            if peer.key in tried:
                continue
            try:
                return await tlspolicy.attempt(peer, policy, session)
            except Unsettled as exc:
                last = exc
        reply = _deferrable(last)
        return [last.peer.result(recipient, reply) for recipient in message.recipients]

    async def _reuse(
        self, peer: Peer, message: Message, policy: Policy
    ) -> list[RecipientResult] | None:
        """The transaction on an idle session to peer whose TLS satisfies policy; None when
        there is none. A session that fails RSET is dropped, and that is not a try."""

        def fits(idle: Idle) -> bool:
            return tlspolicy.satisfies(policy, idle.tls, idle.verified)

        timeout = min(self._cfg.command_timeout, RSET_TIMEOUT)
        while (idle := self._pool.take(message.destination, peer.key, fits)) is not None:
            # Under PIPELINING the RSET goes out with the transaction's first commands.
            pipelined = pipelining.offered(idle.smtp)
            if not pipelined and not await reset(idle.smtp, timeout):
                continue
            peer = tlspolicy.reused(replace(peer, tls=idle.tls, verified=idle.verified), policy)
            try:
                uses = idle.uses + 1
                return await self._carry(idle.smtp, peer, message, uses, REUSED, pipelined)
            except Stale:
                continue
            except BaseException as exc:
                raise failed(idle.smtp, peer, exc) from None
        return None

    async def _session(self, message: Message, peer: Peer, mode: str) -> list[RecipientResult]:
        """A new connection in mode's TLS, then the transaction (tlspolicy.Session): Unsettled
        if it fails before the RCPT replies are in, TlsFailed (before any MAIL) if it cannot
        have the TLS mode asks for. The destination's idle sessions beyond its room go first."""
        if message.idle_room is not None:
            evicted = self._pool.evict(message.destination, message.idle_room)
            await hang_up(evicted, self._close_timeout)
        smtp, peer = await self._connector.open(peer, mode)
        try:
            return await self._carry(smtp, peer, message, 1, OPENED)
        except BaseException as exc:
            raise failed(smtp, peer, exc) from None

    async def _carry(
        self,
        smtp: Connection,
        peer: Peer,
        message: Message,
        uses: int,
        origin: str,
        reset: bool = False,
    ) -> list[RecipientResult]:
        """The transaction on an open session, its uses-th, counted under origin (OPENED or
        REUSED; reset: a pooled session RSET in the same write, Stale and not counted if that
        fails); then, if it ended cleanly and may carry more, the session waits in the pool for
        the next one, else it QUITs."""
        counter = metrics.CONNECTIONS.labels(origin)
        try:
            results = await Transaction(smtp, peer, message, self._cfg).run(reset)
        except Stale:
            raise  # the pooled session had gone: no transaction on it
        except BaseException:
            counter.inc()
            raise
        counter.inc()
        clean = smtp.is_connected and all(result.reply.code != 421 for result in results)
        if clean and uses < self._cfg.reuse.max_messages:
            self._pool.put(message.destination, Idle(smtp, peer.key, peer.tls, peer.verified, uses))
        else:
            await quit_session(smtp)
        return results


def _no_host(route: Route, policy: Policy, *, skipped: bool) -> Reply:
    """Why no address was tried: no host at all, or none that the MTA-STS policy lists."""
    if not (skipped and route.hosts):
        return Reply(None, None, f"no MX to try for {route.domain}")
    text = f"no MX host of {route.domain} is listed in its MTA-STS policy ({', '.join(policy.mx)})"
    return Reply(None, "4.7.5", text)


def _deferrable(unsettled: Unsettled) -> Reply:
    """A 5xx that refused the whole session (greeting, EHLO) says nothing about the recipients:
    report it without a code so that it is retried, as Postfix's smtp_skip_5xx_greeting does."""
    reply = unsettled.reply
    if classify(reply).verdict is not Verdict.PERMANENT:
        return reply
    peer = unsettled.peer
    return Reply(None, None, f"{peer.where} refused to talk to me: {reply}")
