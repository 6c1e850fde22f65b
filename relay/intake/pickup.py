"""Intake, the pickup: the maildrop's files (`relay sendmail`'s, written by local users) read as
untrusted input and submitted over the intake's own socket as sendmail.tenant, so that they take
the path of any SMTP client's mail (policy, lanes, quotas, DKIM, events); a file it cannot take
goes to rejected/, never lost (docs/sendmail.md)."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import os
import pwd
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import aiosmtplib

from relay import config
from relay.intake import handoff
from relay.intake.handler import MAILDROP_HELO
from relay.mail.dsnparams import xtext_encode
from relay.observe import logs
from relay.spool import maildrop
from relay.spool.run import SUBMIT_SOCKET
from relay.spool.store import Spool

POLL = 0.5  # seconds between looks at the maildrop
AGAIN = 10.0  # a file the intake answered 4xx is tried again after this long
TIMEOUT = 60.0
KEY = b"x-relay-idempotency-key:"
T = TypeVar("T")


class Refused(Exception):
    """The intake refused the message for good: its reply."""


def user_of(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def prepared(dropped: maildrop.Dropped, hostname: str) -> bytes:
    """The message as submitted: a trace field naming the local user (the file's owner, as
    Postfix's pickup does), and an idempotency key from the file's name, so that a file taken
    again after a crash makes no second message."""
    date = email.utils.formatdate(dropped.at, localtime=True)  # the same if taken again
    trace = (f"Received: by {hostname} (relay sendmail, from userid {dropped.uid} "
             f"{user_of(dropped.uid)});\r\n\t{date}\r\n").encode()  # fmt: skip
    head = dropped.data.split(b"\r\n\r\n", 1)[0].lower()
    has_key = head.startswith(KEY) or b"\r\n" + KEY in head
    key = b"" if has_key else f"X-Relay-Idempotency-Key: maildrop-{dropped.name}\r\n".encode()
    return trace + key + dropped.data


def mail_options(envelope: maildrop.Envelope) -> list[str]:
    options = [f"RET={envelope.ret}"] if envelope.ret else []
    options += [f"ENVID={xtext_encode(envelope.envid)}"] if envelope.envid else []
    addresses = [envelope.sender, *envelope.recipients]
    return [*options, "SMTPUTF8"] if not all(a.isascii() for a in addresses) else options


class Pickup:
    """Takes the maildrop's files into the queue while the intake runs."""

    def __init__(self, cfg: config.Config, spool: Spool) -> None:
        self.cfg, self.spool = cfg, spool
        self.later: dict[str, float] = {}  # file name -> when to try it again (after a 4xx)

    async def run(self, stop: asyncio.Event) -> None:
        directory = self.cfg.sendmail.maildrop
        if not await asyncio.to_thread(prepare_directory, directory):
            return
        while not stop.is_set():
            try:
                files = await asyncio.to_thread(maildrop.waiting, directory)
            except OSError as exc:
                logs.failure("pickup", exc, maildrop=str(directory))
                files = []
            for path in files:
                if stop.is_set():
                    break
                if self.later.get(path.name, 0.0) <= time.monotonic():
                    await self.take(path)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL)

    async def take(self, path: Path) -> None:
        """One file: into the queue, or rejected/, or left for later (a temporary refusal)."""
        try:
            dropped = await asyncio.to_thread(maildrop.read, path, self.cfg.smtp.max_message_size)
            reply = await self.submit(dropped)
        except FileNotFoundError:
            return
        except (maildrop.Malformed, Refused) as exc:
            await asyncio.to_thread(self.reject, path, str(exc))
            return
        except (aiosmtplib.SMTPException, OSError) as exc:
            self.later[path.name] = time.monotonic() + AGAIN
            logs.event("error", level="warning", stage="pickup", file=path.name, error=str(exc))
            return
        await asyncio.to_thread(path.unlink)
        self.later.pop(path.name, None)
        queued = handoff.QUEUED_RE.search(reply)
        queue_id = queued.group(1) if queued else reply
        logs.event("picked_up", file=path.name, id=queue_id, uid=dropped.uid,
                   user=user_of(dropped.uid))  # fmt: skip

    def reject(self, path: Path, reason: str) -> None:
        try:
            maildrop.reject(path)
        except FileNotFoundError:
            return
        logs.event("maildrop_rejected", level="warning", file=path.name, reason=reason,
                   uid=owner(path.parent / maildrop.REJECTED / path.name))  # fmt: skip

    async def submit(self, dropped: maildrop.Dropped) -> str:
        """Hand the message to the intake as sendmail.tenant; its 250's text. Refused for a
        5xx (or every recipient refused), aiosmtplib's errors for what may pass."""
        envelope = dropped.envelope
        path = self.spool.socket_address(SUBMIT_SOCKET)
        tenant = self.cfg.sendmail.tenant
        smtp = await checked(handoff.session(path, MAILDROP_HELO, tenant, TIMEOUT))
        try:
            await checked(smtp.mail(envelope.sender, options=mail_options(envelope)))
            await self.recipients(smtp, envelope)
            answer = await checked(smtp.data(prepared(dropped, self.cfg.smtp.hostname)))
        finally:
            smtp.close()
        return answer.message

    async def recipients(self, smtp: aiosmtplib.SMTP, envelope: maildrop.Envelope) -> None:
        """RCPT for each; a refused one is logged (the intake's `rejected` line says why), and
        only when every one is refused is the file."""
        options = [f"NOTIFY={','.join(envelope.notify)}"] if envelope.notify else []
        if problem := maildrop.too_many(envelope.recipients, self.cfg.smtp.max_recipients):
            raise Refused(problem)  # a file tried again would be refused again, forever
        refused = []
        for rcpt in envelope.recipients:
            try:
                await checked(smtp.rcpt(rcpt, options=options))
            except Refused as exc:
                refused.append(f"{rcpt}: {exc}")
        if len(refused) == len(envelope.recipients):
            raise Refused("; ".join(refused))


async def checked(reply: Awaitable[T]) -> T:
    """Await an aiosmtplib call; a 5xx is Refused, a 4xx raises as aiosmtplib does."""
    try:
        answer = await reply
    except aiosmtplib.SMTPResponseException as exc:
        if 500 <= exc.code < 600:
            raise Refused(f"{exc.code} {exc.message}") from None
        raise
    if not isinstance(answer, aiosmtplib.SMTPResponse):
        return answer  # a session, not a reply
    if answer.code >= 500:
        raise Refused(f"{answer.code} {answer.message}")
    if answer.code >= 400:
        raise aiosmtplib.SMTPResponseException(answer.code, answer.message)
    return answer


def owner(path: Path) -> int | None:
    try:
        return path.stat().st_uid
    except OSError:
        return None


def prepare_directory(directory: Path) -> bool:
    """The maildrop, made (mode 3733) if missing; False, logged, when it cannot be."""
    try:
        if not directory.exists():
            directory.mkdir(parents=True)
            os.chmod(directory, maildrop.MODE)  # mkdir's mode is cut by the umask
        if not directory.is_dir():
            raise NotADirectoryError(f"{directory} is not a directory")
    except OSError as exc:
        logs.event("error", level="warning", stage="pickup", maildrop=str(directory),
                   error=f"the maildrop cannot be used: {exc}")  # fmt: skip
        return False
    return True
