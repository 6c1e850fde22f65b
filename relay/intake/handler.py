"""Intake, the handler: aiosmtpd's hooks, from EHLO to the durable write that comes before
`250 queued as <id>`: relay policy at RCPT, sender ownership and limits at MAIL, and at DATA the
message's checks, directives, lane and quotas, its Received: header and DKIM signature."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.config import Config
from relay.intake import admission, checks, directives, dkim, idempotency, quota
from relay.intake.checks import peer_ip, reject
from relay.intake.data import Draft, pieces
from relay.intake.internals import hook_names
from relay.intake.registry import Registry
from relay.intake.session import API, REPLY_SHUTTING_DOWN, RelaySMTP
from relay.intake.tls import tls_context
from relay.mail import dsnparams
from relay.mail.events import DEFAULT_TENANT
from relay.observe import logs, metrics
from relay.spool.groupcommit import GroupCommit
from relay.spool.journal import INTAKE
from relay.spool.keys import KeyIndex
from relay.spool.message import Message, Recipient, new_id
from relay.spool.run import QUOTA_LEDGER
from relay.spool.spill import Content
from relay.spool.store import Spool
from relay.suppression.check import Check
from relay.suppression.store import path_of

P = TypeVar("P", dsnparams.MailParams, dsnparams.RcptParams)
REPLY_QUEUED = "250 2.0.0 queued as {}"
# RFC 2920 and RFC 2034: aiosmtpd supports both but does not advertise them. RFC 3461 (DSN):
# BaseSession._getaddr takes its parameters out of MAIL and RCPT for dsn_params.
EXTENSIONS = ("250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250-DSN")
# To the API worker (its socket only): why the new message waits and until when (epoch), or
# that it was already queued under the request's idempotency key.
REPLY_QUEUED_API = "250 2.0.0 queued as {} {} {:.3f}"
REPLY_REPLAYED_API = "250 2.0.0 queued as {} replayed"
REPLY_RELAY_DENIED = "554 5.7.1 <{}>: Relay access denied"
REPLY_TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
REPLY_NOT_OWNER = "553 5.7.1 <{}>: Sender address not owned by user {}"
REPLY_LOCAL_ERROR = "451 4.3.0 Error: queue file write error, try again later"
REPLY_INTERNAL = "451 4.3.0 Internal error, try again later"


class IntakeHandler:
    """aiosmtpd hooks: relay policy at RCPT, sender ownership, limits, the durable write."""

    def __dir__(self) -> list[str]:
        """Only the hooks aiosmtpd looks for, as RelaySMTP.__dir__ (it scans us per session)."""
        return hook_names(type(self), ("handle_", "auth_"))

    def __init__(self, cfg: Config, spool: Spool, notify: Callable[[str], None]) -> None:
        self.spool = spool
        self.notify = notify
        self.registry = Registry(cfg, spool.spill)
        self.ledger = quota.Ledger(spool.run_path(QUOTA_LEDGER))
        # Each message's `received` event is written with it, by the group commit.
        spool.open_journal(INTAKE)
        # Sessions finishing DATA together share one flush (docs/architecture.md invariant 1).
        self.commits: GroupCommit[tuple[Message, Content | None]] = GroupCommit(spool.accept_batch)
        # One message per idempotency key: the keys the spool holds come in while mail flows.
        self.keys = idempotency.Idempotency(KeyIndex(cfg.idempotency.window), spool)
        self.configure(cfg)

    def configure(self, cfg: Config) -> None:
        """Start-up and SIGHUP: limits, certificates and users as the file now says."""
        self.cfg = cfg
        self.registry.configure(cfg)
        self.tls = tls_context(cfg)
        self.signer = dkim.signer(cfg.dkim)
        self.registry.auth.reread()
        self.keys.window = cfg.idempotency.window
        with contextlib.suppress(RuntimeError):  # no loop yet: the first claim starts it
            self.keys.start()

    async def drain(self, grace: float) -> int:
        """Stop taking mail, then cut what is still open at grace (Registry.drain)."""
        return await self.registry.drain(grace)

    def cut(self) -> int:
        """Close every session now; returns how many were open."""
        return self.registry.cut()

    async def handle_exception(self, error: Exception) -> str:
        """A bug while accepting mail is our failure: 4xx, never 5xx (docs/architecture.md
        invariant 2)."""
        logs.failure("intake", error)
        return REPLY_INTERNAL

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
        return [*responses[:-1], *EXTENSIONS, responses[-1]]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.registry.draining:  # no new transaction: 421, then close (RFC 5321 §3.8)
            metrics.REJECTED.labels("shutting_down").inc()
            if server.transport is not None:
                asyncio.get_running_loop().call_soon(server.transport.close)
            return REPLY_SHUTTING_DOWN
        assert isinstance(server, RelaySMTP)
        if isinstance(dsn := judged(dsnparams.parse_mail_params, server, session, address), str):
            return dsn
        # RFC 5321 §4.5.5: the null reverse-path "<>" is how bounces are sent.
        sender = address.strip("<>")
        problem = checks.address_problem(sender, envelope.smtp_utf8, allow_empty=True)
        if problem:
            return checks.address_rejected(problem, "sender", session, address)
        owner = self.registry.auth.owner(session)
        if owner is not None and sender and not owner.may_send_as(sender.rpartition("@")[2]):
            reply = REPLY_NOT_OWNER.format(sender, owner.name)
            return reject("sender_not_owned", reply, session, user=owner.name)
        shortage = checks.storage_shortage(self.cfg, self.spool, options)
        if shortage:
            return reject("disk_reserve", checks.REPLY_NO_STORAGE, session, detail=shortage)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        server.dsn_mail, server.dsn_rcpts = dsn, []
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if not (session.authenticated or self.registry.guard.trusted(peer_ip(session))):
            # RFC 5321 §3.6.2: relay only for relay_networks or authenticated users.
            return reject("relay_denied", REPLY_RELAY_DENIED.format(address), session)
        problem = checks.address_problem(address, envelope.smtp_utf8, allow_empty=False)
        if problem:
            return checks.address_rejected(problem, "recipient", session, address)
        if len(envelope.rcpt_tos) >= self.cfg.smtp.max_recipients:
            return reject("too_many_recipients", REPLY_TOO_MANY_RCPTS, session)
        assert isinstance(server, RelaySMTP)
        if isinstance(dsn := judged(dsnparams.parse_rcpt_params, server, session, address), str):
            return dsn
        if refusal := suppressed(self.spool, self.cfg, session, address):
            return reject("suppressed", refusal, session, address=address)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        server.dsn_rcpts.append((address, dsn))
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        started = time.monotonic()
        assert isinstance(server, RelaySMTP) and server.draft is not None
        draft = server.draft
        if draft.error is not None:  # the spill file could not be written: ours, so 4xx
            return self._local_error(draft.error, action="spill")
        refusal = checks.content_problem(draft, session, self.registry.auth)
        if refusal:
            return refusal
        try:
            head, asked = directives.extract(draft.head, priority=self.cfg.lanes.header)
        except directives.DirectiveError as exc:
            return reject("bad_directive", str(exc), session)
        msg = new_message(server, session, envelope, len(head) + draft.body_size)
        claim = None
        if asked.idempotency_key is not None:
            claim = await self._claim(msg, envelope, draft, asked.idempotency_key)
            if claim.outcome != idempotency.NEW:
                return self._known(claim, session, server.listener)
        try:
            quotas, place, refusal = await self._admit(server, session, msg, asked)
            header = received_header(self.cfg.smtp.hostname, server, session, envelope, msg.id)
        except BaseException:
            self._settle(claim, None)  # else a retry with the key would wait for it forever
            raise
        if refusal:
            self._settle(claim, None)
            return refusal
        if not await asyncio.shield(self._store(msg, header, head, draft, claim)):
            await admission.release(self.ledger, quotas, place)
            return REPLY_LOCAL_ERROR
        self._accepted(msg, session, envelope, place, started)
        if server.listener == API:
            return REPLY_QUEUED_API.format(msg.id, waits(msg), msg.next_attempt)
        return REPLY_QUEUED.format(msg.id)

    async def _admit(
        self, server: RelaySMTP, session: Session, msg: Message, asked: directives.Directives
    ) -> tuple[quota.Quotas, quota.Decision, str | None]:
        """The directives applied to msg, its lane, its quotas' reservation (or refusal)."""
        msg.batch_id = asked.batch_id
        if asked.send_at is not None and asked.send_at > msg.queued_at:
            msg.send_at = msg.next_attempt = asked.send_at
        msg.lane = asked.priority or admission.lane(self.cfg, session, server.listener)
        quotas = admission.quotas(self.cfg, session, msg.sender)
        place, refusal = await admission.reserve(self.ledger, self.cfg, msg, quotas, session)
        return quotas, place, refusal

    async def _claim(
        self, msg: Message, envelope: Envelope, draft: Draft, key: str
    ) -> idempotency.Claim:
        """The key's claim for msg's tenant, on the hash of what the client submitted (read
        back in a thread when the body was spilled to disk)."""
        data = idempotency.smtp_data(draft.head, pieces(draft.parts))
        rcpts = envelope.rcpt_tos
        if draft.spill is None:
            digest = idempotency.content_hash(msg.sender, rcpts, data)
        else:
            digest = await asyncio.to_thread(idempotency.content_hash, msg.sender, rcpts, data)
        claim = await self.keys.claim(msg.tenant, key, digest)
        msg.idempotency_key, msg.content_hash = key, digest
        return claim

    def _known(self, claim: idempotency.Claim, session: Session, listener: str) -> str:
        """The reply to a key already used: its message's id, or the refusal of a conflict."""
        if claim.outcome == idempotency.REPLAY:
            metrics.REPLAYED.inc()
            logs.event("replayed", id=claim.msg_id, tenant=claim.tenant, key=claim.key[:64],
                       client=peer_ip(session))  # fmt: skip
            replay = REPLY_REPLAYED_API if listener == API else REPLY_QUEUED
            return replay.format(claim.msg_id)
        reply = idempotency.REPLY_CONFLICT.format(claim.key[:64])
        return reject("idempotency_conflict", reply, session, tenant=claim.tenant)

    def _settle(self, claim: idempotency.Claim | None, msg_id: str | None) -> None:
        if claim is not None:
            self.keys.settle(claim, msg_id)

    async def _store(
        self,
        msg: Message,
        header: bytes,
        head: bytes,
        draft: Draft,
        claim: idempotency.Claim | None,
    ) -> bool:
        """Sign the message and write it durably; False (logged and counted) if that failed.
        Shielded by the caller: a session cut meanwhile does not leave half a message, and the
        idempotency claim is settled when the write ends, whatever became of the session."""
        body, spilled = draft.parts, draft.spill is not None  # before the session may let go
        stored = False
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
            stored = True
        except Exception as exc:  # disk full, permissions, a bug: never a 5xx (invariant 2)
            self._local_error(exc, id=msg.id)
        finally:
            self._settle(claim, msg.id if stored else None)
        return stored

    def _accepted(
        self,
        msg: Message,
        session: Session,
        envelope: Envelope,
        place: quota.Decision,
        started: float,
    ) -> None:
        """Wake the scheduler for a message now queued; count and log it."""
        self.notify(msg.id)
        metrics.RECEIVED.inc()
        metrics.INTAKE_SECONDS.observe(time.monotonic() - started)
        logs.event(
            "received", id=msg.id, sender=msg.sender, rcpts=envelope.rcpt_tos,
            size=msg.size, client=peer_ip(session), user=session.auth_data, send_at=msg.send_at,
            lane=msg.lane, quota_until=msg.quota_until, tenant=msg.tenant, batch_id=msg.batch_id,
        )  # fmt: skip
        if msg.quota_until is not None:
            metrics.QUOTA_HELD.labels("held").inc()
            logs.event("quota_held", id=msg.id, until=msg.quota_until, quota=quota.describe(place))

    def _local_error(self, exc: BaseException, **fields: Any) -> str:
        """Log and count a failure of ours while accepting; its 4xx reply."""
        logs.failure("intake", exc, **fields)
        metrics.REJECTED.labels("local_error").inc()
        return REPLY_LOCAL_ERROR


