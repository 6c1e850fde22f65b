"""Intake stage, one SMTP session: aiosmtpd's protocol with RFC 3463 enhanced codes on its own
replies, per-connection limits and timers, AUTH answered after an asynchronous password check,
and a way to be told the daemon is stopping."""

from __future__ import annotations

import asyncio
import collections
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, TLSSetupException, syntax

from relay.intake.data import Draft, read_data
from relay.intake.guard import REPLY_TOO_FAST
from relay.mail.address import DOMAIN
from relay.mail.reply import ENHANCED
from relay.observe import logs, metrics

if TYPE_CHECKING:
    from relay.intake.handler import IntakeHandler

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
REPLY_CONTROL_CHARACTER = "500 5.5.2 Syntax error: control character in command"
REPLY_NOT_UTF8 = "500 5.5.2 Syntax error: command is not valid UTF-8"
REPLY_UNBALANCED = "501 5.5.4 Syntax error in parameters: unbalanced < >"
REPLY_CONTROL_IN_PARAMETER = "501 5.5.4 Syntax error in parameters: control character"
COMMAND_LIMIT = 510  # 512 minus the CRLF
MAX_REPLY = 510
# Bytes per recv(2) from a client. asyncio reads 256 KiB at a time, and a session whose DATA
# waits for its spill write holds one such read: at 300 sessions in DATA the intake grew by
# 242 MiB with 256 KiB reads and by 77 MiB with 64 KiB (bench/data_memory.py, 300 x 5 MB).
READ_SIZE = 64 * 1024
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # all C0 controls but TAB, and DEL
UNSAFE_IN_REPLY = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
KINDS = metrics.LISTENERS
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# The path nearly every client sends: <dot-atom@host name>, then nothing or a space and the
# parameters. Anything else (quoted or UTF-8 local parts, address literals, comments, <>)
# goes to aiosmtpd's RFC 5322 parser.
PLAIN_PATH = re.compile(
    rf"<(?P<addr>{_ATOM}(?:\.{_ATOM})*@{DOMAIN})>(?: +(?P<rest>[^ \t(].*))?\Z",
    re.S,
)


def syntax_problem(command: str, arg: str) -> str | None:
    """The reply for a command line that is not valid SMTP, or None. MAIL and RCPT get 501
    (a bad parameter); their non-ASCII addresses are judged later (553 5.6.7 or 501 5.1.3)."""
    if command in ("MAIL", "RCPT"):
        if CONTROL.search(arg):
            return REPLY_CONTROL_IN_PARAMETER
        return REPLY_UNBALANCED if arg.count("<") != arg.count(">") else None
    if CONTROL.search(arg):
        return REPLY_CONTROL_CHARACTER
    try:
        arg.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes arrive as surrogates
        return REPLY_NOT_UTF8
    return None


_HOOKS: dict[tuple[type, tuple[str, ...]], list[str]] = {}


def hook_names(cls: type, prefixes: tuple[str, ...]) -> list[str]:
    """The method names of cls that start with one of prefixes, found once per class."""
    key = (cls, prefixes)
    if key not in _HOOKS:
        _HOOKS[key] = [name for name in dir(cls) if name.startswith(prefixes)]
    return _HOOKS[key]


def plain_path(arg: str) -> tuple[str, str] | None:
    """(address, parameters) of a plain MAIL/RCPT path as aiosmtpd's _getaddr gives them, or
    None for anything that needs its full parser."""
    match = PLAIN_PATH.match(arg)
    return None if match is None else (match["addr"], match["rest"] or "")


@dataclass(frozen=True)
class Credentials:
    """What AUTH PLAIN or LOGIN decoded, waiting for the (slow, threaded) password check."""

    mechanism: str
    login: bytes
    password: bytes


# --- TLS handshakes that fail on the client's side -------------------------------------------


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

    def __init__(self, context: ssl.SSLContext, session: Callable[[], RelaySMTP]) -> None:
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


