"""Courier stage: one outbound SMTP transaction that offers one message to one recipient domain
under that domain's TLS policy (or through its smarthosts) and reports a reply per recipient,
reusing idle connections; retries and backoff belong to the scheduler."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from aiosmtplib import (
    SMTP,
    SMTPConnectError,
    SMTPConnectTimeoutError,
    SMTPException,
    SMTPHeloError,
    SMTPRecipientRefused,
    SMTPResponse,
    SMTPResponseException,
    SMTPSenderRefused,
    SMTPServerDisconnected,
)
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import SMTPProtocol

from relay.config.model import DeliveryConfig
from relay.config.shaping import Smarthost
from relay.delivery import pipelining
from relay.delivery.pool import Connection, Idle, Key, Pool, hang_up, reset
from relay.delivery.resolver import Host, Route
from relay.delivery.tlspolicy import OPPORTUNISTIC, REQUIRED, VERIFY, Policy, TlsPolicy
from relay.mail.reply import Reply, Verdict, classify
from relay.observe import metrics

CHUNK_SIZE = 256 * 1024
# A body up to this size is read on the event loop: from the page cache that is a copy of a
# few microseconds, cheaper than the hop to a worker thread and back (DESIGN invariant 5
# sends only large file I/O to a thread).
INLINE_READ = 64 * 1024
CRLF = b"\r\n"
# RFC 6531: a message that needs SMTPUTF8 is never downgraded in transit; X.6.7 is its code.
NO_SMTPUTF8 = Reply(553, "5.6.7", "message needs SMTPUTF8, which the receiving server lacks")
# A session mode beside the policy modes: no STARTTLS at all (opportunistic's fallback).
PLAINTEXT = "plaintext"
# How long an idle session may take to answer RSET before it is given up (Postfix's
# smtp_rset_timeout), and a QUIT to be answered and the connection closed.
RSET_TIMEOUT = 20.0
CLOSE_TIMEOUT = 5.0


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
    """Where a reply came from: MX host (or smarthost), address, and what TLS the session
    achieved; and how it is reached: port, and the smarthost's own settings if it is one."""

    mx: str | None
    ip: str | None
    tls: bool = False
    verified: bool = False
    report: str | None = None
    port: int = 0
    smarthost: Smarthost | None = None

    @property
    def where(self) -> str:
        return f"{self.mx}[{self.ip}]"

    @property
    def tls_name(self) -> str | None:
        """The name the certificate must carry: the MX host name, or the literal's address."""
        return self.ip if self.mx is None or self.mx.startswith("[") else self.mx

    @property
    def implicit(self) -> bool:
        """Whether TLS starts with the connection (smtps, RFC 8314 §3.3), not with STARTTLS."""
        return self.smarthost is not None and self.smarthost.tls == "smtps"

    @property
    def login(self) -> tuple[str, str] | None:
        """A smarthost's AUTH credentials, if it has them."""
        smarthost = self.smarthost
        if smarthost is None or smarthost.username is None or smarthost.password is None:
            return None
        return smarthost.username, smarthost.password

    @property
    def key(self) -> Key:
        return Key(self.mx, self.ip, self.port, self.login)

    def noting(self, problem: str) -> _Peer:
        return replace(self, report="; ".join(filter(None, [self.report, problem])))

    def result(self, recipient: str, reply: Reply) -> RecipientResult:
        return RecipientResult(
            recipient, reply, self.mx, self.ip, self.tls, self.verified, self.report
        )


@dataclass(frozen=True)
class _Message:
    """The message offered, and the destination its connections are pooled and counted under."""

    sender: str
    recipients: tuple[str, ...]
    body: BinaryIO
    size: int
    smtputf8: bool
    destination: str = ""
    idle_room: int | None = None  # idle sessions of destination that may stay open; None: any

    @property
    def encoding(self) -> str:
        """How addresses go on the wire: UTF-8 only under SMTPUTF8 (RFC 6531 §3.3)."""
        return "utf-8" if self.smtputf8 else "ascii"


class _Stale(Exception):
    """A pooled session that failed the RSET sent ahead of its next transaction: dropped, and
    that is not a try."""


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


Try = tuple[_Peer, Policy]  # an address to offer the message to, and the TLS policy there


