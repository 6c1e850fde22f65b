"""API, composing: a `POST /v1/messages` body checked field by field and made into what an SMTP
client would submit: the envelope, and an RFC 5322 message built with the stdlib email package
(MIME, Date, Message-ID) whose header carries the X-Relay-* directives the intake reads."""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8, Policy
from typing import Any

from relay.api.problems import Problem
from relay.config.lanes import LANES
from relay.intake import directives
from relay.intake.checks import address_problem

ADDRESSES = ("to", "cc", "bcc")
CONTENT = ("subject", "text", "html", "headers", "attachments")  # not with raw
FIELDS = frozenset({"from", *ADDRESSES, *CONTENT, "send_at", "priority", "batch_id", "raw"})
ATTACHMENT_FIELDS = frozenset({"filename", "content_type", "content"})
# Header fields the body's own fields (or MIME) write; `headers` may not set them.
RESERVED = frozenset({
    "from", "to", "cc", "bcc", "subject", "content-type", "content-transfer-encoding",
    "mime-version",
})  # fmt: skip
HEADER_NAME_RE = re.compile(r"^[\x21-\x39\x3b-\x7e]{1,76}$")  # RFC 5322 §2.2 ftext
CONTENT_TYPE_RE = re.compile(r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+$")
# Text only (7bit): a body in another script goes quoted-printable or base64, so no hop needs
# 8BITMIME; SMTPUTF8 (an address beyond ASCII) keeps UTF-8 header fields as they are.
POLICY = SMTP.clone(cte_type="7bit")
UTF8_POLICY = SMTPUTF8.clone(cte_type="7bit")


@dataclass(frozen=True)
class Submission:
    """What goes to the intake: the envelope and the message (CRLF line ends)."""

    sender: str
    recipients: list[str]
    data: bytes
    smtputf8: bool


def submission(body: Any, *, hostname: str, max_recipients: int, key: str | None) -> Submission:
    """The submission a request body asks for; Problem(400) naming the field at fault.
    hostname: the right-hand side of a Message-ID made here; key: the Idempotency-Key."""
    if not isinstance(body, dict):
        raise Problem(400, "the body must be a JSON object (see /v1/openapi.json)")
    for name in body:
        if name not in FIELDS:
            raise Problem(400, f"{name}: not a field of a message", field=name)
    sender_field = text_field(body, "from", required=True)
    sender = mailbox("from", sender_field)
    lists = {name: mailboxes(name, body.get(name)) for name in ADDRESSES}
    recipients = [address for name in ADDRESSES for _, address in lists[name]]
    if not recipients:
        raise Problem(400, "to: at least one recipient is needed (to, cc or bcc)", field="to")
    if len(recipients) > max_recipients:
        raise Problem(400, f"to: {len(recipients)} recipients, more than smtp.max_recipients "
                      f"({max_recipients}) (to, cc and bcc together)", field="to")  # fmt: skip
    utf8 = not all(a.isascii() for a in (sender, *recipients))
    head = directive_fields(body, key)
    if "raw" in body:
        data = raw_message(body, hostname)
    else:
        data = built(body, sender_field, lists, hostname, UTF8_POLICY if utf8 else POLICY)
    return Submission(sender, recipients, head + data, utf8)


# --- fields ---------------------------------------------------------------------------------


def text_field(body: Mapping[str, Any], name: str, *, required: bool = False) -> str:
    value = body.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise Problem(400, f"{name}: {'required, ' if required else ''}a string", field=name)
    return value


def one_line(name: str, value: str) -> str:
    if "\r" in value or "\n" in value:
        raise Problem(400, f"{name}: a header value may not hold a line break", field=name)
    return value


def mailbox(name: str, value: str) -> str:
    """The address of `addr` or `Name <addr>`; 400 if it is not one usable address."""
    one_line(name, value)
    pairs = email.utils.getaddresses([value])
    address = pairs[0][1] if len(pairs) == 1 else ""
    if not address or address_problem(address, True, allow_empty=False):
        raise Problem(400, f"{name}: {value[:80]!r} is not an email address", field=name)
    return address


def mailboxes(name: str, value: Any) -> list[tuple[str, str]]:
    """(as written, address) of a string or a list of strings."""
    items = [value] if isinstance(value, str) else value if value is not None else []
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise Problem(400, f"{name}: a string or a list of strings", field=name)
    return [(item, mailbox(f"{name}[{n}]", item)) for n, item in enumerate(items)]


def directive_fields(body: Mapping[str, Any], key: str | None) -> bytes:
    """The X-Relay-* header fields for send_at, priority, batch_id and the idempotency key."""
    fields: list[tuple[str, str]] = []
    if body.get("send_at") is not None:
        fields.append(("X-Relay-Send-At", repr(send_at(body["send_at"]))))
    if body.get("priority") is not None:
        priority = body["priority"]
        if not isinstance(priority, str) or priority not in LANES:
            raise Problem(400, f"priority: one of {', '.join(LANES)}", field="priority")
        fields.append(("X-Relay-Priority", priority))
    if body.get("batch_id") is not None:
        batch = body["batch_id"]
        if not isinstance(batch, str) or not directives.BATCH_ID_RE.match(batch):
            raise Problem(400, "batch_id: 1-64 of A-Z a-z 0-9 . _ -", field="batch_id")
        fields.append(("X-Relay-Batch-Id", batch))
    if key is not None:
        fields.append(("X-Relay-Idempotency-Key", key))
    return "".join(f"{name}: {value}\r\n" for name, value in fields).encode("ascii")


def send_at(value: Any) -> float:
    """RFC 3339 with a zone, or Unix epoch seconds (a number or its digits)."""
    text = str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
    if isinstance(text, str):
        try:
            return directives.parse_time(text)
        except directives.DirectiveError:
            pass
    raise Problem(
        400, f"send_at: {str(value)[:64]!r} is not an RFC 3339 time with a zone "
        "(2026-12-01T09:00:00Z) or Unix epoch seconds", field="send_at",
    )  # fmt: skip


# --- the message ----------------------------------------------------------------------------


def built(
    body: Mapping[str, Any],
    sender: str,
    lists: Mapping[str, list[tuple[str, str]]],
    hostname: str,
    policy: Policy,
) -> bytes:
    """The message from subject, text, html, headers and attachments."""
    msg = EmailMessage(policy=policy)
    msg["From"] = sender
    for name in ("to", "cc"):  # bcc: the envelope only
        if lists[name]:
            msg[name.capitalize()] = ", ".join(written for written, _ in lists[name])
    subject = one_line("subject", text_field(body, "subject"))
    if subject:
        msg["Subject"] = subject
    extra = header_fields(body.get("headers"))
    stamp(msg, hostname, present={name.lower() for name, _ in extra})
    for name, value in extra:
        msg[name] = value
    fill(msg, text_field(body, "text"), text_field(body, "html"), body.get("attachments"))
    fix_boundaries(msg, body)
    return msg.as_bytes()


def header_fields(value: Any) -> list[tuple[str, str]]:
    if value is None:
        return []
    if not isinstance(value, dict):
        raise Problem(400, "headers: an object of header names and string values", field="headers")
    out = []
    for name, text in value.items():
        where = f"headers.{name}"
        lower = name.lower()
        if not HEADER_NAME_RE.match(name) or lower in RESERVED or lower.startswith("x-relay-"):
            raise Problem(400, f"{where}: not a header field this API lets you set "
                          "(from, to, cc, subject and MIME have fields of their own)",
                          field=where)  # fmt: skip
        if not isinstance(text, str):
            raise Problem(400, f"{where}: a string", field=where)
        out.append((name, one_line(where, text)))
    return out


def stamp(msg: EmailMessage, hostname: str, present: set[str]) -> None:
    """Date and Message-ID, unless the request sets its own (RFC 5322 §3.6)."""
    if "date" not in present:
        msg["Date"] = email.utils.formatdate(usegmt=True)
    if "message-id" not in present:
        msg["Message-ID"] = email.utils.make_msgid(domain=hostname)


def fill(msg: EmailMessage, text: str, html: str, attachments: Any) -> None:
    """The body: text and html as alternatives, then each attachment."""
    if text or not html:
        msg.set_content(text or "")
    if html:
        if text:
            msg.add_alternative(html, subtype="html")
        else:
            msg.set_content(html, subtype="html")
    for n, (filename, content_type, content) in enumerate(attachment_list(attachments)):
        maintype, _, subtype = content_type.partition("/")
        where = f"attachments[{n}].content_type"
        try:
            msg.add_attachment(content, maintype=maintype, subtype=subtype, filename=filename)
        except (TypeError, ValueError) as exc:
            raise Problem(400, f"{where}: {exc}", field=where) from None


def attachment_list(value: Any) -> list[tuple[str, str, bytes]]:
    """(filename, content type, bytes) of each attachment."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise Problem(400, "attachments: a list of objects", field="attachments")
    return [attachment(f"attachments[{n}]", item) for n, item in enumerate(value)]


def attachment(where: str, item: Any) -> tuple[str, str, bytes]:
    if not isinstance(item, dict):
        raise Problem(400, f"{where}: an object with filename, content_type and content",
                      field=where)  # fmt: skip
    for name in item:
        if name not in ATTACHMENT_FIELDS:
            raise Problem(400, f"{where}.{name}: not a field of an attachment",
                          field=f"{where}.{name}")  # fmt: skip
    filename = one_line(f"{where}.filename", text_field(item, "filename", required=True))
    content_type = item.get("content_type", "application/octet-stream")
    if not isinstance(content_type, str) or not CONTENT_TYPE_RE.match(content_type):
        raise Problem(400, f"{where}.content_type: a MIME type such as application/pdf",
                      field=f"{where}.content_type")  # fmt: skip
    return filename, content_type.lower(), decoded(f"{where}.content", item.get("content"))


def decoded(name: str, value: Any) -> bytes:
    """Standard base64 (RFC 4648 §4), line breaks allowed."""
    if not isinstance(value, str):
        raise Problem(400, f"{name}: required, base64 text", field=name)
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise Problem(400, f"{name}: not valid base64", field=name) from None


def fix_boundaries(msg: EmailMessage, body: Mapping[str, Any]) -> None:
    """MIME boundaries from the request's hash instead of random ones: the same request makes
    the same message but for Date and Message-ID, so an idempotent retry has the same content
    hash (relay/intake/idempotency.py leaves those two out)."""
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:24]
    for n, part in enumerate(p for p in msg.walk() if p.is_multipart()):
        part.set_boundary(f"=_relay_{digest}_{n}")


def raw_message(body: Mapping[str, Any], hostname: str) -> bytes:
    """A whole message from base64 `raw`, its line ends made CRLF, with Date and Message-ID
    added when it has none (as Postfix's cleanup does for local submissions)."""
    for name in CONTENT:
        if name in body:
            raise Problem(400, f"{name}: not with raw (raw is the whole message)", field=name)
    data = decoded("raw", body.get("raw"))
    if not data.strip():
        raise Problem(400, "raw: the message is empty", field="raw")
    data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    head = data.split(b"\r\n\r\n", 1)[0]
    names = {line.partition(b":")[0].strip().lower() for line in head.split(b"\r\n")}
    added = b""
    if b"date" not in names:
        added += b"Date: " + email.utils.formatdate(usegmt=True).encode() + b"\r\n"
    if b"message-id" not in names:
        added += b"Message-ID: " + email.utils.make_msgid(domain=hostname).encode() + b"\r\n"
    return added + data