class RelaySMTP(SMTP):
    """One client connection. `kind` is the listener's: relay (AUTH optional), submission
    (AUTH required, after STARTTLS) or smtps (implicit TLS, AUTH required)."""

    _plain_reply = False
    event_handler: IntakeHandler
    # RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets with its CRLF. aiosmtpd counts
    # the CRLF too but allows 1001; its reader limit is also this line length.
    line_length_limit = 1000

    def __dir__(self) -> list[str]:
        """Only the SMTP verbs and AUTH mechanisms: aiosmtpd scans dir() of each new session
        with inspect.getmembers, which took a seventh of the intake's CPU on the full list."""
        return hook_names(type(self), ("smtp_", "auth_"))

    def __init__(self, handler: IntakeHandler, kind: str, **options: Any) -> None:
        super().__init__(handler, **options)
        self.kind = kind
        self.admitted = False
        self.ip = ""
        self.draft: Draft | None = None  # the message of the DATA command in progress
        self.deadline: asyncio.TimerHandle | None = None
        # RFC 5321 §4.5.3.1.4: 512 octets with the CRLF, which aiosmtpd does not count
        # (RFC 1870 and 6531 extensions still add their allowance to MAIL after EHLO).
        self.command_size_limit = COMMAND_LIMIT
        self.command_size_limits = collections.defaultdict(lambda: COMMAND_LIMIT)
        # aiosmtpd has no hook before each command; wrap its dispatch table to check them.
        self._smtp_methods = {
            name: self._checked(name, m) for name, m in self._smtp_methods.items()
        }

    # --- DATA --------------------------------------------------------------------------------

    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA with the same checks, replies and handler hook, but reading the
        mail data as it arrives into a Draft (relay/data.py): checked on the stream, the header
        block in memory, the body spilled to the spool beyond a bound. The handler finds the
        Draft as self.draft; it is discarded however the transaction ends."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self.draft = draft = self.event_handler.draft()
        try:
            await self._data(draft)
        finally:
            self.draft = None
            draft.discard()

    async def _data(self, draft: Draft) -> None:
        assert self.envelope is not None
        try:
            problem = await read_data(
                self._reader, draft, self.data_size_limit, self.line_length_limit,
                self._reset_timeout,
            )  # fmt: skip
        except asyncio.CancelledError:  # the connection was lost during DATA
            self._writer.close()
            raise
        except asyncio.IncompleteReadError:  # end of stream before the end of the data
            self._writer.close()
            return
        if problem is not None:
            await self.push(problem)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    # --- connection bookkeeping --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None  # STARTTLS calls this again on the same session
        if hasattr(transport, "max_size"):  # asyncio's socket transport: see READ_SIZE
            transport.max_size = READ_SIZE
        super().connection_made(transport)
        if not first:
            return
        handler = self.event_handler
        self.ip = client_ip(transport)
        refusal = handler.guard.admit(self.ip)
        if refusal is not None:
            reason, reply = refusal
            metrics.REJECTED.labels(reason).inc()
            self.shut(reply, count=False)
            return
        self.admitted = True
        metrics.SESSIONS.inc()
        handler.sessions.add(self)
        limits = handler.cfg.smtp.limits
        self.deadline = self.loop.call_later(
            limits.session_timeout, self.shut, REPLY_SESSION_TOO_LONG
        )
        if self.kind == "smtps" or handler.plaintext_auth_allowed(self.ip):
            self._auth_require_tls = False  # already TLS, or loopback by configuration
        if handler.draining:
            self.shut()

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        if not self.admitted:
            return
        self.admitted = False
        if self.deadline is not None:
            self.deadline.cancel()
        metrics.SESSIONS.dec()
        self.event_handler.sessions.discard(self)
        self.event_handler.guard.leave(self.ip)

    async def handle_exception(self, error: Exception) -> str:
        """A failed STARTTLS handshake (RFC 3207 §4), which aiosmtpd raises as
        TLSSetupException and answers by closing, is the client's: tls_failed, not error.
        Anything else is our failure, for the handler (a 4xx)."""
        cause = error.__cause__
        if isinstance(error, TLSSetupException) and isinstance(cause, OSError):
            tls_failed(self.kind, self.ip, cause)
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
        return self.kind == "smtps" or self._tls_protocol is not None

    def _checked(
        self, name: str, method: Callable[[str], Awaitable[None]]
    ) -> Callable[[str], Awaitable[None]]:
        """Before each command: the per-IP rate, then the line's syntax (RFC 5321 §4.1.2)."""

        async def checked(arg: str | None) -> None:
            if not self.event_handler.guard.command(self.ip):
                metrics.REJECTED.labels("rate_limited").inc()
                self.shut(REPLY_TOO_FAST, count=False)
                return
            problem = syntax_problem(name, arg or "")
            if problem:
                metrics.REJECTED.labels("bad_syntax").inc()
                await self.push(problem)
                return
            await method(arg)  # type: ignore[arg-type]

        return checked

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's parser (email's RFC 5322 one, 70 µs a call, twice per message) for
        anything but a plain path, which a regex reads the same way
        (tests/unit/intake/test_session.py compares the two; a local-part limit, which we do
        not set, is left to aiosmtpd too)."""
        plain = plain_path(arg)
        if plain is None or self.local_part_limit:
            return super()._getaddr(arg)
        return plain

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

    # --- AUTH: aiosmtpd decodes, the handler checks the password off the event loop ----------

    def _authenticate(self, mechanism: str, auth_data: Any) -> AuthResult:
        login, password = auth_data
        return AuthResult(
            success=False, handled=False, auth_data=Credentials(mechanism, login, password)
        )

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._check(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._check(await super().auth_LOGIN(_, args))

    async def _check(self, decoded: AuthResult) -> AuthResult:
        if not isinstance(decoded.auth_data, Credentials):
            return decoded  # aiosmtpd already answered (bad base64, aborted exchange)
        return await self.event_handler.authenticate(self, decoded.auth_data)
