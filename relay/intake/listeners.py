"""Intake, the listeners: relay, submission and smtps bound to their addresses, each making the
sessions of its listener (smtps with our own TLS handshake first), and the API's UNIX socket
through which the HTTP API hands its submissions to this same intake."""

from __future__ import annotations

import asyncio
import contextlib
import os
import warnings
from collections.abc import Callable

from relay.intake.handler import IntakeHandler
from relay.intake.session import API, RelaySMTP
from relay.intake.tls import ImplicitTLS
from relay.observe import metrics
from relay.spool.run import SUBMIT_SOCKET

LISTENERS = metrics.LISTENERS
# aiosmtpd warns, outside the JSON log, that the submission socket requires AUTH without TLS:
# it is a 0600 UNIX socket whose only mechanism is EXTERNAL, granted to our own uid.
warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS", UserWarning)


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
    servers.append(await serve_api(handler))  # the API's submissions, and the maildrop's
    return servers


async def serve_api(handler: IntakeHandler) -> asyncio.Server:
    """run/submit.sock, for the API worker and the maildrop's pickup only: the socket is 0600
    (our user's), and its sessions authenticate as the request's tenant with SASL EXTERNAL
    (RFC 4422 appendix A), which the session grants only to a peer of our own uid."""
    path = handler.spool.socket_address(SUBMIT_SOCKET)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    old = os.umask(0o177)  # no moment where another user could connect
    try:
        return await asyncio.get_running_loop().create_unix_server(_factory(handler, API), path)
    finally:
        os.umask(old)


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
            tls_context=None if listener in ("smtps", API) else handler.tls,
            require_starttls=listener == "submission",
            auth_required=listener != "relay",
            auth_require_tls=listener != API,
            auth_exclude_mechanism=_excluded(listener, cfg.smtp.auth.users_file is not None),
        )

    return implicit_tls if listener == "smtps" else factory


def _excluded(listener: str, users: bool) -> list[str]:
    """The AUTH mechanisms a listener does not offer: EXTERNAL is the API socket's only one,
    and PLAIN and LOGIN need a users file."""
    if listener == API:
        return ["PLAIN", "LOGIN"]
    return ["EXTERNAL"] if users else ["EXTERNAL", "PLAIN", "LOGIN"]
