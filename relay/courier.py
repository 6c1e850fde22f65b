"""Courier stage: one outbound SMTP transaction that offers one message to one recipient domain
under that domain's TLS policy and reports a reply per recipient; retries and backoff belong to
the scheduler."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from aiosmtplib import (
    SMTP,
    SMTPException,
    SMTPHeloError,
    SMTPRecipientRefused,
    SMTPResponseException,
    SMTPServerDisconnected,
)
from aiosmtplib.protocol import SMTPProtocol

from relay import metrics
from relay.classify import Reply, Verdict, classify
from relay.config import DeliveryConfig
from relay.resolver import Route
from relay.tlspolicy import OPPORTUNISTIC, VERIFY, Policy, TlsPolicy

CHUNK_SIZE = 64 * 1024
CRLF = b"\r\n"
# RFC 6531: a message that needs SMTPUTF8 is never downgraded in transit; X.6.7 is its code.
NO_SMTPUTF8 = Reply(553, "5.6.7", "message needs SMTPUTF8, which the receiving server lacks")
# A session mode beside the policy modes: no STARTTLS at all (opportunistic's fallback).
PLAINTEXT = "plaintext"


@dataclass(frozen=True)
class RecipientResult:
    recipient: str
    reply: Reply  # the reply that settles this recipient for this attempt
    mx: str | None  # MX host name that gave the reply (None if no host gave one)
    ip: str | None  # address that gave it
    tls: bool  # whether the session that gave it ran TLS
    tls_verified: bool = False  # and verified the certificate for the MX host name
    # What an MTA-STS policy in testing mode would have refused (RFC 8461 §5), for the log.
    tls_report: str | None = None


@dataclass(frozen=True)
class _Peer:
    """Where a reply came from: MX host, address, and what TLS the session achieved."""

    mx: str | None
    ip: str | None
    tls: bool = False
    verified: bool = False
    report: str | None = None

    @property
    def where(self) -> str:
        return f"{self.mx}[{self.ip}]"

    @property
    def tls_name(self) -> str | None:
        """The name the certificate must carry: the MX host name, or the literal's address."""
        return self.ip if self.mx is None or self.mx.startswith("[") else self.mx

    def noting(self, problem: str) -> _Peer:
        return replace(self, report="; ".join(filter(None, [self.report, problem])))

    def result(self, recipient: str, reply: Reply) -> RecipientResult:
        return RecipientResult(
            recipient, reply, self.mx, self.ip, self.tls, self.verified, self.report
        )


@dataclass(frozen=True)
class _Message:
    sender: str
    recipients: tuple[str, ...]
    body: BinaryIO
    size: int
    smtputf8: bool

    @property
    def encoding(self) -> str:
        """How addresses go on the wire: UTF-8 only under SMTPUTF8 (RFC 6531 §3.3)."""
        return "utf-8" if self.smtputf8 else "ascii"


class _Unsettled(Exception):
    """An address gave no definitive answer; reply says why, and the next address is tried."""

    def __init__(self, peer: _Peer, reply: Reply) -> None:
        super().__init__(str(reply))
        self.peer = peer
        self.reply = reply


