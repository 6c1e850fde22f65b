"""Intake, the hand-off: a client session on the intake's own socket (run/submit.sock),
authenticated as a tenant with SASL EXTERNAL, for the submitters inside the relay (the HTTP
API's POST /v1/messages, the maildrop's pickup), so that their mail takes the SMTP path."""

from __future__ import annotations

import base64
import re

import aiosmtplib

AUTHENTICATED = 235
# The intake's 250 on this socket: the id, then "replayed" or why the message waits and until
# when (relay/intake/handler.py).
QUEUED_RE = re.compile(r"queued as (\S+)(?: (replayed)| (\w+) ([\d.]+))?")


async def session(path: str, helo: str, tenant: str, timeout: float) -> aiosmtplib.SMTP:
    """A session greeted and authenticated as tenant; the caller closes it. A refused AUTH
    raises SMTPResponseException with the intake's reply (the session closed); aiosmtplib's
    other errors and OSError say the intake cannot be reached."""
    smtp = aiosmtplib.SMTP(socket_path=path, local_hostname=helo, timeout=timeout)
    try:
        await smtp.connect()
        await smtp.ehlo()
        external = base64.b64encode(tenant.encode("utf-8"))
        answer = await smtp.execute_command(b"AUTH", b"EXTERNAL", external)
        if answer.code != AUTHENTICATED:
            raise aiosmtplib.SMTPResponseException(answer.code, answer.message)
    except BaseException:
        smtp.close()
        raise
    return smtp
