"""Intake, the listeners: relay, submission and smtps bound to their addresses, each making the
sessions of its listener (smtps with our own TLS handshake first)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from relay.intake.handler import IntakeHandler
from relay.intake.session import RelaySMTP
from relay.intake.tls import ImplicitTLS
from relay.observe import metrics

LISTENERS = metrics.LISTENERS


async def serve(handler: IntakeHandler) -> list[asyncio.Server]:
    """Bind every listener (relay, submission, smtps); an unbindable address raises OSError.
    Sessions take their settings from the handler when they start, so a reload applies to
    new ones."""
    loop = asyncio.get_running_loop()
    addresses = {
        "relay": handler.cfg.smtp.listen,
        "submission": handler.cfg.smtp.submission,
        "smtps": handler.cfg.smtp.smtps,
    }
    servers = []
    for listener in LISTENERS:
        for host, port in addresses[listener]:
            servers.append(await loop.create_server(_factory(handler, listener), host, port))
    return servers


def _factory(handler: IntakeHandler, listener: str) -> Callable[[], asyncio.BaseProtocol]:
    """Sessions for one listener; on smtps each starts with our own TLS handshake (so that a
    failed one is logged, and a reloaded certificate serves the next connection)."""

    def implicit_tls() -> ImplicitTLS:
        assert handler.tls is not None  # config: smtps needs smtp.tls (RFC 8314)
        return ImplicitTLS(handler.tls, factory)

    def factory() -> RelaySMTP:
        cfg = handler.cfg
        return RelaySMTP(
            handler,
            listener,
            handler.registry,
            data_size_limit=cfg.smtp.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=cfg.smtp.hostname,
            ident="relay",
            timeout=cfg.smtp.idle_timeout,
            tls_context=None if listener == "smtps" else handler.tls,
            require_starttls=listener == "submission",
            auth_required=listener != "relay",
            auth_require_tls=True,
            auth_exclude_mechanism=None if cfg.smtp.auth.users_file else ["PLAIN", "LOGIN"],
        )

    return implicit_tls if listener == "smtps" else factory
