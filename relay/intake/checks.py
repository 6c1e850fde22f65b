"""Intake, checks: the refusals decided on an envelope address, on the spool's free space and on
the message itself (bare line ends, NUL, a From: its user does not own), and how each refusal
is counted and logged."""

from __future__ import annotations

import email.utils
from email.parser import BytesHeaderParser
from email.policy import SMTP as SMTP_POLICY
from typing import Any

from aiosmtpd.smtp import Session

from relay.config import Config
from relay.intake.auth import Auth
from relay.intake.data import Draft
from relay.mail.address import UTF8_DOMAIN_RE, address_literal
from relay.observe import logs, metrics
from relay.spool import reserve
from relay.spool.store import Spool

REPLY_BAD_ADDRESS = "501 5.1.3 Bad {} address syntax"
REPLY_NEEDS_SMTPUTF8 = "553 5.6.7 Non-ASCII address requires SMTPUTF8"
REPLY_BARE_LINE_END = "550 5.6.0 Message contains bare CR or LF (RFC 5321 section 2.3.8)"
REPLY_NUL = "550 5.6.0 Message contains NUL characters"
REPLY_FROM_NOT_OWNER = "550 5.7.1 From: header address {} not owned by user {}"
# RFC 1870 §6.1 and RFC 3463 4.3.1: no room for a new message now (spool.min_free).
REPLY_NO_STORAGE = "452 4.3.1 Insufficient system storage"
SPACE_MAX_AGE = 1.0  # seconds a reading of the spool's free space serves MAIL FROM


def peer_ip(session: Session) -> str:
    peer = session.peer
    return str(peer[0] if isinstance(peer, tuple) else peer)


def reject(reason: str, reply: str, session: Session, **fields: Any) -> str:
    """Count and log one refusal, and return its reply."""
    metrics.REJECTED.labels(reason).inc()
    logs.event("rejected", reason=reason, client=peer_ip(session), reply=reply, **fields)
    return reply


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
    return None if UTF8_DOMAIN_RE.match(domain) else REPLY_BAD_ADDRESS


def address_rejected(problem: str, role: str, session: Session, address: str) -> str:
    """The refusal of a sender or recipient address with this problem, counted and logged."""
    reason = "smtputf8_required" if problem == REPLY_NEEDS_SMTPUTF8 else "bad_address"
    return reject(reason, problem.format(role), session, address=address)


def storage_shortage(cfg: Config, spool: Spool, options: list[str]) -> str | None:
    """Why the spool has no room for this transaction, or None: free space (or a declared
    SIZE) against the reserve, read from the file system at most every SPACE_MAX_AGE."""
    if cfg.spool.min_free == 0:
        return None
    declared = [o[len("SIZE=") :] for o in options if o.startswith("SIZE=")]
    size = int(declared[0]) if declared and declared[0].isdecimal() else 0
    return reserve.shortage(spool.space(SPACE_MAX_AGE), cfg.spool.min_free, size)


def content_problem(draft: Draft, session: Session, auth: Auth) -> str | None:
    """Refusals decided on the message itself, or None."""
    if draft.bare_line_end:
        return reject("bare_line_end", REPLY_BARE_LINE_END, session)
    if draft.nul:
        return reject("nul_byte", REPLY_NUL, session)
    owner = auth.owner(session)
    if owner is None:
        return None
    for address in from_addresses(draft.head):
        if not owner.may_send_as(address.rpartition("@")[2]):
            reply = REPLY_FROM_NOT_OWNER.format(address, owner.name)
            return reject("sender_not_owned", reply, session, user=owner.name)
    return None


def from_addresses(content: bytes) -> list[str]:
    """The addresses of the From: header(s) (RFC 5322 §3.6.2), lowercase."""
    headers = BytesHeaderParser(policy=SMTP_POLICY).parsebytes(content)
    values = [str(v) for v in headers.get_all("from", [])]
    return [addr.lower() for _, addr in email.utils.getaddresses(values) if addr]