@functools.cache
def _suppression(history: Path) -> Check:
    """The intake's reader of the suppression lists (one per spool, opened at first use)."""
    return Check(path_of(history))


def suppressed(spool: Spool, cfg: Config, session: Session, address: str) -> str | None:
    """The RCPT reply refusing a recipient on the session tenant's suppression list, or None."""
    return _suppression(spool.history_path).refusal(cfg.suppression, tenant_of(session), address)


def tenant_of(session: Session) -> str:
    """The session's tenant: its SMTP AUTH user, else the default."""
    return str(session.auth_data) if session.authenticated else DEFAULT_TENANT


def judged(parse: Callable[[Sequence[str]], P], server: RelaySMTP, session: Session,
           address: str) -> P | str:  # fmt: skip
    """The RFC 3461 parameters of the MAIL or RCPT command being run (BaseSession._getaddr
    took them out of it, parse judges them), or the reply refusing them."""
    try:
        return parse(server.taken)
    except dsnparams.ParamError as exc:
        return reject("bad_syntax", exc.reply, session, address=address)


def new_message(server: SMTP, session: Session, envelope: Envelope, size: int) -> Message:
    """The message of this transaction, with its RFC 3461 parameters."""
    assert isinstance(server, RelaySMTP)
    now = time.time()
    msg = Message(
        id=new_id(),
        sender="" if envelope.mail_from in ("<>", None) else envelope.mail_from,
        recipients=[Recipient(address) for address in envelope.rcpt_tos],
        queued_at=now,
        next_attempt=now,
        size=size,
        smtputf8=envelope.smtp_utf8,
        client={"ip": peer_ip(session), "helo": session.host_name or ""},
        tenant=str(session.auth_data) if session.authenticated else DEFAULT_TENANT,
    )
    with_dsn(msg, server)
    return msg


