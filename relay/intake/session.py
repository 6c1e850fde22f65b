"""Intake, one SMTP session: aiosmtpd's protocol with RFC 3463 enhanced codes on its own
replies, per-connection limits and timers, AUTH answered after an asynchronous password check,
and a way to be told the daemon is stopping."""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import os
import re
import socket
import struct
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import AuthResult, TLSSetupException, syntax

from relay.intake.auth import Credentials
from relay.intake.data import Draft, read_data
from relay.intake.guard import REPLY_TOO_FAST
from relay.intake.internals import BaseSession, Command
from relay.intake.registry import Registry
from relay.intake.syntax import syntax_problem
from relay.intake.tls import client_ip, tls_failed
from relay.mail.dsnparams import MailParams, RcptParams
from relay.mail.reply import ENHANCED
from relay.observe import metrics

# RFC 2034 §3: every reply but the greeting, EHLO/HELO, 354 and 334 carries an enhanced code.
ENHANCED_RE = re.compile(rb"^\d{3}[ -]" + ENHANCED.encode() + rb"( |$)")
DEFAULT_ENHANCED = {
    221: "2.0.0", 250: "2.0.0", 421: "4.3.2", 450: "4.2.0", 451: "4.3.0", 452: "4.3.1",
    454: "4.7.0", 500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4",
    530: "5.7.0", 535: "5.7.8", 538: "5.7.11", 550: "5.0.0", 552: "5.3.4", 553: "5.1.3",
    554: "5.0.0", 555: "5.5.4",
}  # fmt: skip
# aiosmtpd's own wording for the RFC 1870 size limit, replaced by the RFC 3463 one.
REWRITES = {
    b"552 Error: Too much mail data": b"552 5.3.4 Message too big for system",
    b"552 Error: message size exceeds fixed maximum message size": (
        b"552 5.3.4 Message size exceeds fixed maximum message size"
    ),
}
REPLY_SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
REPLY_SESSION_TOO_LONG = "421 4.4.2 Session time limit exceeded, closing"
REPLY_EXTERNAL_REFUSED = "535 5.7.8 EXTERNAL needs the API socket and a tenant"
API = "api"  # the listener of the API worker's submissions (relay/intake/listeners.py)
# What a session on the API's UNIX socket is logged and traced as coming from (it has no IP).
LOCAL_PEER = "127.0.0.1"
COMMAND_LIMIT = 510  # 512 minus the CRLF
DSN_MAIL_ALLOWANCE, DSN_RCPT_ALLOWANCE = 100, 500  # RFC 3461 §5 (RCPT: within the 1000 below)
MAX_REPLY = 510
# Bytes per recv(2) from a client. asyncio reads 256 KiB at a time, and a session whose DATA
# waits for its spill write holds one such read: at 300 sessions in DATA the intake grew by
# 242 MiB with 256 KiB reads and by 77 MiB with 64 KiB (bench/data_memory.py, 300 x 5 MB).
READ_SIZE = 64 * 1024
UNSAFE_IN_REPLY = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class RelaySMTP(BaseSession):
    """One client connection. Its `listener` is relay (AUTH optional), submission (AUTH
    required, after STARTTLS) or smtps (implicit TLS, AUTH required)."""

    _plain_reply = False
    # RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets with its CRLF. aiosmtpd counts
    # the CRLF too but allows 1001; its reader limit is also this line length.
    line_length_limit = 1000

    def __init__(self, handler: object, listener: str, registry: Registry, **options: Any) -> None:
        super().__init__(handler, **options)
        self.listener = listener
        self.registry = registry
        self.admitted = False
        self.ip = ""
        self.draft: Draft | None = None  # the message of the DATA command in progress
        self.deadline: asyncio.TimerHandle | None = None
        # RFC 5321 §4.5.3.1.4: 512 octets with the CRLF, which aiosmtpd does not count
        # (RFC 1870 and 6531 extensions still add their allowance to MAIL after EHLO).
        self.command_size_limit = COMMAND_LIMIT
        self.command_size_limits = collections.defaultdict(lambda: COMMAND_LIMIT)
        # RFC 3461 parameters of the transaction: MAIL's, and each accepted RCPT's in order.
        self.dsn_mail = MailParams()
        self.dsn_rcpts: list[tuple[str, RcptParams]] = []
        self.wrap_commands(self._checked)

    # --- DATA --------------------------------------------------------------------------------

    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA with the same checks, replies and handler hook, but reading the
        mail data as it arrives into a Draft (relay/intake/data.py): checked on the stream, the
        header block in memory, the body spilled to the spool beyond a bound. The handler finds
        the Draft as self.draft; it is discarded however the transaction ends."""
        if not await self.start_data(arg):
            return
        self.draft = draft = self.registry.draft()
        try:
            await self._data(draft)
        finally:
            self.draft = None
            draft.discard()

    async def _data(self, draft: Draft) -> None:
        try:
            problem = await read_data(
                self.reader, draft, self.data_size_limit, self.line_length_limit,
                self.restart_idle_timer,
            )  # fmt: skip
        except asyncio.CancelledError:  # the connection was lost during DATA
            self.close_stream()
            raise
        except asyncio.IncompleteReadError:  # end of stream before the end of the data
            self.close_stream()
            return
        await self.end_data(problem)

    # --- connection bookkeeping --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None  # STARTTLS calls this again on the same session
        if hasattr(transport, "max_size"):  # asyncio's socket transport: see READ_SIZE
            transport.max_size = READ_SIZE
        super().connection_made(transport)
        if not first:
            return
        registry = self.registry
        self.ip = client_ip(transport)
        if self.listener == API and self.session is not None:
            self.ip = LOCAL_PEER
            self.session.peer = LOCAL_PEER
        refusal = registry.join(self)
        if refusal is not None:
            reason, reply = refusal
            metrics.REJECTED.labels(reason).inc()
            self.shut(reply, count=False)
            return
        self.admitted = True
        metrics.SESSIONS.inc()
        limits = registry.cfg.smtp.limits
        self.deadline = self.loop.call_later(
            limits.session_timeout, self.shut, REPLY_SESSION_TOO_LONG
        )
        if self.listener in ("smtps", API) or registry.plaintext_auth_allowed(self.ip):
            self.allow_auth_without_tls()  # already TLS, a local socket, or by configuration
        if registry.draining:
            self.shut()

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        if not self.admitted:
            return
        self.admitted = False
        if self.deadline is not None:
            self.deadline.cancel()
        metrics.SESSIONS.dec()
        self.registry.leave(self)

    async def handle_exception(self, error: Exception) -> str:
        """A failed STARTTLS handshake (RFC 3207 §4), which aiosmtpd raises as
        TLSSetupException and answers by closing, is the client's: tls_failed, not error.
        Anything else is our failure, for the handler (a 4xx)."""
        cause = error.__cause__
        if isinstance(error, TLSSetupException) and isinstance(cause, OSError):
            tls_failed(self.listener, self.ip, cause)
            return ""  # never sent: aiosmtpd closes the connection after a TLSSetupException
        return await super().handle_exception(error)

    def shut(self, reply: str = REPLY_SHUTTING_DOWN, count: bool = True) -> None:
        """Say why in a 421 and close (RFC 5321 §3.8)."""
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            if count:
                metrics.REJECTED.labels("shutting_down").inc()
            transport.write(reply.encode() + b"\r\n")
            transport.close()

    @property
    def in_transaction(self) -> bool:
        return self.envelope is not None and self.envelope.mail_from is not None

    @property
    def tls_active(self) -> bool:
        return self.listener == "smtps" or self.starttls_done

    def _checked(self, name: str, method: Command) -> Command:
        """Before each command: the per-IP rate, then the line's syntax (RFC 5321 §4.1.2)."""

        async def checked(arg: str | None) -> None:
            if self.listener != API and not self.registry.guard.command(self.ip):
                metrics.REJECTED.labels("rate_limited").inc()
                self.shut(REPLY_TOO_FAST, count=False)
                return
            problem = syntax_problem(name, arg or "")
            if problem:
                metrics.REJECTED.labels("bad_syntax").inc()
                await self.push(problem)
                return
            self.verb = name
            await method(arg)

        return checked

    # --- replies -----------------------------------------------------------------------------

    async def push(self, status: str | bytes) -> None:
        raw = status.encode("utf-8") if isinstance(status, str) else status
        if raw in REWRITES:
            metrics.REJECTED.labels("message_too_big").inc()
        # aiosmtpd echoes what the client sent in some replies: never echo control bytes,
        # and keep a reply line within RFC 5321 §4.5.3.1.5's 512 octets.
        safe = UNSAFE_IN_REPLY.sub(b"?", self._enhance(REWRITES.get(raw, raw)))[:MAX_REPLY]
        await super().push(safe)

    def _enhance(self, reply: bytes) -> bytes:
        code = int(reply[:3]) if reply[:3].isdigit() else 0
        enhanced = DEFAULT_ENHANCED.get(code)
        if self._plain_reply or enhanced is None or ENHANCED_RE.match(reply):
            return reply
        return reply[:4] + enhanced.encode() + b" " + reply[4:]

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        """EHLO, and with the DSN it lists, MAIL and RCPT lines longer by what RET and ENVID,
        NOTIFY and ORCPT may add (RFC 3461 §5)."""
        await self._greeting_command(super().smtp_EHLO, hostname)
        if self.session is not None and self.session.extended_smtp:
            self.command_size_limits["MAIL"] += DSN_MAIL_ALLOWANCE
            self.command_size_limits["RCPT"] = COMMAND_LIMIT + DSN_RCPT_ALLOWANCE

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

    # --- AUTH: aiosmtpd decodes, the registry checks the password off the event loop ---------

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._check(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._check(await super().auth_LOGIN(_, args))

    async def auth_EXTERNAL(self, _: Any, args: list[str]) -> AuthResult:
        """SASL EXTERNAL (RFC 4422 appendix A) on the API's socket: the channel is the
        credential (a peer of our own uid), and the authorization identity names the tenant
        the HTTP request's token belongs to. Offered on no other listener."""
        tenant = ""
        if len(args) == 2 and self.listener == API and self._peer_is_us():
            try:
                tenant = base64.b64decode(args[1], validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                tenant = ""
        if not tenant or not tenant.isprintable():
            return AuthResult(success=False, handled=False, message=REPLY_EXTERNAL_REFUSED)
        return AuthResult(success=True, auth_data=tenant)

    def _peer_is_us(self) -> bool:
        """Whether the UNIX socket's peer runs as our uid (Linux SO_PEERCRED)."""
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is None or sock.family != socket.AF_UNIX:
            return False
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return bool(struct.unpack("3i", creds)[1] == os.getuid())

    async def _check(self, decoded: AuthResult) -> AuthResult:
        if not isinstance(decoded.auth_data, Credentials):
            return decoded  # aiosmtpd already answered (bad base64, aborted exchange)
        return await self.registry.authenticate(self, decoded.auth_data)
