"""Delivery, the peer: the address a message is offered to and what TLS its session achieved,
the message offered, and how an offer there ends (a result per recipient, or unsettled)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import BinaryIO

from aiosmtplib import SMTP, SMTPException, SMTPResponseException

from relay.config.routes import Smarthost
from relay.delivery.pool import Key
from relay.mail.dsnparams import DsnRequest
from relay.mail.reply import Reply


@dataclass(frozen=True)
class RecipientResult:
    recipient: str
    reply: Reply  # the reply that settles this recipient for this attempt
    mx: str | None  # MX host name that gave the reply (None if no host gave one)
    ip: str | None  # address that gave it
    tls: bool  # whether the session that gave it ran TLS
    tls_verified: bool = False  # and verified the certificate for the MX host name
    # What an MTA-STS policy in testing mode would have refused (RFC 8461 §5), for the log.
    tls_report: str | None = None
    # Whether the session that gave it announced DSN (RFC 3461), so that the message's DSN
    # parameters went with it and notices are now the next hop's to send; False: a delivered
    # recipient whose NOTIFY has SUCCESS is owed a "relayed" notice (§4.2.2).
    dsn_relayed: bool = False


@dataclass(frozen=True)
class Peer:
    """Where a reply came from: MX host (or smarthost), address, and what TLS the session
    achieved; and how it is reached: port, and the smarthost's own settings if it is one."""

    mx: str | None
    ip: str | None
    tls: bool = False
    verified: bool = False
    report: str | None = None
    port: int = 0
    smarthost: Smarthost | None = None

    @property
    def where(self) -> str:
        return f"{self.mx}[{self.ip}]"

    @property
    def tls_name(self) -> str | None:
        """The name the certificate must carry: the MX host name, or the literal's address."""
        return self.ip if self.mx is None or self.mx.startswith("[") else self.mx

    @property
    def implicit(self) -> bool:
        """Whether TLS starts with the connection (smtps, RFC 8314 §3.3), not with STARTTLS."""
        return self.smarthost is not None and self.smarthost.tls == "smtps"

    @property
    def login(self) -> tuple[str, str] | None:
        """A smarthost's AUTH credentials, if it has them."""
        smarthost = self.smarthost
        if smarthost is None or smarthost.username is None or smarthost.password is None:
            return None
        return smarthost.username, smarthost.password

    @property
    def key(self) -> Key:
        return Key(self.mx, self.ip, self.port, self.login)

    def noting(self, problem: str) -> Peer:
        return replace(self, report="; ".join(filter(None, [self.report, problem])))

    def result(self, recipient: str, reply: Reply) -> RecipientResult:
        return RecipientResult(
            recipient, reply, self.mx, self.ip, self.tls, self.verified, self.report
        )


@dataclass(frozen=True)
class Message:
    """The message offered, and the destination its connections are pooled and counted under."""

    sender: str
    recipients: tuple[str, ...]
    body: BinaryIO
    size: int
    smtputf8: bool
    destination: str = ""
    idle_room: int | None = None  # idle sessions of destination that may stay open; None: any
    dsn: DsnRequest | None = None  # RFC 3461 parameters, for a next hop that announces DSN

    @property
    def encoding(self) -> str:
        """How addresses go on the wire: UTF-8 only under SMTPUTF8 (RFC 6531 §3.3)."""
        return "utf-8" if self.smtputf8 else "ascii"


class Stale(Exception):
    """A pooled session that failed the RSET sent ahead of its next transaction: dropped, and
    that is not a try."""


class Unsettled(Exception):
    """An address gave no definitive answer; reply says why, and the next address is tried."""

    def __init__(self, peer: Peer, reply: Reply) -> None:
        super().__init__(str(reply))
        self.peer = peer
        self.reply = reply


class TlsFailed(Exception):
    """The session did not achieve the TLS its mode asks for, and sent no MAIL; reply says why
    (RFC 3463: X.7.4 security feature not supported, X.7.5 cryptographic failure)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def failed(smtp: SMTP, peer: Peer, exc: BaseException) -> BaseException:
    """Close smtp after exc; what to raise then: network and protocol trouble as Unsettled
    (the next address is tried), anything else as it was."""
    smtp.close()
    if isinstance(exc, SMTPException | OSError):
        return Unsettled(peer, error_reply(exc, peer.where))
    return exc


def error_reply(exc: BaseException, context: str = "") -> Reply:
    """The server's reply that exc carries, or a reply without a code that describes exc."""
    if isinstance(exc, SMTPResponseException) and exc.code > 0:  # -1: reply was unparseable
        return Reply.parse(exc.code, exc.message)
    return Reply.from_error(exc, context)
