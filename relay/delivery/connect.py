"""Delivery, connection set-up: a new session to one address, over TCP (in TLS from the first
byte for smtps), with EHLO, STARTTLS as the TLS mode asks and AUTH for a smarthost; and the
polite end of a session."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from dataclasses import replace

from aiosmtplib import SMTP, SMTPConnectError, SMTPConnectTimeoutError, SMTPException, SMTPHeloError

from relay.config.delivery import DeliveryConfig
from relay.delivery.peer import Peer, TlsFailed, Unsettled, error_reply, failed
from relay.delivery.pool import Connection
from relay.delivery.tlspolicy import OPPORTUNISTIC, PLAINTEXT, VERIFY
from relay.mail.reply import Reply
from relay.observe import metrics


class Connector:
    """Opens sessions as delivery's settings say: HELO name, timeouts, and the TLS context of
    each mode (verifying is the TLS policy's)."""

    def __init__(self, cfg: DeliveryConfig, verifying: ssl.SSLContext) -> None:
        self._cfg = cfg
        self._tls = _opportunistic_tls()
        self._verifying = verifying

    async def open(self, peer: Peer, mode: str) -> tuple[Connection, Peer]:
        """A new connection to peer with mode's TLS, and AUTH for a smarthost with credentials;
        the session and the peer with the TLS it achieved. Unsettled if it fails, TlsFailed
        if it cannot have the TLS mode asks for."""
        smtp = Connection(
            local_hostname=self._cfg.helo_name, timeout=self._cfg.command_timeout, start_tls=False
        )
        try:
            await self._connect(smtp, peer, mode)
            await _hello(smtp)
            peer = await self._secure(smtp, peer, mode)
            await _login(smtp, peer)
        except BaseException as exc:
            raise failed(smtp, peer, exc) from None
        return smtp, peer

    async def _connect(self, smtp: Connection, peer: Peer, mode: str) -> None:
        """Connect and read the greeting; for smtps in TLS from the first byte, the certificate
        checked against the smarthost's name under verify."""
        timeout = self._cfg.connect_timeout
        if not peer.implicit:
            await smtp.connect(hostname=peer.ip, port=peer.port, timeout=timeout)
            return
        sock = await _tcp(peer, timeout)
        try:
            await smtp.connect(
                hostname=peer.tls_name, sock=sock, use_tls=True, tls_context=self._context(mode),
                timeout=timeout,
            )  # fmt: skip
        except SMTPConnectError as exc:
            if isinstance(exc.__cause__, ssl.SSLError):
                raise _tls_failure(exc.__cause__, peer) from None
            raise

    async def _secure(self, smtp: SMTP, peer: Peer, mode: str) -> Peer:
        """STARTTLS as mode asks (RFC 3207), counting the session's TLS outcome once it is
        known; the peer with what was achieved. TlsFailed when TLS is needed but not had."""
        if peer.implicit:
            return _secured(peer, mode)
        offered = smtp.supports_extension("starttls")
        if mode == PLAINTEXT or (mode == OPPORTUNISTIC and not offered):
            metrics.TLS.labels("plaintext").inc()
            return peer
        if not offered:
            await quit_session(smtp)
            text = f"TLS is required, but was not offered by {peer.where}"
            raise TlsFailed(Reply(None, "4.7.4", text))
        try:
            await smtp.starttls(server_hostname=peer.tls_name, tls_context=self._context(mode))
        except (SMTPException, OSError) as exc:
            raise _tls_failure(exc, peer) from None
        await _hello(smtp)  # RFC 3207 §4.2: forget what was learnt before TLS
        return _secured(peer, mode)

    def _context(self, mode: str) -> ssl.SSLContext:
        """Verify the certificate for the verify mode; else encrypt without checking it."""
        return self._verifying if mode == VERIFY else self._tls


async def quit_session(smtp: SMTP) -> None:
    """QUIT politely (RFC 5321 §4.1.1.10) and close; a server that is already gone is no error."""
    with contextlib.suppress(SMTPException, OSError):
        await smtp.quit()
    smtp.close()


async def _hello(smtp: SMTP) -> None:
    """EHLO, or HELO from a server that refuses EHLO but stays connected (RFC 5321 §4.1.1.1)."""
    try:
        await smtp.ehlo()
    except SMTPHeloError:
        if not smtp.is_connected:
            raise
        await smtp.helo()


async def _login(smtp: SMTP, peer: Peer) -> None:
    """AUTH with a smarthost's credentials (RFC 4954), never in clear unless its tls is none.
    A refusal is temporary, so the next smarthost is tried and the mail is deferred, never
    bounced (as Postfix's smtp_sasl_auth_soft_bounce does)."""
    login = peer.login
    if login is None:
        return
    if not peer.tls and (peer.smarthost is None or peer.smarthost.tls != "none"):
        text = f"credentials for {peer.where} are never sent without TLS"
        raise Unsettled(peer, Reply(None, "4.7.0", text))
    try:
        await smtp.login(*login)
    except SMTPException as exc:
        text = f"authentication at {peer.where} failed: {error_reply(exc)}"
        raise Unsettled(peer, Reply(None, "4.7.0", text)) from None


async def _tcp(peer: Peer, timeout: float) -> socket.socket:
    """A TCP connection to peer's address, for TLS from the first byte under the peer's name."""
    ip = peer.ip or ""
    sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, (ip, peer.port))
    except BaseException as exc:
        sock.close()
        if isinstance(exc, TimeoutError):
            text = f"Timed out connecting to {ip} on port {peer.port}"
            raise SMTPConnectTimeoutError(text) from None
        raise
    return sock


def _secured(peer: Peer, mode: str) -> Peer:
    """Count the session's TLS once it is had; the peer with what was achieved."""
    verify = mode == VERIFY
    metrics.TLS.labels("verified" if verify else "encrypted").inc()
    return replace(peer, tls=True, verified=verify)


def _tls_failure(exc: BaseException, peer: Peer) -> TlsFailed:
    """A failed TLS handshake with peer: its certificate, or anything else."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        text = f"certificate of {peer.where} not verified: {exc.verify_message}"
    else:
        text = f"TLS handshake with {peer.where} failed: {exc}"
    return TlsFailed(Reply(None, "4.7.5", text))


def _opportunistic_tls() -> ssl.SSLContext:
    """Encrypt without verifying (RFC 7435): MX certificates are rarely valid for the MX name,
    and a failed check would only push delivery back to plain text."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