class _TlsFailed(Exception):
    """The session did not achieve the TLS its mode asks for, and sent no MAIL; reply says why
    (RFC 3463: X.7.4 security feature not supported, X.7.5 cryptographic failure)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class Courier:
    """Delivers one message to one domain per deliver() call; it reports, never retries later."""

    def __init__(self, cfg: DeliveryConfig) -> None:
        self._cfg = cfg
        self._tls = _opportunistic_tls()
        self._policy = TlsPolicy(cfg)

    async def deliver(
        self,
        route: Route,
        sender: str,
        recipients: Sequence[str],
        body: Path,
        *,
        size: int,
        smtputf8: bool = False,
    ) -> list[RecipientResult]:
        """Offer the message to route's hosts and addresses in order until one settles it,
        skipping hosts an enforced MTA-STS policy does not list (RFC 8461 §4.1).

        One result per recipient, in input order. Network and protocol trouble is reported,
        never raised; when no address settles it, every recipient gets the last error.
        """
        policy = await self._policy.for_domain(route.domain)
        hosts = [host for host in route.hosts if policy.testing or policy.allows(host.name)]
        last = _Unsettled(_Peer(None, None), _no_host(route, policy, skipped=not hosts))
        with body.open("rb") as file:
            message = _Message(sender, tuple(recipients), file, size, smtputf8)
            for host in hosts:
                for ip in host.addresses:
                    try:
                        return await self._attempt(_Peer(host.name, ip), message, policy)
                    except _Unsettled as exc:
                        last = exc
        reply = _deferrable(last)
        return [last.peer.result(recipient, reply) for recipient in recipients]

    async def _attempt(
        self, peer: _Peer, message: _Message, policy: Policy
    ) -> list[RecipientResult]:
        """One address under policy; _Unsettled when it settles nothing, so the next is tried.

        Opportunistic: STARTTLS when offered, and once more in plain text if TLS fails, as it
        must not make delivery worse than no TLS (RFC 7435 §3). Required and verify: TLS or no
        transaction at all. Testing: as enforce would, but a failure is only reported.
        """
        if policy.testing:
            return await self._testing(peer, message, policy)
        if policy.mode == OPPORTUNISTIC:
            try:
                return await self._session(peer, message, OPPORTUNISTIC)
            except _TlsFailed:
                return await self._session(peer, message, PLAINTEXT)
        try:
            return await self._session(peer, message, policy.mode)
        except _TlsFailed as exc:
            metrics.TLS.labels("failed").inc()
            raise _Unsettled(peer, exc.reply) from None

    async def _testing(
        self, peer: _Peer, message: _Message, policy: Policy
    ) -> list[RecipientResult]:
        """RFC 8461 §5: under a policy in testing mode, try what enforce would demand (a listed
        MX host, a verified certificate); when that fails, note it and deliver as configured."""
        if not policy.allows(peer.mx or ""):
            peer = peer.noting(f"MTA-STS testing: {peer.mx} is not an MX host the policy lists")
            metrics.STS_TESTING_FAILURES.inc()
        enforced = replace(policy, testing=False, mx=())
        if policy.mode == VERIFY:
            return await self._attempt(peer, message, enforced)
        try:
            return await self._session(peer, message, VERIFY)
        except _TlsFailed as exc:
            peer = peer.noting(f"MTA-STS testing: {exc.reply.text}")
            metrics.STS_TESTING_FAILURES.inc()
        return await self._attempt(peer, message, enforced)

    async def _session(self, peer: _Peer, message: _Message, mode: str) -> list[RecipientResult]:
        """One connection with mode's TLS; _Unsettled if it fails before the RCPT replies are
        in, _TlsFailed (before any MAIL) if it cannot have the TLS mode asks for."""
        smtp = SMTP(
            hostname=peer.ip,
            port=self._cfg.port,
            local_hostname=self._cfg.helo_name,
            timeout=self._cfg.command_timeout,
            start_tls=False,
        )
        try:
            await smtp.connect(timeout=self._cfg.connect_timeout)
            await _hello(smtp)
            peer = await self._secure(smtp, peer, mode)
            results = await self._transaction(smtp, peer, message)
            await _quit(smtp)
            return results
        except (SMTPException, OSError) as exc:
            raise _Unsettled(peer, _reply(exc, peer.where)) from None
        finally:
            smtp.close()

    async def _secure(self, smtp: SMTP, peer: _Peer, mode: str) -> _Peer:
        """STARTTLS as mode asks (RFC 3207), counting the session's TLS outcome once it is
        known; the peer with what was achieved. _TlsFailed when TLS is needed but not had."""
        offered = smtp.supports_extension("starttls")
        if mode == PLAINTEXT or (mode == OPPORTUNISTIC and not offered):
            metrics.TLS.labels("plaintext").inc()
            return peer
        if not offered:
            await _quit(smtp)
            text = f"TLS is required, but was not offered by {peer.where}"
            raise _TlsFailed(Reply(None, "4.7.4", text))
        verify = mode == VERIFY
        context = self._policy.context if verify else self._tls
        try:
            await smtp.starttls(server_hostname=peer.tls_name, tls_context=context)
        except ssl.SSLCertVerificationError as exc:
            text = f"certificate of {peer.where} not verified: {exc.verify_message}"
            raise _TlsFailed(Reply(None, "4.7.5", text)) from None
        except (SMTPException, OSError) as exc:
            text = f"TLS handshake with {peer.where} failed: {exc}"
            raise _TlsFailed(Reply(None, "4.7.5", text)) from None
        await _hello(smtp)  # RFC 3207 §4.2: forget what was learnt before TLS
        metrics.TLS.labels("verified" if verify else "encrypted").inc()
        return replace(peer, tls=True, verified=verify)

    async def _transaction(
        self, smtp: SMTP, peer: _Peer, message: _Message
    ) -> list[RecipientResult]:
        """MAIL, RCPT for each recipient, DATA for those accepted: a reply per recipient."""
        if message.smtputf8 and not smtp.supports_extension("smtputf8"):
            return [peer.result(recipient, NO_SMTPUTF8) for recipient in message.recipients]
        refusal = await _mail(smtp, message)
        if refusal is not None:
            return [peer.result(recipient, refusal) for recipient in message.recipients]
        replies = [await _rcpt(smtp, rcpt, message.encoding) for rcpt in message.recipients]
        accepted = [classify(reply).verdict is Verdict.DELIVERED for reply in replies]
        if any(accepted):
            final = await self._data(smtp, message.body)
            replies = [final if ok else reply for ok, reply in zip(accepted, replies, strict=True)]
        return [peer.result(r, reply) for r, reply in zip(message.recipients, replies, strict=True)]

    async def _data(self, smtp: SMTP, body: BinaryIO) -> Reply:
        """DATA and the streamed body; the reply applies to every accepted recipient."""
        context = "connection lost before end of data"
        try:
            start = await smtp.execute_command(b"DATA")
            if start.code != 354:
                return Reply.parse(start.code, start.message)
            protocol = smtp.protocol
            if protocol is None:
                raise SMTPServerDisconnected("Connection lost")
            end = await _stream(protocol, body)
            context = "connection lost after end of data"
            # Write the end and await the reply with nothing awaited in between: aiosmtplib
            # drops bytes that arrive while no reply is awaited. RFC 5321 §4.5.3.2.6: 10 min.
            protocol.write(end)
            final = await protocol.read_response(timeout=self._cfg.data_timeout)
        except (SMTPException, OSError) as exc:
            smtp.close()
            return Reply.from_error(exc, context)
        return Reply.parse(final.code, final.message)


async def _hello(smtp: SMTP) -> None:
    """EHLO, or HELO from a server that refuses EHLO but stays connected (RFC 5321 §4.1.1.1)."""
    try:
        await smtp.ehlo()
    except SMTPHeloError:
        if not smtp.is_connected:
            raise
        await smtp.helo()


async def _mail(smtp: SMTP, message: _Message) -> Reply | None:
    """MAIL FROM with the extensions the server offers: None when accepted, the reply when
    refused permanently; a temporary refusal raises so that the next address is tried."""
    options = [f"SIZE={message.size}"] if smtp.supports_extension("size") else []  # RFC 1870
    if smtp.supports_extension("8bitmime"):
        options.append("BODY=8BITMIME")  # RFC 6152
    if message.smtputf8:
        options.append("SMTPUTF8")  # RFC 6531 §3.4
    try:
        await smtp.mail(message.sender, options=options, encoding=message.encoding)
    except SMTPResponseException as exc:
        reply = _reply(exc)
        if classify(reply).verdict is not Verdict.PERMANENT:
            raise
        return reply
    return None


async def _rcpt(smtp: SMTP, recipient: str, encoding: str) -> Reply:
    """The RCPT reply for one recipient; a 421 (RFC 5321 §3.8) or a lost connection raises."""
    try:
        response = await smtp.rcpt(recipient, encoding=encoding)
    except SMTPRecipientRefused as exc:
        if exc.code == 421:
            raise
        return Reply.parse(exc.code, exc.message)
    return Reply.parse(response.code, response.message)


async def _quit(smtp: SMTP) -> None:
    """QUIT politely (RFC 5321 §4.1.1.10); a server that is already gone is no error."""
    with contextlib.suppress(SMTPException, OSError):
        await smtp.quit()


async def _stream(protocol: SMTPProtocol, body: BinaryIO) -> bytes:
    """Send the body dot-stuffed, chunk by chunk from disk, and return the end-of-data bytes
    still to send: the data must end in CRLF before the final "." line (RFC 5321 §4.1.1.4)."""
    body.seek(0)
    tail = CRLF  # the start of the data is the start of a line
    while chunk := await asyncio.to_thread(body.read, CHUNK_SIZE):
        await _write(protocol, dot_stuff(tail, chunk))
        tail = (tail + chunk)[-2:]
    return b".\r\n" if tail == CRLF else b"\r\n.\r\n"


def dot_stuff(tail: bytes, chunk: bytes) -> bytes:
    """Double the "." that starts a line (RFC 5321 §4.5.2); tail is the two bytes before chunk,
    so a line start that straddles chunks is still found."""
    return (tail + chunk).replace(b"\r\n.", b"\r\n..")[len(tail) :]


async def _write(protocol: SMTPProtocol, data: bytes) -> None:
    """Write body bytes, then wait while the socket's send buffer is full.

    The one use of aiosmtplib's private API: its data() needs the whole message in memory, so
    streaming from disk writes to the protocol directly and borrows its flow-control wait.
    """
    protocol.write(data)
    await protocol._drain_helper()


def _no_host(route: Route, policy: Policy, *, skipped: bool) -> Reply:
    """Why no address was tried: no host at all, or none that the MTA-STS policy lists."""
    if not (skipped and route.hosts):
        return Reply(None, None, f"no MX to try for {route.domain}")
    text = f"no MX host of {route.domain} is listed in its MTA-STS policy ({', '.join(policy.mx)})"
    return Reply(None, "4.7.5", text)


def _deferrable(unsettled: _Unsettled) -> Reply:
    """A 5xx that refused the whole session (greeting, EHLO) says nothing about the recipients:
    report it without a code so that it is retried, as Postfix's smtp_skip_5xx_greeting does."""
    reply = unsettled.reply
    if classify(reply).verdict is not Verdict.PERMANENT:
        return reply
    peer = unsettled.peer
    return Reply(None, None, f"{peer.where} refused to talk to me: {reply}")


def _reply(exc: BaseException, context: str = "") -> Reply:
    """The server's reply that exc carries, or a reply without a code that describes exc."""
    if isinstance(exc, SMTPResponseException) and exc.code > 0:  # -1: reply was unparseable
        return Reply.parse(exc.code, exc.message)
    return Reply.from_error(exc, context)


def _opportunistic_tls() -> ssl.SSLContext:
    """Encrypt without verifying (RFC 7435): MX certificates are rarely valid for the MX name,
    and a failed check would only push delivery back to plain text."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
