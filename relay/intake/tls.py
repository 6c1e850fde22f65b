"""Intake, TLS: the server context for STARTTLS and smtps, smtps' own handshake, and the
handshakes that fail on the client's side, logged and counted as the client's."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import cast

from relay.config.model import Config, why
from relay.config.schema import ConfigError
from relay.observe import logs, metrics


def tls_context(cfg: Config) -> ssl.SSLContext | None:
    """The server context for STARTTLS and smtps: TLS 1.2 or newer only; ConfigError (one line)
    if the certificate or key cannot be loaded."""
    tls = cfg.smtp.tls
    if tls.cert is None or tls.key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"smtp.tls: cannot load {tls.cert} / {tls.key}: {why(exc)}") from None
    return context


def tls_failure_reason(error: OSError) -> str:
    """The bounded label of a failed server-side handshake (metrics.TLS_FAILURE_REASONS):
    OpenSSL's reason for the common ones, the client's alerts about our certificate, a client
    that hung up or stalled (asyncio's handshake timeout), else `other`."""
    if isinstance(error, ConnectionAbortedError):  # asyncio: "SSL handshake is taking longer"
        return "timeout"
    if isinstance(error, (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError)):
        return "eof"
    reason = str(getattr(error, "reason", None) or "")
    if reason.lower() in metrics.TLS_FAILURE_REASONS:
        return reason.lower()
    # RFC 8446 §6.2: bad_certificate, certificate_expired, unknown_ca, ... sent by the client.
    if "_ALERT_" in reason and ("CERTIFICATE" in reason or reason.endswith("UNKNOWN_CA")):
        return "certificate_refused"
    return "other"


def tls_failed(listener: str, ip: str, error: OSError) -> None:
    """Log and count a handshake that failed on the client's side: old TLS versions, scanners,
    plain text or HTTP on a TLS port, a hang-up. Nothing of ours went wrong, so it is info (an
    open 465 is probed all day), never `error`; the exact OpenSSL text is in `detail`."""
    reason = tls_failure_reason(error)
    metrics.TLS_FAILED.labels(listener, reason).inc()
    detail = str(error) or type(error).__name__
    logs.event("tls_failed", client=ip, listener=listener, reason=reason, detail=detail)


def client_ip(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if peer else ""


class ImplicitTLS(asyncio.Protocol):
    """An smtps connection (RFC 8314 §3.3) until its TLS handshake is done; then its SMTP
    session takes over the TLS transport. asyncio's own TLS listener (create_server(ssl=))
    drops a failed handshake without a word; this one logs and counts it."""

    def __init__(self, context: ssl.SSLContext, session: Callable[[], asyncio.Protocol]) -> None:
        self.context = context
        self.session = session
        self.early = bytearray()  # what arrives between the handshake and the session's start
        self.gone = False
        self.handshake: asyncio.Task[None] | None = None  # held: the loop keeps weak refs

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = cast(asyncio.Transport, transport)  # what a TCP listener gives
        self.handshake = asyncio.get_running_loop().create_task(self._start(tcp))

    def data_received(self, data: bytes) -> None:
        self.early += data

    def eof_received(self) -> None:
        self.gone = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True

    async def _start(self, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(transport, self, self.context, server_side=True)
        except OSError as error:  # start_tls has closed the connection
            tls_failed("smtps", client_ip(transport), error)
            return
        if tls is None or self.gone:  # the client left as the handshake ended
            return
        session = self.session()
        tls.set_protocol(session)
        session.connection_made(tls)
        if self.early:
            session.data_received(bytes(self.early))