def with_dsn(msg: Message, server: RelaySMTP) -> None:
    """Give msg the RFC 3461 parameters its MAIL and each RCPT came with."""
    msg.ret, msg.envid = server.dsn_mail.ret, server.dsn_mail.envid
    given: dict[str, list[dsnparams.RcptParams]] = {}
    for address, params in server.dsn_rcpts:
        given.setdefault(address, []).append(params)
    for rcpt in msg.recipients:
        if given.get(rcpt.address):  # in the order the RCPTs came (an address may repeat)
            params = given[rcpt.address].pop(0)
            rcpt.notify = None if params.notify is None else list(params.notify)
            rcpt.orcpt = params.orcpt


def waits(msg: Message) -> str:
    """Why a message just queued waits, as the queue says it: for its quota window, its send
    time, or nothing."""
    if msg.quota_until is not None:
        return "quota"
    return "scheduled" if msg.send_at is not None else "queued"


MAILDROP_HELO = "maildrop"  # relay/intake/pickup.py's EHLO name


def received_header(
    hostname: str, server: RelaySMTP, session: Session, envelope: Envelope, msg_id: str
) -> bytes:
    """The trace header of RFC 5321 §4.4, with the protocol named as RFC 3848 and RFC 6531 do
    (ESMTP, S for TLS, A for AUTH; UTF8SMTP)."""
    base = "UTF8SMTP" if envelope.smtp_utf8 else "ESMTP" if session.extended_smtp else "SMTP"
    protocol = base + ("S" if server.tls_active else "") + ("A" if session.authenticated else "")
    helo = " ".join((session.host_name or "unknown").split())
    if server.listener == API:  # as Postal traces its HTTP API's messages; the maildrop's
        protocol = "local" if helo == MAILDROP_HELO else "HTTP"
    rcpts = envelope.rcpt_tos
    recipient = f"\r\n\tfor <{rcpts[0]}>" if len(rcpts) == 1 else ""
    date = email.utils.format_datetime(email.utils.localtime())
    header = (
        f"Received: from {helo} ([{peer_ip(session)}])\r\n"
        f"\tby {hostname} (relay) with {protocol} id {msg_id}{recipient};\r\n\t{date}\r\n"
    )
    return header.encode("utf-8")
