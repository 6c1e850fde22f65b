"""Intake stage: relay policy and limits, AUTH decisions, priority lanes and sending quotas, the
Received: header, and the durable write that comes before `250 queued as <id>`."""

from __future__ import annotations

import asyncio
import email.utils
import re
import ssl
import time
from collections.abc import Callable
from email.parser import BytesHeaderParser
from email.policy import SMTP as SMTP_POLICY
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

from relay.config.model import Config, ConfigError, why
from relay.intake import directives, dkim, quota, users
from relay.intake.data import Draft, pieces
from relay.intake.guard import REPLY_BANNED, Guard, client_address
from relay.intake.session import (
    KINDS,
    REPLY_SHUTTING_DOWN,
    Credentials,
    ImplicitTLS,
    RelaySMTP,
    hook_names,
)
from relay.mail.address import address_literal
from relay.observe import logs, metrics
from relay.spool.groupcommit import GroupCommit
from relay.spool.store import Content, Message, Recipient, Spool, new_id

DOMAIN_RE = re.compile(
    r"^([A-Za-z0-9\u0080-\U0010ffff]([A-Za-z0-9\u0080-\U0010ffff-]{0,61}"
    r"[A-Za-z0-9\u0080-\U0010ffff])?\.)*[A-Za-z0-9\u0080-\U0010ffff]"
    r"([A-Za-z0-9\u0080-\U0010ffff-]{0,61}[A-Za-z0-9\u0080-\U0010ffff])?$"
)

REPLY_QUEUED = "250 2.0.0 queued as {}"
REPLY_RELAY_DENIED = "554 5.7.1 <{}>: Relay access denied"
REPLY_TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
REPLY_BAD_ADDRESS = "501 5.1.3 Bad {} address syntax"
REPLY_NEEDS_SMTPUTF8 = "553 5.6.7 Non-ASCII address requires SMTPUTF8"
REPLY_BARE_LINE_END = "550 5.6.0 Message contains bare CR or LF (RFC 5321 section 2.3.8)"
REPLY_NUL = "550 5.6.0 Message contains NUL characters"
REPLY_NOT_OWNER = "553 5.7.1 <{}>: Sender address not owned by user {}"
REPLY_FROM_NOT_OWNER = "550 5.7.1 From: header address {} not owned by user {}"
REPLY_AUTH_OK = "235 2.7.0 Authentication successful"
REPLY_AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
REPLY_LOCAL_ERROR = "451 4.3.0 Error: queue file write error, try again later"
REPLY_INTERNAL = "451 4.3.0 Internal error, try again later"
REPLY_QUOTA_ERROR = "451 4.3.0 Error: sending quota ledger unavailable, try again later"
# RFC 1870 §6.1 and RFC 3463 4.3.1: no room for a new message now (spool.min_free).
REPLY_NO_STORAGE = "452 4.3.1 Insufficient system storage"
SPACE_MAX_AGE = 1.0  # seconds a reading of the spool's free space serves MAIL FROM
# A well-formed hash that matches nothing, checked for unknown users so that failing with an
# unknown name takes as long as failing with a wrong password.
DUMMY_HASH = users.hash_password("relay-dummy-password")


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


def signer(cfg: Config) -> dkim.Signer | None:
    """The DKIM signer for the configured keys, or None; ConfigError if a key is unusable."""
    if not cfg.dkim.keys:
        return None
    try:
        return dkim.Signer(cfg.dkim)
    except dkim.DkimError as exc:
        raise ConfigError(f"dkim.keys: {exc}") from None


