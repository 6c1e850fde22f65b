"""Courier stage: one outbound SMTP transaction that offers one message to one recipient domain
and reports a reply per recipient; retries and backoff belong to the scheduler."""

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

from relay.classify import Reply, Verdict, classify
from relay.config import DeliveryConfig
from relay.resolver import Route

CHUNK_SIZE = 64 * 1024
CRLF = b"\r\n"
# RFC 6531: a message that needs SMTPUTF8 is never downgraded in transit; X.6.7 is its code.
NO_SMTPUTF8 = Reply(553, "5.6.7", "message needs SMTPUTF8, which the receiving server lacks")


@dataclass(frozen=True)
class RecipientResult:
    recipient: str
    reply: Reply  # the reply that settles this recipient for this attempt
    mx: str | None  # MX host name that gave the reply (None if no host gave one)
    ip: str | None  # address that gave it
    tls: bool  # whether the session that gave it ran TLS


@dataclass(frozen=True)
class _Peer:
    """Where a reply came from: MX host, address, and whether the session ran TLS."""

    mx: str | None
    ip: str | None
    tls: bool = False

    def result(self, recipient: str, reply: Reply) -> RecipientResult:
        return RecipientResult(recipient, reply, self.mx, self.ip, self.tls)


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
    """STARTTLS was offered but did not complete; the address is tried again in plain text."""


class Courier:
    """Delivers one message to one domain per deliver() call; it reports, never retries later."""

    def __init__(self, cfg: DeliveryConfig) -> None:
        self._cfg = cfg
        self._tls = _opportunistic_tls()

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
        """Offer the message to route's hosts and addresses in order until one settles it.

        One result per recipient, in input order. Network and protocol trouble is reported,
        never raised; when no address settles it, every recipient gets the last error.
        """
        last = _Unsettled(_Peer(None, None), Reply(None, None, f"no MX to try for {route.domain}"))
        with body.open("rb") as file:
            message = _Message(sender, tuple(recipients), file, size, smtputf8)
            for host in route.hosts:
                for ip in host.addresses:
                    try:
                        return await self._attempt(_Peer(host.name, ip), message)
                    except _Unsettled as exc:
                        last = exc
        reply = _deferrable(last)
        return [last.peer.result(recipient, reply) for recipient in recipients]

    async def _attempt(self, peer: _Peer, message: _Message) -> list[RecipientResult]:
        """One address: STARTTLS when offered, and once more in plain text if TLS fails, as
        opportunistic security must not make delivery worse than no TLS (RFC 7435 §3)."""
        try:
            return await self._session(peer, message, starttls=True)
        except _TlsFailed:
            return await self._session(peer, message, starttls=False)

    async def _session(
        self, peer: _Peer, message: _Message, *, starttls: bool
    ) -> list[RecipientResult]:
        """One connection; _Unsettled if it fails before the RCPT replies are in."""
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
            if starttls and smtp.supports_extension("starttls"):
                await _starttls(smtp, self._tls)
                peer = replace(peer, tls=True)
                await _hello(smtp)  # RFC 3207 §4.2: forget what was learnt before TLS
            results = await self._transaction(smtp, peer, message)
            await _quit(smtp)
            return results
        except (SMTPException, OSError) as exc:
            raise _Unsettled(peer, _reply(exc, f"{peer.mx}[{peer.ip}]")) from None
        finally:
            smtp.close()

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


async def _starttls(smtp: SMTP, context: ssl.SSLContext) -> None:
    try:
        await smtp.starttls(tls_context=context)
    except (SMTPException, OSError) as exc:
        raise _TlsFailed(str(exc)) from exc


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


def _deferrable(unsettled: _Unsettled) -> Reply:
    """A 5xx that refused the whole session (greeting, EHLO) says nothing about the recipients:
    report it without a code so that it is retried, as Postfix's smtp_skip_5xx_greeting does."""
    reply = unsettled.reply
    if classify(reply).verdict is not Verdict.PERMANENT:
        return reply
    peer = unsettled.peer
    return Reply(None, None, f"{peer.mx}[{peer.ip}] refused to talk to me: {reply}")


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
