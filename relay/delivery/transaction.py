"""Delivery, the transaction: MAIL, RCPT and DATA on an open session, one by one or pipelined
(RFC 2920), the body streamed from disk dot-stuffed, and a reply per recipient."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import BinaryIO

from aiosmtplib import (
    SMTP,
    SMTPException,
    SMTPRecipientRefused,
    SMTPResponse,
    SMTPSenderRefused,
    SMTPServerDisconnected,
)
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import SMTPProtocol

from relay.config.delivery import DeliveryConfig
from relay.delivery import pipelining
from relay.delivery.peer import Message, Peer, RecipientResult, Stale
from relay.delivery.pool import RSET_TIMEOUT
from relay.mail.reply import Reply, Verdict, classify

CHUNK_SIZE = 256 * 1024
# A body up to this size is read on the event loop: from the page cache that is a copy of a
# few microseconds, cheaper than the hop to a worker thread and back (docs/architecture.md
# invariant 5 sends only large file I/O to a thread).
INLINE_READ = 64 * 1024
CRLF = b"\r\n"
# RFC 6531: a message that needs SMTPUTF8 is never downgraded in transit; X.6.7 is its code.
NO_SMTPUTF8 = Reply(553, "5.6.7", "message needs SMTPUTF8, which the receiving server lacks")


@dataclass(frozen=True)
class Transaction:
    """One message offered on one open session to peer, within cfg's timeouts."""

    smtp: SMTP
    peer: Peer
    message: Message
    cfg: DeliveryConfig

    async def run(self, reset: bool = False) -> list[RecipientResult]:
        """MAIL, RCPT for each recipient, DATA for those accepted: a reply per recipient. They
        go out one by one, or in one group when the server offers PIPELINING (reset, which
        only a pipelined session asks for, puts an RSET first in the group). Where the server
        offers DSN, the message's RFC 3461 parameters go with them, and each result says so."""
        results = await self._run(reset)
        if not self.smtp.supports_extension("dsn"):
            return results
        return [replace(result, dsn_relayed=True) for result in results]

    async def _run(self, reset: bool) -> list[RecipientResult]:
        smtp, peer, message = self.smtp, self.peer, self.message
        if message.smtputf8 and not smtp.supports_extension("smtputf8"):
            return [peer.result(recipient, NO_SMTPUTF8) for recipient in message.recipients]
        if pipelining.offered(smtp):
            return await self._pipelined(reset)
        refusal = await _mail(smtp, message)
        if refusal is not None:
            return [peer.result(recipient, refusal) for recipient in message.recipients]
        replies = [await _rcpt(smtp, command, rcpt) for command, rcpt in _rcpts(smtp, message)]
        return await self._deliver_data(replies)

    async def _pipelined(self, reset: bool) -> list[RecipientResult]:
        """RFC 2920: [RSET,] MAIL, every RCPT and DATA in one write, then their replies in
        order, and the body when DATA got 354 and a recipient was accepted. The replies mean
        what they mean one by one; a failed RSET raises Stale (the pooled session had gone)."""
        smtp, message = self.smtp, self.message
        head = [b"RSET"] if reset else []
        rcpts = [command for command, _ in _rcpts(smtp, message)]
        group = pipelining.send(smtp, [*head, _mail_command(smtp, message), *rcpts, b"DATA"])
        timeout = self.cfg.command_timeout
        if reset:
            await _rset_reply(smtp, group, min(timeout, RSET_TIMEOUT))
        refusal = _mail_reply(await pipelining.reply(group, timeout), message.sender)
        replies = [
            _rcpt_reply(await pipelining.reply(group, timeout), rcpt) for rcpt in message.recipients
        ]
        if refusal is not None:
            await self._no_data(group)
            return [self.peer.result(recipient, refusal) for recipient in message.recipients]
        return await self._deliver_data(replies, group)

    async def _deliver_data(
        self, replies: list[Reply], group: pipelining.Group | None = None
    ) -> list[RecipientResult]:
        """After the RCPT replies: DATA and the body when a recipient was accepted (a pipelined
        DATA without one is answered by _no_data); a result per recipient."""
        accepted = [classify(reply).verdict is Verdict.DELIVERED for reply in replies]
        if any(accepted):
            final = await self._data(group)
            replies = [final if ok else reply for ok, reply in zip(accepted, replies, strict=True)]
        elif group is not None:
            await self._no_data(group)
        recipients = self.message.recipients
        return [self.peer.result(r, reply) for r, reply in zip(recipients, replies, strict=True)]

    async def _data(self, group: pipelining.Group | None = None) -> Reply:
        """DATA (already sent in group, if given) and the streamed body; the reply applies to
        every accepted recipient."""
        smtp, message = self.smtp, self.message
        context = "connection lost before end of data"
        try:
            if group is None:
                start = await smtp.execute_command(b"DATA")
            else:
                start = await pipelining.reply(group, self.cfg.command_timeout)
            if start.code != 354:
                return Reply.parse(start.code, start.message)
            protocol = smtp.protocol
            if protocol is None:
                raise SMTPServerDisconnected("Connection lost")
            end = await _stream(protocol, message.body, message.size <= INLINE_READ)
            context = "connection lost after end of data"
            # Write the end and await the reply with nothing awaited in between: aiosmtplib
            # drops bytes that arrive while no reply is awaited. RFC 5321 §4.5.3.2.6: 10 min.
            protocol.write(end)
            final = await protocol.read_response(timeout=self.cfg.data_timeout)
        except (SMTPException, OSError) as exc:
            smtp.close()
            return Reply.from_error(exc, context)
        return Reply.parse(final.code, final.message)

    async def _no_data(self, group: pipelining.Group) -> None:
        """The reply to a pipelined DATA that must not carry the message (MAIL refused, or no
        recipient accepted): a server that says 354 anyway gets an empty message ended at once
        (RFC 2920 §3.1), and a session in doubt is closed rather than pooled."""
        timeout = self.cfg.command_timeout
        try:
            start = await pipelining.reply(group, timeout)
            if start.code == 354:
                group.write(b".\r\n")
                await group.read_response(timeout=timeout)
        except (SMTPException, OSError):
            self.smtp.close()