class Courier:
    """Delivers one message to one domain per deliver() call; it reports, never retries later.
    Sessions that end cleanly wait in a pool for the next delivery to the same peer."""

    def __init__(self, cfg: DeliveryConfig) -> None:
        self._cfg = cfg
        self._tls = _opportunistic_tls()
        self._policy = TlsPolicy(cfg)
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
    ) -> list[RecipientResult]:
        """Offer the message to route's hosts and addresses in order until one settles it,
        skipping MX hosts an enforced MTA-STS policy does not list (RFC 8461 §4.1). An idle
        session to any of them goes first. Sessions are pooled under destination (None: the
        route's domain); before a connection is opened, the destination's idle sessions beyond
        idle_room (None: no limit) are closed, oldest first.

        One result per recipient, in input order. Network and protocol trouble is reported,
        never raised; when no address settles it, every recipient gets the last error.
        """
        policy = await self._domain_policy(route)
        hosts = [h for h in route.hosts if h.smarthost or policy.testing or policy.allows(h.name)]
        last = _Unsettled(_Peer(None, None), _no_host(route, policy, skipped=not hosts))
        tries = [(self._peer(h, ip), _host_policy(h, policy)) for h in hosts for ip in h.addresses]
        with body.open("rb", buffering=0) as file:
            message = _Message(
                sender, tuple(recipients), file, size, smtputf8,
                destination or route.domain, idle_room,
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

    async def _domain_policy(self, route: Route) -> Policy:
        """The recipient domain's TLS policy for its MX hosts (configured, MTA-STS or default);
        not looked up for a route through smarthosts only, whose own settings apply."""
        if all(host.smarthost is not None for host in route.hosts):
            return Policy(OPPORTUNISTIC, "smarthost")
        return await self._policy.for_domain(route.domain)

    def _peer(self, host: Host, ip: str) -> _Peer:
        smarthost = host.smarthost
        port = self._cfg.port if smarthost is None else smarthost.port
        return _Peer(host.name, ip, port=port, smarthost=smarthost)

    async def _offer(
        self, tries: list[Try], message: _Message, last: _Unsettled
    ) -> list[RecipientResult]:
        """An idle session to any address first, in their order; then new connections to
        addresses whose idle session did not already settle the message in vain."""
        tried: set[Key] = set()
        for peer, policy in tries:
            try:
                results = await self._reuse(peer, message, policy)
            except _Unsettled as exc:
                last = exc
                tried.add(peer.key)
                continue
            if results is not None:
                return results
        for peer, policy in tries:
            if peer.key in tried:
                continue
            try:
                return await self._attempt(peer, message, policy)
            except _Unsettled as exc:
                last = exc
        reply = _deferrable(last)
        return [last.peer.result(recipient, reply) for recipient in message.recipients]

    async def _reuse(
        self, peer: _Peer, message: _Message, policy: Policy
    ) -> list[RecipientResult] | None:
        """The transaction on an idle session to peer whose TLS satisfies policy; None when
        there is none. A session that fails RSET is dropped, and that is not a try."""

        def fits(idle: Idle) -> bool:
            return _satisfies(policy, idle.tls, idle.verified)

        timeout = min(self._cfg.command_timeout, RSET_TIMEOUT)
        while (idle := self._pool.take(message.destination, peer.key, fits)) is not None:
            # Under PIPELINING the RSET goes out with the transaction's first commands.
            pipelined = pipelining.offered(idle.smtp)
            if not pipelined and not await reset(idle.smtp, timeout):
                continue
            peer = _reused(replace(peer, tls=idle.tls, verified=idle.verified), policy)
            try:
                uses = idle.uses + 1
                return await self._carry(idle.smtp, peer, message, uses, "reused", pipelined)
            except _Stale:
                continue
            except BaseException as exc:
                raise _failed(idle.smtp, peer, exc) from None
        return None

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
        peer = _unlisted(peer, policy)
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
        """A new connection with mode's TLS, and AUTH for a smarthost with credentials; then
        the transaction. _Unsettled if it fails before the RCPT replies are in, _TlsFailed
        (before any MAIL) if it cannot have the TLS mode asks for."""
        if message.idle_room is not None:
            evicted = self._pool.evict(message.destination, message.idle_room)
            await hang_up(evicted, self._close_timeout)
        smtp = Connection(
            local_hostname=self._cfg.helo_name, timeout=self._cfg.command_timeout, start_tls=False
        )
        try:
            await self._connect(smtp, peer, mode)
            await _hello(smtp)
            peer = await self._secure(smtp, peer, mode)
            await _login(smtp, peer)
            return await self._carry(smtp, peer, message, 1, "opened")
        except BaseException as exc:
            raise _failed(smtp, peer, exc) from None

    async def _connect(self, smtp: Connection, peer: _Peer, mode: str) -> None:
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

    async def _secure(self, smtp: SMTP, peer: _Peer, mode: str) -> _Peer:
        """STARTTLS as mode asks (RFC 3207), counting the session's TLS outcome once it is
        known; the peer with what was achieved. _TlsFailed when TLS is needed but not had."""
        if peer.implicit:
            return _secured(peer, mode)
        offered = smtp.supports_extension("starttls")
        if mode == PLAINTEXT or (mode == OPPORTUNISTIC and not offered):
            metrics.TLS.labels("plaintext").inc()
            return peer
        if not offered:
            await _quit(smtp)
            text = f"TLS is required, but was not offered by {peer.where}"
            raise _TlsFailed(Reply(None, "4.7.4", text))
        try:
            await smtp.starttls(server_hostname=peer.tls_name, tls_context=self._context(mode))
        except (SMTPException, OSError) as exc:
            raise _tls_failure(exc, peer) from None
        await _hello(smtp)  # RFC 3207 §4.2: forget what was learnt before TLS
        return _secured(peer, mode)

    def _context(self, mode: str) -> ssl.SSLContext:
        """Verify the certificate for the verify mode; else encrypt without checking it."""
        return self._policy.context if mode == VERIFY else self._tls

    async def _carry(
        self,
        smtp: Connection,
        peer: _Peer,
        message: _Message,
        uses: int,
        kind: str,
        reset: bool = False,
    ) -> list[RecipientResult]:
        """The transaction on an open session, its uses-th, counted as kind (reset: a pooled
        session RSET in the same write, _Stale and not counted if that fails); then, if it
        ended cleanly and may carry more, the session waits in the pool for the next one, else
        it QUITs."""
        counter = metrics.CONNECTIONS.labels(kind)
        try:
            results = await self._transaction(smtp, peer, message, reset)
        except _Stale:
            raise  # the pooled session had gone: no transaction on it
        except BaseException:
            counter.inc()
            raise
        counter.inc()
        clean = smtp.is_connected and all(result.reply.code != 421 for result in results)
        if clean and uses < self._cfg.reuse.max_messages:
            self._pool.put(message.destination, Idle(smtp, peer.key, peer.tls, peer.verified, uses))
        else:
            await _quit(smtp)
        return results

    async def _transaction(
        self, smtp: SMTP, peer: _Peer, message: _Message, reset: bool
    ) -> list[RecipientResult]:
        """MAIL, RCPT for each recipient, DATA for those accepted: a reply per recipient. They
        go out one by one, or in one group when the server offers PIPELINING (reset, which
        only a pipelined session asks for, puts an RSET first in the group)."""
        if message.smtputf8 and not smtp.supports_extension("smtputf8"):
            return [peer.result(recipient, NO_SMTPUTF8) for recipient in message.recipients]
        if pipelining.offered(smtp):
            return await self._pipelined(smtp, peer, message, reset)
        refusal = await _mail(smtp, message)
        if refusal is not None:
            return [peer.result(recipient, refusal) for recipient in message.recipients]
        replies = [await _rcpt(smtp, rcpt, message.encoding) for rcpt in message.recipients]
        return await self._deliver_data(smtp, peer, message, replies)

    async def _pipelined(
        self, smtp: SMTP, peer: _Peer, message: _Message, reset: bool
    ) -> list[RecipientResult]:
        """RFC 2920: [RSET,] MAIL, every RCPT and DATA in one write, then their replies in
        order, and the body when DATA got 354 and a recipient was accepted. The replies mean
        what they mean one by one; a failed RSET raises _Stale (the pooled session had gone)."""
        head = [b"RSET"] if reset else []
        rcpts = [_rcpt_command(rcpt, message.encoding) for rcpt in message.recipients]
        group = pipelining.send(smtp, [*head, _mail_command(smtp, message), *rcpts, b"DATA"])
        timeout = self._cfg.command_timeout
        if reset:
            await _rset_reply(smtp, group, min(timeout, RSET_TIMEOUT))
        refusal = _mail_reply(await pipelining.reply(group, timeout), message.sender)
        replies = [
            _rcpt_reply(await pipelining.reply(group, timeout), rcpt) for rcpt in message.recipients
        ]
        if refusal is not None:
            await self._no_data(smtp, group)
            return [peer.result(recipient, refusal) for recipient in message.recipients]
        return await self._deliver_data(smtp, peer, message, replies, group)

    async def _deliver_data(
        self,
        smtp: SMTP,
        peer: _Peer,
        message: _Message,
        replies: list[Reply],
        group: pipelining.Group | None = None,
    ) -> list[RecipientResult]:
        """After the RCPT replies: DATA and the body when a recipient was accepted (a pipelined
        DATA without one is answered by _no_data); a result per recipient."""
        accepted = [classify(reply).verdict is Verdict.DELIVERED for reply in replies]
        if any(accepted):
            final = await self._data(smtp, message.body, message.size <= INLINE_READ, group)
            replies = [final if ok else reply for ok, reply in zip(accepted, replies, strict=True)]
        elif group is not None:
            await self._no_data(smtp, group)
        return [peer.result(r, reply) for r, reply in zip(message.recipients, replies, strict=True)]

    async def _data(
        self, smtp: SMTP, body: BinaryIO, inline: bool, group: pipelining.Group | None = None
    ) -> Reply:
        """DATA (already sent in group, if given) and the streamed body; the reply applies to
        every accepted recipient."""
        context = "connection lost before end of data"
        try:
            if group is None:
                start = await smtp.execute_command(b"DATA")
            else:
                start = await pipelining.reply(group, self._cfg.command_timeout)
            if start.code != 354:
                return Reply.parse(start.code, start.message)
            protocol = smtp.protocol
            if protocol is None:
                raise SMTPServerDisconnected("Connection lost")
            end = await _stream(protocol, body, inline)
            context = "connection lost after end of data"
            # Write the end and await the reply with nothing awaited in between: aiosmtplib
            # drops bytes that arrive while no reply is awaited. RFC 5321 §4.5.3.2.6: 10 min.
            protocol.write(end)
            final = await protocol.read_response(timeout=self._cfg.data_timeout)
        except (SMTPException, OSError) as exc:
            smtp.close()
            return Reply.from_error(exc, context)
        return Reply.parse(final.code, final.message)

    async def _no_data(self, smtp: SMTP, group: pipelining.Group) -> None:
        """The reply to a pipelined DATA that must not carry the message (MAIL refused, or no
        recipient accepted): a server that says 354 anyway gets an empty message ended at once
        (RFC 2920 §3.1), and a session in doubt is closed rather than pooled."""
        timeout = self._cfg.command_timeout
        try:
            start = await pipelining.reply(group, timeout)
            if start.code == 354:
                group.write(b".\r\n")
                await group.read_response(timeout=timeout)
        except (SMTPException, OSError):
            smtp.close()


async def _hello(smtp: SMTP) -> None:
    """EHLO, or HELO from a server that refuses EHLO but stays connected (RFC 5321 §4.1.1.1)."""
    try:
        await smtp.ehlo()
    except SMTPHeloError:
        if not smtp.is_connected:
            raise
        await smtp.helo()


async def _mail(smtp: SMTP, message: _Message) -> Reply | None:
    """MAIL FROM: None when accepted, the reply when refused permanently (_mail_reply)."""
    return _mail_reply(await smtp.execute_command(_mail_command(smtp, message)), message.sender)


def _mail_command(smtp: SMTP, message: _Message) -> bytes:
    """MAIL FROM with the extensions the server offers."""
    options = [f"SIZE={message.size}"] if smtp.supports_extension("size") else []  # RFC 1870
    if smtp.supports_extension("8bitmime"):
        options.append("BODY=8BITMIME")  # RFC 6152
    if message.smtputf8:
        options.append("SMTPUTF8")  # RFC 6531 §3.4
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


async def _rcpt(smtp: SMTP, recipient: str, encoding: str) -> Reply:
    """The RCPT reply for one recipient (_rcpt_reply)."""
    return _rcpt_reply(await smtp.execute_command(_rcpt_command(recipient, encoding)), recipient)


def _rcpt_command(recipient: str, encoding: str) -> bytes:
    return b"RCPT TO:" + quote_address(recipient).encode(encoding)


def _rcpt_reply(response: SMTPResponse, recipient: str) -> Reply:
    """The reply to a recipient's RCPT; a 421 (RFC 5321 §3.8) raises."""
    if response.code == 421:
        raise SMTPRecipientRefused(response.code, response.message, recipient)
    return Reply.parse(response.code, response.message)


async def _rset_reply(smtp: SMTP, group: pipelining.Group, timeout: float) -> None:
    """The reply to the RSET that opens a pooled session's group: _Stale (the session closed)
    unless it is 250."""
    try:
        stale = (await pipelining.reply(group, timeout)).code != 250
    except (SMTPException, OSError):
        stale = True
    if stale:
        smtp.close()
        raise _Stale


async def _quit(smtp: SMTP) -> None:
    """QUIT politely (RFC 5321 §4.1.1.10) and close; a server that is already gone is no error."""
    with contextlib.suppress(SMTPException, OSError):
        await smtp.quit()
    smtp.close()


async def _login(smtp: SMTP, peer: _Peer) -> None:
    """AUTH with a smarthost's credentials (RFC 4954), never in clear unless its tls is none.
    A refusal is temporary, so the next smarthost is tried and the mail is deferred, never
    bounced (as Postfix's smtp_sasl_auth_soft_bounce does)."""
    login = peer.login
    if login is None:
        return
    if not peer.tls and (peer.smarthost is None or peer.smarthost.tls != "none"):
        text = f"credentials for {peer.where} are never sent without TLS"
        raise _Unsettled(peer, Reply(None, "4.7.0", text))
    try:
        await smtp.login(*login)
    except SMTPException as exc:
        text = f"authentication at {peer.where} failed: {_reply(exc)}"
        raise _Unsettled(peer, Reply(None, "4.7.0", text)) from None


async def _tcp(peer: _Peer, timeout: float) -> socket.socket:
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


def _no_host(route: Route, policy: Policy, *, skipped: bool) -> Reply:
    """Why no address was tried: no host at all, or none that the MTA-STS policy lists."""
    if not (skipped and route.hosts):
        return Reply(None, None, f"no MX to try for {route.domain}")
    text = f"no MX host of {route.domain} is listed in its MTA-STS policy ({', '.join(policy.mx)})"
    return Reply(None, "4.7.5", text)


def _host_policy(host: Host, policy: Policy) -> Policy:
    """The TLS policy at host: a smarthost's own tls and verify settings (MTA-STS and
    delivery.tls do not apply to it), else the recipient domain's policy."""
    smarthost = host.smarthost
    if smarthost is None:
        return policy
    if smarthost.tls in ("starttls", "smtps"):
        return Policy(VERIFY if smarthost.verify else REQUIRED, "smarthost")
    return Policy(PLAINTEXT if smarthost.tls == "none" else OPPORTUNISTIC, "smarthost")


def _satisfies(policy: Policy, tls: bool, verified: bool) -> bool:
    """Whether a session with that TLS may carry mail under policy: opportunistic, plain text
    and testing take any; required takes TLS; verify a verified certificate."""
    if policy.testing or policy.mode in (OPPORTUNISTIC, PLAINTEXT):
        return True
    return verified if policy.mode == VERIFY else tls


def _unlisted(peer: _Peer, policy: Policy) -> _Peer:
    """RFC 8461 §5: note an MX host that an MTA-STS policy in testing mode does not list."""
    if policy.allows(peer.mx or ""):
        return peer
    metrics.STS_TESTING_FAILURES.inc()
    return peer.noting(f"MTA-STS testing: {peer.mx} is not an MX host the policy lists")


def _reused(peer: _Peer, policy: Policy) -> _Peer:
    """Under a policy in testing mode, note what enforce would refuse of a reused session."""
    if not policy.testing:
        return peer
    peer = _unlisted(peer, policy)
    if peer.verified:
        return peer
    metrics.STS_TESTING_FAILURES.inc()
    return peer.noting(f"MTA-STS testing: the session to {peer.where} is not verified")


def _secured(peer: _Peer, mode: str) -> _Peer:
    """Count the session's TLS once it is had; the peer with what was achieved."""
    verify = mode == VERIFY
    metrics.TLS.labels("verified" if verify else "encrypted").inc()
    return replace(peer, tls=True, verified=verify)


def _tls_failure(exc: BaseException, peer: _Peer) -> _TlsFailed:
    """A failed TLS handshake with peer: its certificate, or anything else."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        text = f"certificate of {peer.where} not verified: {exc.verify_message}"
    else:
        text = f"TLS handshake with {peer.where} failed: {exc}"
    return _TlsFailed(Reply(None, "4.7.5", text))


def _failed(smtp: SMTP, peer: _Peer, exc: BaseException) -> BaseException:
    """Close smtp after exc; what to raise then: network and protocol trouble as _Unsettled
    (the next address is tried), anything else as it was."""
    smtp.close()
    if isinstance(exc, SMTPException | OSError):
        return _Unsettled(peer, _reply(exc, peer.where))
    return exc


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
