"""API, submitting: `POST /v1/messages` composed into a message and handed to the intake over
its UNIX socket as the token's tenant, so that it takes exactly the path of SMTP mail (sender
domains, quotas, lanes, scheduled send, idempotency, DKIM, the durable write); the intake's
reply becomes the HTTP answer (docs/api.md "Submitting")."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiosmtplib
from aiohttp import web

from relay.api import compose, live, messages, schemas
from relay.api.auth import tenant
from relay.api.problems import Problem
from relay.api.spec import Answer, Route, problem, ref
from relay.config import Config
from relay.intake import directives, handoff
from relay.mail.events import DEFAULT_TENANT, iso
from relay.spool.run import SUBMIT_SOCKET


@dataclass
class Current:
    """The configuration as last loaded (a reload replaces cfg in the running app)."""

    cfg: Config


CONFIG = web.AppKey("config", Current)
HANDOFF_TIMEOUT = 60.0  # the intake's answer to one message (its durable write included)
RETRY_AFTER = "5"  # seconds, when the intake cannot take the message now
RETRY_AT_RE = re.compile(r"try again after (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)")
REPLAYED = "Idempotent-Replayed"


class Refused(Exception):
    """The intake's refusal of a submission: its SMTP code and reply text."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code, self.text = code, text


async def submit_message(request: web.Request) -> web.Response:
    cfg = request.app[CONFIG].cfg
    key = idempotency_key(request)
    body = await json_body(request)
    sub = compose.submission(
        body, hostname=cfg.smtp.hostname, max_recipients=cfg.smtp.max_recipients, key=key
    )
    limit = cfg.smtp.max_message_size
    if limit and len(sub.data) > limit:
        raise Problem(413, f"the message is {len(sub.data)} bytes, more than "
                      f"smtp.max_message_size ({limit})")  # fmt: skip
    try:
        reply = await hand_over(request, tenant(request) or DEFAULT_TENANT, sub)
    except Refused as exc:
        raise refusal(exc.code, exc.text, time.time()) from None
    return await accepted(request, reply)


def idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is not None and not directives.KEY_RE.match(key):
        raise Problem(400, "Idempotency-Key: 1-256 printable ASCII characters",
                      field="Idempotency-Key")  # fmt: skip
    return key


async def json_body(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except (ValueError, UnicodeDecodeError) as exc:
        raise Problem(400, f"the body is not JSON: {exc}") from None


async def hand_over(request: web.Request, owner: str, sub: compose.Submission) -> str:
    """One SMTP transaction on the intake's socket, authenticated as owner (SASL EXTERNAL);
    the 250's text, or Refused; 503 when the intake cannot be reached."""
    path = request.app[live.SPOOL].socket_address(SUBMIT_SOCKET)
    try:
        smtp = await handoff.session(path, "api", owner, HANDOFF_TIMEOUT)
        try:
            await smtp.mail(sub.sender, options=["SMTPUTF8"] if sub.smtputf8 else [])
            for recipient in sub.recipients:
                await smtp.rcpt(recipient)
            answer = await smtp.data(sub.data)
        finally:
            smtp.close()
    except aiosmtplib.SMTPResponseException as exc:
        raise Refused(exc.code, exc.message) from None
    except (aiosmtplib.SMTPException, OSError) as exc:
        raise Problem(503, f"the relay's intake could not take the message now ({exc}); "
                      "try again", headers={"Retry-After": RETRY_AFTER}) from None  # fmt: skip
    return answer.message


async def accepted(request: web.Request, reply: str) -> web.Response:
    """202: the new message's id, why it waits and until when; a replay answers the same for
    the key's message as it now stands, with Idempotent-Replayed: true."""
    found = handoff.QUEUED_RE.search(reply)
    if found is None:
        raise Problem(503, f"the intake's answer was not understood: {reply[:80]!r}")
    msg_id, replayed, status, at = found.groups()
    if not replayed:
        body = {"id": msg_id, "status": status or "queued",
                "expected_attempt_at": iso(float(at) if at else time.time())}  # fmt: skip
        return web.json_response(body, status=202)
    item = (await live.annotate(request, [await messages.find(request, msg_id)]))[0]
    body = {"id": msg_id, "status": item["status"],
            "expected_attempt_at": item["expected_attempt_at"]}  # fmt: skip
    return web.json_response(body, status=202, headers={REPLAYED: "true"})


def refusal(code: int, text: str, now: float) -> Problem:
    """The problem details of the intake's refusal: the sender not the tenant's 403, the
    key used for other content 409, too big 413, over a quota 429 with Retry-After, anything
    else permanent 400 and anything temporary 503 (our trouble, or the relay stopping)."""
    detail = f"the relay refused the message: {code} {text}"
    if text.startswith("5.7.0 X-Relay-Idempotency-Key"):
        return Problem(409, detail, field="Idempotency-Key")
    if text.startswith("5.7.1") and "not owned by user" in text:
        return Problem(403, detail, field="from")
    if code == 552:
        return Problem(413, detail)
    found = RETRY_AT_RE.search(text)
    if code == 452 and found:
        then = datetime.fromisoformat(found.group(1)).timestamp()
        return Problem(429, detail, headers={"Retry-After": str(max(1, round(then - now)))})
    if 400 <= code < 500:
        return Problem(503, detail, headers={"Retry-After": RETRY_AFTER})
    return Problem(400, detail)


ROUTES = (
    Route(
        "POST", "/v1/messages", submit_message, "sendMessage",
        "Submit a message: built from fields, or raw; queued like SMTP mail", "send",
        {202: Answer("queued durably (or, with Idempotent-Replayed: true, queued before under "
                     "the Idempotency-Key)", ref("Queued"),
                     {REPLAYED: "true when the answer is the key's earlier message"}),
         400: problem("a field is wrong (`field` names it), or the relay refused the content"),
         403: problem("the token lacks `send`, or the sender's domain is not the tenant's"),
         409: problem("the Idempotency-Key was used for different content"),
         413: problem("the message is over smtp.max_message_size"),
         429: problem("a sending quota is full", **{"Retry-After": "seconds until it has room"}),
         503: problem("the relay cannot take it now; try again",
                      **{"Retry-After": "seconds"})},
        parameters=(schemas.IDEMPOTENCY_KEY,), body=ref("NewMessage"),
    ),
)  # fmt: skip