async def _mail(smtp: SMTP, message: Message) -> Reply | None:
    """MAIL FROM: None when accepted, the reply when refused permanently (_mail_reply)."""
    return _mail_reply(await smtp.execute_command(_mail_command(smtp, message)), message.sender)


def _mail_command(smtp: SMTP, message: Message) -> bytes:
    """MAIL FROM with the extensions the server offers."""
    options = [f"SIZE={message.size}"] if smtp.supports_extension("size") else []  # RFC 1870
    if smtp.supports_extension("8bitmime"):
        options.append("BODY=8BITMIME")  # RFC 6152
    if message.smtputf8:
        options.append("SMTPUTF8")  # RFC 6531 §3.4
    if message.dsn is not None and smtp.supports_extension("dsn"):
        options.extend(message.dsn.mail.options())  # RFC 3461 §4.3, §4.4: RET, ENVID
    path = quote_address(message.sender).encode(message.encoding)
    return b" ".join([b"MAIL FROM:" + path, *(option.encode() for option in options)])


def _mail_reply(response: SMTPResponse, sender: str) -> Reply | None:
    """None when MAIL was accepted, the reply when refused permanently; a temporary refusal
    raises so that the next address is tried."""
    if response.code == 250:
        return None
    reply = Reply.parse(response.code, response.message)
    if classify(reply).verdict is not Verdict.PERMANENT:
        raise SMTPSenderRefused(response.code, response.message, sender)
    return reply


async def _rcpt(smtp: SMTP, command: bytes, recipient: str) -> Reply:
    """The RCPT reply for one recipient (_rcpt_reply)."""
    return _rcpt_reply(await smtp.execute_command(command), recipient)


def _rcpts(smtp: SMTP, message: Message) -> list[tuple[bytes, str]]:
    """Each recipient's RCPT command, with its NOTIFY and ORCPT where the server offers DSN
    (RFC 3461 §4.1, §4.2), and the recipient."""
    dsn = message.dsn if smtp.supports_extension("dsn") else None
    commands = []
    for index, recipient in enumerate(message.recipients):
        options = [] if dsn is None else dsn.rcpt(index).options()
        path = b"RCPT TO:" + quote_address(recipient).encode(message.encoding)
        commands.append((b" ".join([path, *(option.encode() for option in options)]), recipient))
    return commands


def _rcpt_reply(response: SMTPResponse, recipient: str) -> Reply:
    """The reply to a recipient's RCPT; a 421 (RFC 5321 §3.8) raises."""
    if response.code == 421:
        raise SMTPRecipientRefused(response.code, response.message, recipient)
    return Reply.parse(response.code, response.message)


async def _rset_reply(smtp: SMTP, group: pipelining.Group, timeout: float) -> None:
    """The reply to the RSET that opens a pooled session's group: Stale (the session closed)
    unless it is 250."""
    try:
        stale = (await pipelining.reply(group, timeout)).code != 250
    except (SMTPException, OSError):
        stale = True
    if stale:
        smtp.close()
        raise Stale


async def _stream(protocol: SMTPProtocol, body: BinaryIO, inline: bool) -> bytes:
    """Send the body dot-stuffed, chunk by chunk from disk (read on the loop when inline, else
    in a worker thread), and return the end-of-data bytes still to send: the data must end in
    CRLF before the final "." line (RFC 5321 §4.1.1.4)."""
    body.seek(0)
    tail = CRLF  # the start of the data is the start of a line
    while True:
        chunk = body.read(CHUNK_SIZE) if inline else await asyncio.to_thread(body.read, CHUNK_SIZE)
        if chunk:
            await _write(protocol, dot_stuff(tail, chunk))
            tail = (tail + chunk)[-2:]
        if len(chunk) < CHUNK_SIZE:  # a short read is the end: no extra thread hop to see it
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
