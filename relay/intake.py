"""Intake stage: the aiosmtpd SMTP dialogue, relay policy and limits, the Received: header, and
the durable write that comes before `250 queued as <id>`."""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import re
import time
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from relay import logs, metrics
from relay.config import Config
from relay.spool import Message, Recipient, Spool, new_id

# RFC 2034 §3: every reply but the greeting, EHLO/HELO, 354 and 334 carries an enhanced code.
ENHANCED_RE = re.compile(rb"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")
DEFAULT_ENHANCED = {
    221: "2.0.0", 250: "2.0.0", 421: "4.3.2", 450: "4.2.0", 451: "4.3.0", 452: "4.3.1",
    454: "4.7.0", 500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4",
    530: "5.7.0", 550: "5.0.0", 552: "5.3.4", 553: "5.1.3", 554: "5.0.0", 555: "5.5.4",
}  # fmt: skip
# aiosmtpd's own wording for the RFC 1870 size limit, replaced by the RFC 3463 one.
REWRITES = {
    b"552 Error: Too much mail data": b"552 5.3.4 Message too big for system",
    b"552 Error: message size exceeds fixed maximum message size": (
        b"552 5.3.4 Message size exceeds fixed maximum message size"
    ),
}
DOMAIN_RE = re.compile(
    r"^([A-Za-z0-9\u0080-\U0010ffff]([A-Za-z0-9\u0080-\U0010ffff-]{0,61}"
    r"[A-Za-z0-9\u0080-\U0010ffff])?\.)*[A-Za-z0-9\u0080-\U0010ffff]"
    r"([A-Za-z0-9\u0080-\U0010ffff-]{0,61}[A-Za-z0-9\u0080-\U0010ffff])?$"
)
BARE_LINE_END = re.compile(rb"(?<!\r)\n|\r(?!\n)")

REPLY_QUEUED = "250 2.0.0 queued as {}"
REPLY_RELAY_DENIED = "554 5.7.1 <{}>: Relay access denied"
REPLY_TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
REPLY_BAD_ADDRESS = "501 5.1.3 Bad {} address syntax"
REPLY_NEEDS_SMTPUTF8 = "553 5.6.7 Non-ASCII address requires SMTPUTF8"
REPLY_BARE_LINE_END = "550 5.6.0 Message contains bare CR or LF (RFC 5321 §2.3.8)"
REPLY_LOCAL_ERROR = "451 4.3.0 Error: queue file write error, try again later"
REPLY_SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"


class RelaySMTP(SMTP):
    """aiosmtpd's server with RFC 3463 enhanced codes on the replies it writes by itself,
    counted sessions, and a way to be told the daemon is shutting down."""

    _plain_reply = False
    event_handler: IntakeHandler

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        metrics.SESSIONS.inc()
        self.event_handler.sessions.add(self)
        if self.event_handler.draining:
            self.shut()

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        metrics.SESSIONS.dec()
        self.event_handler.sessions.discard(self)

    def shut(self) -> None:
        """421 and close (RFC 5321 §3.8): the daemon is stopping."""
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            metrics.REJECTED.labels("shutting_down").inc()
            transport.write(REPLY_SHUTTING_DOWN.encode() + b"\r\n")
            transport.close()

    @property
    def in_transaction(self) -> bool:
        return self.envelope is not None and self.envelope.mail_from is not None

    async def push(self, status: str | bytes) -> None:
        raw = status.encode("utf-8") if isinstance(status, str) else status
        if raw in REWRITES:
            metrics.REJECTED.labels("message_too_big").inc()
        await super().push(self._enhance(REWRITES.get(raw, raw)))

    def _enhance(self, reply: bytes) -> bytes:
        code = int(reply[:3]) if reply[:3].isdigit() else 0
        enhanced = DEFAULT_ENHANCED.get(code)
        if self._plain_reply or enhanced is None or ENHANCED_RE.match(reply):
            return reply
        return reply[:4] + enhanced.encode() + b" " + reply[4:]

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        await self._greeting_command(super().smtp_EHLO, hostname)

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        await self._greeting_command(super().smtp_HELO, hostname)

    async def _greeting_command(self, command: Callable[[str], Any], hostname: str) -> None:
        """EHLO/HELO replies carry no enhanced code (RFC 2034 §3)."""
        self._plain_reply = True
        try:
            await command(hostname)
        finally:
            self._plain_reply = False


