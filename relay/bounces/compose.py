"""Bounces, composing: a delivery status notification (RFC 3464) as the bytes of a new message,
from the original's envelope, the part of its content that goes back and the recipients it
reports on; a pure function (docs/bounces.md shows one)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import formatdate

from relay.spool.message import Message, Recipient

FAILED, DELAYED, RELAYED = "failed", "delayed", "relayed"
ACTIONS = (FAILED, DELAYED, RELAYED)
SUBJECTS = {
    FAILED: "Undelivered Mail Returned to Sender",
    DELAYED: "Delayed Mail (still being retried)",
    RELAYED: "Relayed mail: no DSN support at the next hop",
}
OPENINGS = {
    FAILED: "Your message could not be delivered to the recipients below; the relay has given "
    "up on them.",
    DELAYED: "Your message has not been delivered yet to the recipients below. The relay is "
    "still trying{until}; you do not need to send it again.",
    RELAYED: "Your message was delivered to the recipients below at a host that does not "
    "support delivery notifications (DSN): no further notice about them will come.",
}
EXPIRY_STATUS = "4.4.7"  # RFC 3463: delivery time expired
DIAGNOSTIC_MAX = 900  # characters of a remote reply kept (a header line stays under 998)
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")
CRLF = "\r\n"
REPORT = "multipart/report; report-type=delivery-status"


@dataclass(frozen=True)
class Returned:
    """What of the original content goes back: its header block (through the last header
    line's CRLF) and, for RET=FULL within bounces.max_returned, the whole content."""

    headers: bytes
    whole: bytes | None = None


@dataclass(frozen=True)
class Report:
    """One DSN to compose: about which recipients of msg, with which action, sent to whom
    (the envelope sender, or the postmaster's copy of a double bounce), by which host, when;
    until is the end of the retries (the Will-Retry-Until of a delay warning)."""

    msg: Message
    rcpts: Sequence[Recipient]
    action: str
    to: str
    hostname: str
    now: float
    until: float | None = None


def compose(report: Report, returned: Returned) -> bytes:
    """The whole DSN: header fields, then a multipart/report of the human-readable text, the
    delivery-status fields and the returned headers or message (RFC 6533's global types for
    SMTPUTF8 mail)."""
    if report.action not in ACTIONS:
        raise ValueError(f"unknown DSN action {report.action!r}")
    utf8 = report.msg.smtputf8
    returned_part = _returned(returned, utf8)
    boundary = _boundary(report, returned_part)
    kind = "global-delivery-status" if utf8 else "delivery-status"
    parts = [
        _part("text/plain; charset=utf-8", _human(report)),
        _part(f"message/{kind}", _status(report)),
        returned_part,
    ]
    body = b"".join(f"--{boundary}\r\n".encode() + part for part in parts)
    return _head(report, boundary) + b"\r\n" + body + f"--{boundary}--\r\n".encode()


def status_of(rcpt: Recipient, action: str) -> str:
    """The RFC 3463 status a recipient is reported with: its last reply's enhanced code in the
    action's class, else the class's generic one (an expired recipient: 4.4.7)."""
    enhanced = rcpt.reply.enhanced if rcpt.reply is not None else None
    if action == FAILED and rcpt.status == "expired":
        return enhanced if enhanced and enhanced.startswith("4.") else EXPIRY_STATUS
    wanted = {FAILED: "5", DELAYED: "4", RELAYED: "2"}[action]
    if enhanced and enhanced.startswith(f"{wanted}."):
        return enhanced
    return f"{wanted}.0.0"


def _head(report: Report, boundary: str) -> bytes:
    msg = report.msg
    fields = [
        ("From", f"Mail Delivery System <MAILER-DAEMON@{report.hostname}>"),
        ("To", f"<{report.to}>"),
        ("Subject", SUBJECTS[report.action]),
        ("Date", formatdate(report.now, usegmt=True)),
        ("Message-ID", f"<{msg.id}.{report.action}.{int(report.now * 1000)}@{report.hostname}>"),
        ("Auto-Submitted", "auto-replied"),
        ("MIME-Version", "1.0"),
        ("Content-Type", f'{REPORT};{CRLF}\tboundary="{boundary}"'),
    ]
    return "".join(f"{name}: {value}{CRLF}" for name, value in fields).encode()


def _human(report: Report) -> str:
    until = f" until {formatdate(report.until, usegmt=True)}" if report.until else ""
    lines = [
        f"This is the mail system at {report.hostname}.",
        "",
        OPENINGS[report.action].format(until=until),
        "",
    ]
    lines += [_why(rcpt, report.action) for rcpt in report.rcpts]
    return CRLF.join(lines) + CRLF


def _why(rcpt: Recipient, action: str) -> str:
    """One recipient's line: who, what the remote host said (or what went wrong), which host."""
    said = _clean(str(rcpt.reply)) if rcpt.reply is not None else "no attempt was made"
    where = f"host {rcpt.mx} said: " if rcpt.mx and rcpt.reply and rcpt.reply.code else ""
    if action == FAILED and rcpt.status == "expired":
        return f"<{rcpt.address}>: retried until its time ran out; last, {where}{said}"
    return f"<{rcpt.address}>: {where}{said}"


def _status(report: Report) -> str:
    """The message/delivery-status body: the per-message fields, then a block per recipient."""
    msg = report.msg
    first = [f"Reporting-MTA: dns; {report.hostname}"]
    if msg.envid is not None:
        first.append(f"Original-Envelope-Id: {_clean(msg.envid)}")
    first.append(f"Arrival-Date: {formatdate(msg.queued_at, usegmt=True)}")
    blocks = [first] + [_recipient(rcpt, report) for rcpt in report.rcpts]
    return (CRLF + CRLF).join(CRLF.join(block) for block in blocks) + CRLF


def _recipient(rcpt: Recipient, report: Report) -> list[str]:
    fields = []
    if rcpt.orcpt is not None:
        fields.append(f"Original-Recipient: {_clean(rcpt.orcpt)}")
    kind = "rfc822" if rcpt.address.isascii() else "utf-8"
    fields += [
        f"Final-Recipient: {kind};{rcpt.address}",
        f"Action: {report.action}",
        f"Status: {status_of(rcpt, report.action)}",
    ]
    if rcpt.mx:
        fields.append(f"Remote-MTA: dns; {rcpt.mx}")
    if rcpt.reply is not None and rcpt.reply.code is not None:
        fields.append(f"Diagnostic-Code: smtp; {_clean(str(rcpt.reply))[:DIAGNOSTIC_MAX]}")
    if rcpt.last_attempt is not None:
        fields.append(f"Last-Attempt-Date: {formatdate(rcpt.last_attempt, usegmt=True)}")
    if report.action == DELAYED and report.until is not None:
        fields.append(f"Will-Retry-Until: {formatdate(report.until, usegmt=True)}")
    return fields


def _returned(returned: Returned, utf8: bool) -> bytes:
    """The third part: the whole message (RET=FULL that fits) or its header block."""
    if returned.whole is not None:
        kind, data = ("message/global" if utf8 else "message/rfc822"), returned.whole
    else:
        kind = "message/global-headers" if utf8 else "text/rfc822-headers"
        data = returned.headers
    encoding = "7bit" if data.isascii() else "8bit"
    head = f"Content-Type: {kind}{CRLF}Content-Transfer-Encoding: {encoding}{CRLF}{CRLF}"
    tail = b"" if data.endswith(b"\r\n") else b"\r\n"
    return head.encode() + data + tail + b"\r\n"


def _part(content_type: str, text: str) -> bytes:
    encoding = "7bit" if text.isascii() else "8bit"
    head = f"Content-Type: {content_type}{CRLF}Content-Transfer-Encoding: {encoding}{CRLF}{CRLF}"
    return (head + text + CRLF).encode()


def _boundary(report: Report, returned_part: bytes) -> str:
    """A boundary that the returned content does not contain (it may be a DSN itself)."""
    base = f"{report.msg.id}.{int(report.now)}/{report.hostname}"
    for extra in range(100):
        boundary = f"{base}.{extra}" if extra else base
        if boundary.encode() not in returned_part:
            return boundary
    raise ValueError("no MIME boundary found that the returned content lacks")


def _clean(text: str) -> str:
    """One header-safe line: control characters (CR, LF among them) become spaces."""
    return CONTROL_RE.sub(" ", text).strip()