class IntakeHandler:
    """aiosmtpd hooks: relay policy at RCPT, sender ownership, limits, the durable write."""

    def __dir__(self) -> list[str]:
        """Only the hooks aiosmtpd looks for, as RelaySMTP.__dir__ (it scans us per session)."""
        return hook_names(type(self), ("handle_", "auth_"))

    def __init__(self, cfg: Config, spool: Spool, notify: Callable[[str], None]) -> None:
        self.spool = spool
        self.notify = notify
        self.sessions: set[RelaySMTP] = set()
        self.draining = False
        self.guard = Guard(cfg)
        self.users: dict[str, users.User] = {}
        self.users_stamp: tuple[float, int] | None = None
        self.ledger = quota.Ledger(spool.run_path("quota.json"))
        # Sessions finishing DATA together share one flush (DESIGN invariant 1: group commit).
        self.commits: GroupCommit[tuple[Message, Content | None]] = GroupCommit(spool.accept_batch)
        self.configure(cfg)

    def configure(self, cfg: Config) -> None:
        """Start-up and SIGHUP: limits, certificates and users as the file now says."""
        self.cfg = cfg
        self.guard.cfg = cfg
        self.tls = tls_context(cfg)
        self.signer = signer(cfg)
        self.users_stamp = None

    def draft(self) -> Draft:
        """Where a session's DATA goes while it arrives."""
        return Draft(self.spool.spill)

    def plaintext_auth_allowed(self, ip: str) -> bool:
        return self.cfg.smtp.auth.plaintext_on_loopback and client_address(ip).is_loopback

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

    async def handle_exception(self, error: Exception) -> str:
        """A bug while accepting mail is our failure: 4xx, never 5xx (DESIGN invariant 2)."""
        logs.failure("intake", error)
        return REPLY_INTERNAL

    # --- AUTH --------------------------------------------------------------------------------

    def user_table(self) -> dict[str, users.User]:
        """The users file, read again when it changes (`relay user` on a running daemon)."""
        path = self.cfg.smtp.auth.users_file
        if path is None:
            return {}
        try:
            stat = path.stat()
            stamp = (stat.st_mtime, stat.st_size)
        except OSError:
            stamp = (0.0, 0)
        if stamp != self.users_stamp:
            try:
                self.users = users.load(path)
            except users.UsersError as exc:
                logs.failure("intake", exc, action="load_users")  # keep the previous table
            self.users_stamp = stamp
        return self.users

    async def authenticate(self, server: RelaySMTP, creds: Credentials) -> AuthResult:
        """Check a password off the event loop; failures wait longer each time, then ban."""
        if self.guard.is_banned(server.ip):
            server.shut(REPLY_BANNED, count=False)
            return AuthResult(success=False, handled=True)
        name = creds.login.decode("utf-8", "replace")
        user = self.user_table().get(name)
        password = creds.password.decode("utf-8", "replace")
        stored = user.password_hash if user else DUMMY_HASH
        ok = await asyncio.to_thread(users.check_password, password, stored)
        if user is None or not ok:
            delay = self.guard.auth_failed(server.ip)
            await asyncio.sleep(delay)
            metrics.REJECTED.labels("auth_failed").inc()
            logs.event("auth_failed", client=server.ip, user=name, mechanism=creds.mechanism)
            return AuthResult(success=False, handled=False, message=REPLY_AUTH_FAILED)
        logs.event("authenticated", client=server.ip, user=name, mechanism=creds.mechanism)
        return AuthResult(success=True, auth_data=name, message=REPLY_AUTH_OK)

    def _owner(self, session: Session) -> users.User | None:
        """The authenticated user of this session, if any."""
        if not session.authenticated:
            return None
        return self.user_table().get(str(session.auth_data))

    # --- the dialogue --------------------------------------------------------------------------

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if self.cfg.smtp.auth.users_file is None:  # aiosmtpd always lists AUTH
            responses = [r for r in responses if not r.startswith("250-AUTH")]
        # RFC 2920 and RFC 2034: aiosmtpd supports both but does not advertise them.
        return [*responses[:-1], "250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.draining:  # no new transaction: 421, then close (RFC 5321 §3.8)
            metrics.REJECTED.labels("shutting_down").inc()
            if server.transport is not None:
                asyncio.get_running_loop().call_soon(server.transport.close)
            return REPLY_SHUTTING_DOWN
        # RFC 5321 §4.5.5: the null reverse-path "<>" is how bounces are sent.
        sender = address.strip("<>")
        problem = address_problem(sender, envelope.smtp_utf8, allow_empty=True)
        if problem:
            return self._address_rejected(problem, "sender", session, address)
        owner = self._owner(session)
        if owner is not None and sender and not owner.may_send_as(sender.rpartition("@")[2]):
            reply = REPLY_NOT_OWNER.format(sender, owner.name)
            return self.reject("sender_not_owned", reply, session, user=owner.name)
        shortage = self._storage_shortage(options)
        if shortage:
            return self.reject("disk_reserve", REPLY_NO_STORAGE, session, detail=shortage)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    def _storage_shortage(self, options: list[str]) -> str | None:
        """Why the spool has no room for this transaction, or None: free space (or a declared
        SIZE) against the reserve, read from the file system at most every SPACE_MAX_AGE."""
        if self.cfg.spool.min_free == 0:
            return None
        declared = [o[len("SIZE=") :] for o in options if o.startswith("SIZE=")]
        size = int(declared[0]) if declared and declared[0].isdecimal() else 0
        return self.cfg.spool.shortage(self.spool.space(SPACE_MAX_AGE), size)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if not (session.authenticated or self.guard.trusted(peer_ip(session))):
            # RFC 5321 §3.6.2: relay only for relay_networks or authenticated users.
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

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        started = time.monotonic()
        assert isinstance(server, RelaySMTP) and server.draft is not None
        draft = server.draft
        if draft.error is not None:  # the spill file could not be written: ours, so 4xx
            return self._local_error(draft.error, action="spill")
        refusal = self._content_problem(draft, session)
        if refusal:
            return refusal
        try:
            head, asked = directives.extract(draft.head, priority=self.cfg.lanes.header)
        except directives.DirectiveError as exc:
            return self.reject("bad_directive", str(exc), session)
        msg = self._message(session, envelope, len(head) + draft.body_size)
        if asked.send_at is not None and asked.send_at > msg.queued_at:
            msg.send_at = msg.next_attempt = asked.send_at
        msg.lane = asked.priority or self._lane(session, server.kind)
        quotas = self._quotas(session, msg.sender)
        place, refusal = await self._reserve(msg, quotas, session)
        if refusal:
            return refusal
        header = received_header(self.cfg.smtp.hostname, server, session, envelope, msg.id)
        if not await asyncio.shield(self._store(msg, header, head, draft)):
            await self._release(quotas, place)
            return REPLY_LOCAL_ERROR
        self.notify(msg.id)
        metrics.RECEIVED.inc()
        metrics.INTAKE_SECONDS.observe(time.monotonic() - started)
        logs.event(
            "received", id=msg.id, sender=msg.sender, rcpts=envelope.rcpt_tos,
            size=msg.size, client=peer_ip(session), user=session.auth_data, send_at=msg.send_at,
            lane=msg.lane, quota_until=msg.quota_until,
        )  # fmt: skip
        if msg.quota_until is not None:
            metrics.QUOTA_HELD.labels("held").inc()
            logs.event("quota_held", id=msg.id, until=msg.quota_until, quota=quota.describe(place))
        return REPLY_QUEUED.format(msg.id)

    async def _store(self, msg: Message, header: bytes, head: bytes, draft: Draft) -> bool:
        """Sign the message and write it durably; False (logged and counted) if that failed.
        Shielded by the caller: a session cut meanwhile does not leave half a message."""
        body, spilled = draft.parts, draft.spill is not None  # before the session may let go
        try:
            # DKIM signs what leaves; our Received: is not among the signed fields.
            if self.signer is not None and draft.whole_head:
                signature = await asyncio.to_thread(self.signer.sign, head, pieces(body))
                header = (signature or b"") + header
            msg.size += len(header)
            content = (header, head, *body)
            if spilled:  # large: copied in a thread of its own, not in the batch
                await asyncio.to_thread(self.spool.write_content, msg.id, content)
            await self.commits.submit((msg, None if spilled else content))
        except Exception as exc:  # disk full, permissions, a bug: never a 5xx (invariant 2)
            self._local_error(exc, id=msg.id)
            return False
        return True

    def _local_error(self, exc: BaseException, **fields: Any) -> str:
        """Log and count a failure of ours while accepting; its 4xx reply."""
        logs.failure("intake", exc, **fields)
        metrics.REJECTED.labels("local_error").inc()
        return REPLY_LOCAL_ERROR

    # --- lanes and quotas --------------------------------------------------------------------

    def _lane(self, session: Session, kind: str) -> str:
        """The lane of the session's AUTH user, else of its listener, else normal (an
        X-Relay-Priority the message carries comes before both)."""
        lanes = self.cfg.lanes
        user = str(session.auth_data) if session.authenticated else None
        by_user = dict(lanes.users)
        if user in by_user:
            return by_user[user]
        return dict(lanes.listeners).get(kind, "normal")

    def _quotas(self, session: Session, sender: str) -> dict[str, tuple[quota.Window, ...]]:
        """The quotas a message counts against: its AUTH user's and its sender domain's (the
        names in the configuration are lowercase)."""
        quotas = self.cfg.quotas
        found: dict[str, tuple[quota.Window, ...]] = {}
        user = str(session.auth_data).lower() if session.authenticated else None
        users_quotas = dict(quotas.users)
        if user in users_quotas:
            found[f"user:{user}"] = users_quotas[user]
        domain = sender.rpartition("@")[2].lower() if sender else None
        domain_quotas = dict(quotas.sender_domains)
        if domain in domain_quotas:
            found[f"domain:{domain}"] = domain_quotas[domain]
        return found

    async def _reserve(
        self, msg: Message, quotas: quota.Quotas, session: Session
    ) -> tuple[quota.Decision, str | None]:
        """Count the message in its quotas' windows at max(now, send_at), holding it until a
        window with room (hold) or refusing it with 452 (refuse); a refusal reply or None.

        It is counted before the durable write so that concurrent intake processes see it at
        once; a failed write takes the count back (best effort, _release)."""
        t = max(msg.queued_at, msg.send_at or 0.0)
        if not quotas:
            return quota.Decision(t, False), None
        hold = self.cfg.quotas.action == "hold"
        try:
            decision = await asyncio.to_thread(self.ledger.reserve, quotas, t, hold=hold)
        except Exception as exc:  # the ledger file itself: 4xx, never 5xx (invariant 2)
            logs.failure("intake", exc, action="quota_ledger", id=msg.id)
            metrics.REJECTED.labels("local_error").inc()
            return quota.Decision(t, False), REPLY_QUOTA_ERROR
        if not decision.counted:
            metrics.QUOTA_HELD.labels("refused").inc()
            reply = quota.refusal(decision)
            return decision, self.reject(
                "over_quota", reply, session, quota=quota.describe(decision)
            )
        if decision.at > t:
            msg.quota_until = decision.at
            msg.next_attempt = max(msg.next_attempt, decision.at)
        return decision, None

    async def _release(self, quotas: quota.Quotas, place: quota.Decision) -> None:
        """Take back the count of a message that was not accepted after all (best effort: a
        failure leaves one message too many counted in its window)."""
        if not place.counted:
            return
        try:
            await asyncio.to_thread(self.ledger.release, quotas, place.at)
        except Exception as exc:
            logs.failure("intake", exc, action="quota_release")

    def _content_problem(self, draft: Draft, session: Session) -> str | None:
        """Refusals decided on the message itself, or None."""
        if draft.bare_line_end:
            return self.reject("bare_line_end", REPLY_BARE_LINE_END, session)
        if draft.nul:
            return self.reject("nul_byte", REPLY_NUL, session)
        owner = self._owner(session)
        if owner is None:
            return None
        for address in from_addresses(draft.head):
            if not owner.may_send_as(address.rpartition("@")[2]):
                reply = REPLY_FROM_NOT_OWNER.format(address, owner.name)
                return self.reject("sender_not_owned", reply, session, user=owner.name)
        return None

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


def from_addresses(content: bytes) -> list[str]:
    """The addresses of the From: header(s) (RFC 5322 §3.6.2), lowercase."""
    headers = BytesHeaderParser(policy=SMTP_POLICY).parsebytes(content)
    values = [str(v) for v in headers.get_all("from", [])]
    return [addr.lower() for _, addr in email.utils.getaddresses(values) if addr]


def peer_ip(session: Session) -> str:
    peer = session.peer
    return str(peer[0] if isinstance(peer, tuple) else peer)


def address_problem(address: str, smtputf8: bool, *, allow_empty: bool) -> str | None:
    """The reply template for an unusable envelope address, or None (RFC 5321 §4.1.2)."""
    if not address:
        return None if allow_empty else REPLY_BAD_ADDRESS
    if not smtputf8 and not address.isascii():
        return REPLY_NEEDS_SMTPUTF8
    try:
        address.encode("utf-8")  # RFC 6531 §3.3: UTF-8, not stray bytes (decoded as surrogates)
    except UnicodeEncodeError:
        return REPLY_BAD_ADDRESS
    local, at, domain = address.rpartition("@")
    if not at or not local or len(address) > 254:
        return REPLY_BAD_ADDRESS
    if domain.startswith("["):
        return None if address_literal(domain) else REPLY_BAD_ADDRESS
    return None if DOMAIN_RE.match(domain) else REPLY_BAD_ADDRESS


def received_header(
    hostname: str, server: RelaySMTP, session: Session, envelope: Envelope, msg_id: str
) -> bytes:
    """The trace header of RFC 5321 §4.4, with the protocol named as RFC 3848 and RFC 6531 do
    (ESMTP, S for TLS, A for AUTH; UTF8SMTP)."""
    base = "UTF8SMTP" if envelope.smtp_utf8 else "ESMTP" if session.extended_smtp else "SMTP"
    protocol = base + ("S" if server.tls_active else "") + ("A" if session.authenticated else "")
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
    for kind in KINDS:
        for host, port in addresses[kind]:
            servers.append(await loop.create_server(_factory(handler, kind), host, port))
    return servers


def _factory(handler: IntakeHandler, kind: str) -> Callable[[], asyncio.BaseProtocol]:
    """Sessions for one listener; on smtps each starts with our own TLS handshake (so that a
    failed one is logged, and a reloaded certificate serves the next connection)."""

    def implicit_tls() -> ImplicitTLS:
        assert handler.tls is not None  # config: smtps needs smtp.tls (RFC 8314)
        return ImplicitTLS(handler.tls, factory)

    def factory() -> RelaySMTP:
        cfg = handler.cfg
        return RelaySMTP(
            handler,
            kind,
            data_size_limit=cfg.smtp.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=cfg.smtp.hostname,
            ident="relay",
            timeout=cfg.smtp.idle_timeout,
            tls_context=None if kind == "smtps" else handler.tls,
            require_starttls=kind == "submission",
            auth_required=kind != "relay",
            auth_require_tls=True,
            auth_exclude_mechanism=None if cfg.smtp.auth.users_file else ["PLAIN", "LOGIN"],
        )

    return implicit_tls if kind == "smtps" else factory