class IntakeHandler:
    """aiosmtpd hooks: relay policy at RCPT, limits, the durable write at DATA."""

    def __init__(self, cfg: Config, spool: Spool, notify: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.spool = spool
        self.notify = notify
        self.sessions: set[RelaySMTP] = set()
        self.draining = False

    def reject(self, reason: str, reply: str, session: Session, **fields: Any) -> str:
        """Count and log one refusal, and return its reply."""
        metrics.REJECTED.labels(reason).inc()
        logs.event("rejected", reason=reason, client=peer_ip(session), reply=reply, **fields)
        return reply

    async def drain(self, grace: float) -> int:
        """Stop taking mail: new connections and idle sessions get 421 at once, sessions in a
        transaction when it ends. What is still open at grace is cut; returns how many."""
        self.draining = True
        deadline = time.monotonic() + grace
        while self.sessions and time.monotonic() < deadline:
            for session in list(self.sessions):
                if not session.in_transaction:
                    session.shut()
            await asyncio.sleep(0.05)
        return self.cut()

    def cut(self) -> int:
        """Close every session now (a second SIGTERM, or the grace period's end)."""
        self.draining = True
        open_sessions = [s for s in self.sessions if s.transport and not s.transport.is_closing()]
        for session in open_sessions:
            session.shut()
        return len(open_sessions)

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        # RFC 2920 and RFC 2034: aiosmtpd supports both but does not advertise them.
        return [*responses[:-1], "250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        # RFC 5321 §4.5.5: the null reverse-path "<>" is how bounces are sent.
        if self.draining:  # no new transaction: 421, then close (RFC 5321 §3.8)
            metrics.REJECTED.labels("shutting_down").inc()
            if server.transport is not None:
                asyncio.get_running_loop().call_soon(server.transport.close)
            return REPLY_SHUTTING_DOWN
        problem = address_problem(address.strip("<>"), envelope.smtp_utf8, allow_empty=True)
        if problem:
            return self._address_rejected(problem, "sender", session, address)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if not self.may_relay(peer_ip(session)):
            return self.reject("relay_denied", REPLY_RELAY_DENIED.format(address), session)
        problem = address_problem(address, envelope.smtp_utf8, allow_empty=False)
        if problem:
            return self._address_rejected(problem, "recipient", session, address)
        if len(envelope.rcpt_tos) >= self.cfg.smtp.max_recipients:
            return self.reject("too_many_recipients", REPLY_TOO_MANY_RCPTS, session)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Ok"

    def _address_rejected(self, problem: str, role: str, session: Session, address: str) -> str:
        reason = "smtputf8_required" if problem == REPLY_NEEDS_SMTPUTF8 else "bad_address"
        return self.reject(reason, problem.format(role), session, address=address)

    def may_relay(self, peer: str) -> bool:
        """RFC 5321 §3.6.2 relaying: only clients inside relay_networks (no open relay)."""
        address = ipaddress.ip_address(peer.partition("%")[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in net for net in self.cfg.smtp.relay_networks)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        started = time.monotonic()
        content: bytes = envelope.original_content or b""
        if BARE_LINE_END.search(content):
            return self.reject("bare_line_end", REPLY_BARE_LINE_END, session)
        msg = self._message(session, envelope, len(content))
        header = received_header(self.cfg.smtp.hostname, session, envelope, msg.id)
        msg.size += len(header)
        try:
            await asyncio.to_thread(self.spool.accept, msg, (header, content))
        except Exception as exc:  # disk full, permissions, a bug: never a 5xx (invariant 2)
            logs.failure("intake", exc, id=msg.id)
            metrics.REJECTED.labels("local_error").inc()
            return REPLY_LOCAL_ERROR
        self.notify(msg.id)
        metrics.RECEIVED.inc()
        metrics.INTAKE_SECONDS.observe(time.monotonic() - started)
        logs.event(
            "received", id=msg.id, sender=msg.sender, rcpts=envelope.rcpt_tos,
            size=msg.size, client=peer_ip(session),
        )  # fmt: skip
        return REPLY_QUEUED.format(msg.id)

    def _message(self, session: Session, envelope: Envelope, size: int) -> Message:
        now = time.time()
        return Message(
            id=new_id(),
            sender="" if envelope.mail_from in ("<>", None) else envelope.mail_from,
            recipients=[Recipient(address) for address in envelope.rcpt_tos],
            queued_at=now,
            next_attempt=now,
            size=size,
            smtputf8=envelope.smtp_utf8,
            client={"ip": peer_ip(session), "helo": session.host_name or ""},
        )


def peer_ip(session: Session) -> str:
    peer = session.peer
    return str(peer[0] if isinstance(peer, tuple) else peer)


def address_problem(address: str, smtputf8: bool, *, allow_empty: bool) -> str | None:
    """The reply template for an unusable envelope address, or None (RFC 5321 §4.1.2)."""
    if not address:
        return None if allow_empty else REPLY_BAD_ADDRESS
    if not smtputf8 and not address.isascii():
        return REPLY_NEEDS_SMTPUTF8
    local, at, domain = address.rpartition("@")
    if not at or not local or len(address) > 254:
        return REPLY_BAD_ADDRESS
    if domain.startswith("[") and domain.endswith("]"):
        return None if _is_address_literal(domain[1:-1]) else REPLY_BAD_ADDRESS
    return None if DOMAIN_RE.match(domain) else REPLY_BAD_ADDRESS


def _is_address_literal(text: str) -> bool:
    try:
        ipaddress.ip_address(text[5:] if text.upper().startswith("IPV6:") else text)
    except ValueError:
        return False
    return True


def received_header(hostname: str, session: Session, envelope: Envelope, msg_id: str) -> bytes:
    """The trace header of RFC 5321 §4.4 (with RFC 6531's UTF8SMTP where used)."""
    protocol = "ESMTP" if session.extended_smtp else "SMTP"
    if envelope.smtp_utf8:
        protocol = "UTF8SMTP"
    helo = " ".join((session.host_name or "unknown").split())
    rcpts = envelope.rcpt_tos
    recipient = f"\r\n\tfor <{rcpts[0]}>" if len(rcpts) == 1 else ""
    date = email.utils.format_datetime(email.utils.localtime())
    header = (
        f"Received: from {helo} ([{peer_ip(session)}])\r\n"
        f"\tby {hostname} (relay) with {protocol} id {msg_id}{recipient};\r\n\t{date}\r\n"
    )
    return header.encode("utf-8")


class Notifier:
    """Wake-ups to the scheduler: one id per line over a persistent UNIX stream connection.

    Lossless while the scheduler runs. While it is down (or restarting), ids wait in a bounded
    backlog and the connection is retried; what is dropped is found by the scheduler's scan
    at its start and every scan_interval, so a wake-up only ever makes delivery faster.
    """

    BACKLOG = 10_000
    WRITE_BUFFER = 1 << 20

    def __init__(self, address: str) -> None:
        self.address = address
        self.writer: asyncio.StreamWriter | None = None
        self.backlog: list[bytes] = []
        self.connecting: asyncio.Task[None] | None = None

    def __call__(self, msg_id: str) -> None:
        line = msg_id.encode() + b"\n"
        writer = self.writer
        if writer is not None and not writer.is_closing():
            if writer.transport.get_write_buffer_size() < self.WRITE_BUFFER:
                writer.write(line)
            return
        if len(self.backlog) < self.BACKLOG:
            self.backlog.append(line)
        if self.connecting is None or self.connecting.done():
            self.connecting = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        try:
            _, writer = await asyncio.open_unix_connection(self.address)
        except OSError:
            self.backlog.clear()  # the scheduler is down: its start-up scan finds them
            return
        writer.write(b"".join(self.backlog))
        self.backlog.clear()
        self.writer = writer


async def serve(handler: IntakeHandler) -> list[asyncio.Server]:
    """Bind every listener in smtp.listen; an unbindable address raises OSError. Sessions
    take their limits from handler.cfg when they start, so a reload applies to new ones."""
    loop = asyncio.get_running_loop()

    def factory() -> RelaySMTP:
        cfg = handler.cfg
        return RelaySMTP(
            handler,
            data_size_limit=cfg.smtp.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=cfg.smtp.hostname,
            ident="relay",
            timeout=cfg.smtp.idle_timeout,
        )

    return [await loop.create_server(factory, h, p) for h, p in handler.cfg.smtp.listen]
