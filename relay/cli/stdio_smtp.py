"""Command line, `relay sendmail -bs`: an SMTP session on stdin and stdout (RFC 5321), as
Postfix's and Exim's sendmail -bs speak it, for programs that talk SMTP to a pipe.

It checks what it reads (command syntax, addresses, RFC 3461's DSN parameters, the mail data as
the intake will judge it) and hands each message to take(), which stores it (the maildrop) and
gives the client's reply line; the intake judges the message again when it picks the file up.
A failure in take() is a 451, never a traceback on the client's stream."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from relay.intake.syntax import REPLY_NOT_UTF8, syntax_problem
from relay.mail.address import DOMAIN, UTF8_DOMAIN_RE, address_literal
from relay.mail.dsnparams import ParamError, parse_mail_params, parse_rcpt_params, split_params

EX_OK, EX_IOERR = 0, 74  # sysexits.h
# RFC 5321 §4.5.3.1.4: 512 octets with the CRLF, and what RFC 3461 §5 lets NOTIFY and ORCPT add.
COMMAND_LIMIT = 512 + 500
DATA_LINE_LIMIT = 1000  # RFC 5321 §4.5.3.1.6, the CRLF counted, as the intake reads it
MAX_SIZE = 26_214_400  # smtp.max_message_size's default
MAX_RECIPIENTS = 100  # smtp.max_recipients's default
ERROR_LIMIT = 20  # 5xx replies before the session is ended, as Postfix's smtpd_hard_error_limit
CRLF = b"\r\n"
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\U0010ffff-]+"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"'
LOCAL_PART_RE = re.compile(rf"(?:{_ATOM}(?:\.{_ATOM})*|{_QUOTED})\Z")
DOMAIN_RE = re.compile(rf"(?=.{{1,253}}\Z){DOMAIN}\Z")
# A path: <...> (a quoted local part may hold > and spaces) and what follows it.
PATH_RE = re.compile(r'<((?:"(?:[^"\\]|\\.)*"|[^<>"])*)>(.*)\Z')
EXTENSIONS = ("PIPELINING", "SIZE {}", "8BITMIME", "SMTPUTF8", "DSN", "ENHANCEDSTATUSCODES")
BODY_VALUES = ("7BIT", "8BITMIME")

REPLY_OK = "250 2.0.0 Ok"
REPLY_MAIL_OK = "250 2.1.0 Ok"
REPLY_RCPT_OK = "250 2.1.5 Ok"
REPLY_DATA = "354 End data with <CR><LF>.<CR><LF>"
REPLY_BYE = "221 2.0.0 Bye"
REPLY_VRFY = "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"
REPLY_HELP = "214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT"
REPLY_END_IN_DATA = "421 4.4.2 {} Error: end of input in DATA, message not taken"
REPLY_TOO_MANY_ERRORS = "421 4.7.0 {} Error: too many errors"
REPLY_NOT_STORED = "451 4.3.0 Message not stored, try again later: {}"
REPLY_TOO_MANY_RECIPIENTS = "452 4.5.3 Error: too many recipients"
REPLY_UNKNOWN = "500 5.5.2 Error: command not recognized"
REPLY_EMPTY_COMMAND = "500 5.5.2 Error: bad syntax"
REPLY_LINE_TOO_LONG = "500 5.5.2 Error: line too long"
REPLY_DATA_LINE_TOO_LONG = "500 5.5.2 Line too long (see RFC5321 4.5.3.1.6)"
REPLY_SYNTAX = "501 5.5.4 Syntax: {}"
REPLY_BAD_PARAMETER = "501 5.5.4 Malformed {} parameter"
REPLY_BAD_SENDER = "501 5.1.7 Bad sender address syntax"
REPLY_BAD_RECIPIENT = "501 5.1.3 Bad recipient address syntax"
REPLY_NOT_IMPLEMENTED = "502 5.5.1 Error: command not implemented"
REPLY_NEED_MAIL = "503 5.5.1 Error: need MAIL command"
REPLY_NEED_RCPT = "503 5.5.1 Error: need RCPT command"
REPLY_NESTED_MAIL = "503 5.5.1 Error: nested MAIL command"
REPLY_BARE_LINE_END = "550 5.6.0 Message contains bare CR or LF (RFC 5321 section 2.3.8)"
REPLY_NUL = "550 5.6.0 Message contains NUL characters"
REPLY_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
REPLY_NEEDS_SMTPUTF8 = "553 5.6.7 Non-ASCII address requires SMTPUTF8"
REPLY_EMPTY_MESSAGE = "554 5.6.0 Error: message is empty"
NOT_IMPLEMENTED = frozenset({"EXPN", "TURN", "ETRN", "ATRN", "BDAT", "STARTTLS", "AUTH"})


@dataclass(frozen=True)
class Envelope:
    """One message of the session: the envelope sender ("" for <>), the recipients in the order
    given, the data (CRLF lines, dot-unstuffed, without the final "."), RET and ENVID (None:
    not given), NOTIFY and ORCPT of the recipients that gave them, and whether MAIL asked for
    SMTPUTF8."""

    sender: str
    recipients: list[str]
    data: bytes
    ret: str | None = None
    envid: str | None = None
    notify: dict[str, list[str]] = field(default_factory=dict)
    orcpt: dict[str, str] = field(default_factory=dict)
    smtputf8: bool = False


Take = Callable[[Envelope], str]


class Refused(ParamError):
    """A command refused; reply says why."""


@dataclass
class Transaction:
    """What MAIL and RCPT have given so far."""

    sender: str
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    recipients: list[str] = field(default_factory=list)
    notify: dict[str, list[str]] = field(default_factory=dict)
    orcpt: dict[str, str] = field(default_factory=dict)

    def envelope(self, data: bytes) -> Envelope:
        return Envelope(
            self.sender, list(self.recipients), data, self.ret, self.envid,
            dict(self.notify), dict(self.orcpt), self.smtputf8,
        )  # fmt: skip


@dataclass
class Limits:
    """The session's name, its bounds, and the domain a bare local part ("root") gets."""

    hostname: str
    domain: str
    max_size: int = MAX_SIZE
    max_recipients: int = MAX_RECIPIENTS


class DataScan:
    """The mail data, line by line as readline() gives it: dot-unstuffed, bare LF made CRLF,
    and checked as the intake will check it (size, line length, bare CR, NUL); once a check
    fails the rest is read and dropped."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.parts: list[bytes] = []
        self.size = 0
        self.too_big = False
        self.problem: str | None = None
        self.start = True  # the next chunk starts a line

    def feed(self, chunk: bytes) -> bool:
        """Take one chunk (a line, or a piece of a long one); whether it was the final dot."""
        whole = chunk.endswith(b"\n")
        if self.start and chunk in (b".\r\n", b".\n"):
            return True
        if self.start and chunk.startswith(b"."):
            chunk = chunk[1:]
        self.start = whole
        line = chunk.removesuffix(b"\n").removesuffix(b"\r") + (CRLF if whole else b"")
        self.size += len(line)
        self.too_big = self.too_big or self.size > self.max_size
        self.problem = self.problem or self._problem(line, whole)
        if not (self.too_big or self.problem):
            self.parts.append(line)
        return False

    @staticmethod
    def _problem(line: bytes, whole: bool) -> str | None:
        if not whole or len(line) > DATA_LINE_LIMIT:  # a piece: longer than readline's limit
            return REPLY_DATA_LINE_TOO_LONG
        if b"\r" in line[:-2]:
            return REPLY_BARE_LINE_END
        return REPLY_NUL if b"\0" in line else None

    def refusal(self) -> str | None:
        """The reply for data that cannot be taken (the size first, as the intake answers)."""
        if self.too_big:
            return REPLY_TOO_BIG
        return self.problem or (REPLY_EMPTY_MESSAGE if not self.parts else None)


def serve(
    reader: BinaryIO,
    writer: BinaryIO,
    hostname: str,
    take: Take,
    *,
    default_domain: str = "",
    max_size: int = MAX_SIZE,
    max_recipients: int = MAX_RECIPIENTS,
) -> int:
    """Run one SMTP session: read commands from reader, write replies to writer, hand each
    message to take(). Ends at QUIT, at the end of the input (a message whose data had not
    ended is dropped) or after ERROR_LIMIT refusals. Bare local parts ("root") get
    @default_domain ("" = hostname). EX_OK, or EX_IOERR when the streams fail."""
    limits = Limits(hostname, default_domain or hostname, max_size, max_recipients)
    try:
        Session(reader, writer, take, limits).run()
    except OSError:  # the client closed its end (EPIPE), or the terminal went away
        return EX_IOERR
    return EX_OK


class Session:
    """One session's streams, its limits, the transaction in progress and the refusals so far."""

    def __init__(self, reader: BinaryIO, writer: BinaryIO, take: Take, limits: Limits) -> None:
        self.reader, self.writer, self.take, self.limits = reader, writer, take, limits
        self.hostname = limits.hostname
        self.transaction: Transaction | None = None
        self.errors, self.done = 0, False
        self.commands: dict[str, Callable[[str], str]] = {
            "HELO": self.helo, "EHLO": self.ehlo, "MAIL": self.mail, "RCPT": self.rcpt,
            "DATA": self.data, "RSET": self.rset, "VRFY": self.vrfy,
            "QUIT": self.quit, "NOOP": lambda arg: REPLY_OK, "HELP": lambda arg: REPLY_HELP,
        }  # fmt: skip

    def run(self) -> None:
        self.reply(f"220 {self.hostname} ESMTP relay (sendmail -bs)")
        while not self.done:
            line = self.reader.readline(COMMAND_LIMIT + 1)
            if not line:
                return
            if len(line) > COMMAND_LIMIT:
                self.rest_of_line(line)
                self.reply(REPLY_LINE_TOO_LONG)
                continue
            self.reply(self.command(line.removesuffix(b"\n").removesuffix(b"\r")))
            if self.errors >= ERROR_LIMIT and not self.done:
                self.reply(REPLY_TOO_MANY_ERRORS.format(self.hostname))
                return

    def rest_of_line(self, chunk: bytes) -> None:
        """Read and drop what is left of a line over COMMAND_LIMIT, chunk its start."""
        while chunk and not chunk.endswith(b"\n"):
            chunk = self.reader.readline(COMMAND_LIMIT)

    def reply(self, text: str) -> None:
        if text[:1] == "5":
            self.errors += 1
        self.writer.write(text.encode("utf-8", "replace") + CRLF)
        self.writer.flush()

    def command(self, raw: bytes) -> str:
        """The reply to one command line (its line end taken off)."""
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            return REPLY_NOT_UTF8
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        handler = self.commands.get(verb)
        if handler is None:
            known = REPLY_NOT_IMPLEMENTED if verb in NOT_IMPLEMENTED else REPLY_UNKNOWN
            return known if line.strip() else REPLY_EMPTY_COMMAND
        problem = syntax_problem(verb, arg)
        if problem is not None:
            return problem
        try:
            return handler(arg.strip(" "))
        except ParamError as exc:  # Refused too
            return exc.reply

    def helo(self, arg: str) -> str:
        if not arg:
            return REPLY_SYNTAX.format("HELO hostname")
        self.transaction = None
        return f"250 {self.hostname}"

    def ehlo(self, arg: str) -> str:
        if not arg:
            return REPLY_SYNTAX.format("EHLO hostname")
        self.transaction = None
        lines = [self.hostname, *(e.format(self.limits.max_size) for e in EXTENSIONS)]
        return "\r\n".join(f"250-{text}" for text in lines[:-1]) + f"\r\n250 {lines[-1]}"

    def mail(self, arg: str) -> str:
        """MAIL FROM:<address> with SIZE, BODY, SMTPUTF8, RET and ENVID. HELO is not required
        first, as Postfix's and Exim's sendmail -bs do not require it."""
        if self.transaction is not None:
            return REPLY_NESTED_MAIL
        path, params = from_to(arg, "FROM:", "MAIL FROM:<address>")
        ours, dsn = split_params(params, "MAIL")
        smtputf8 = self.mail_options(ours.split())
        dsn_params = parse_mail_params(dsn)
        sender = "" if path == "" else self.address(path, smtputf8, REPLY_BAD_SENDER)
        self.transaction = Transaction(sender, smtputf8, dsn_params.ret, dsn_params.envid)
        return REPLY_MAIL_OK

    def mail_options(self, tokens: list[str]) -> bool:
        """Judge SIZE, BODY and SMTPUTF8 (each at most once); whether SMTPUTF8 was given."""
        seen: dict[str, str] = {}
        for token in tokens:
            keyword, eq, value = token.partition("=")
            name = keyword.upper()
            if name in seen or (name == "SMTPUTF8") == bool(eq):
                raise Refused(REPLY_BAD_PARAMETER.format(name))
            seen[name] = value
        size, body = seen.get("SIZE"), seen.get("BODY")
        if size is not None and not (size.isascii() and size.isdigit()):
            raise Refused(REPLY_BAD_PARAMETER.format("SIZE"))
        if size is not None and int(size) > self.limits.max_size:
            raise Refused(REPLY_TOO_BIG)
        if body is not None and body.upper() not in BODY_VALUES:
            raise Refused(REPLY_BAD_PARAMETER.format("BODY"))
        return "SMTPUTF8" in seen

    def rcpt(self, arg: str) -> str:
        """RCPT TO:<address> with NOTIFY and ORCPT; a recipient given twice is kept once."""
        transaction = self.transaction
        if transaction is None:
            return REPLY_NEED_MAIL
        path, params = from_to(arg, "TO:", "RCPT TO:<address>")
        _, dsn = split_params(params, "RCPT")
        dsn_params = parse_rcpt_params(dsn)
        address = self.address(path, transaction.smtputf8, REPLY_BAD_RECIPIENT)
        if address not in transaction.recipients:
            if len(transaction.recipients) >= self.limits.max_recipients:
                return REPLY_TOO_MANY_RECIPIENTS
            transaction.recipients.append(address)
        if dsn_params.notify is not None:
            transaction.notify[address] = list(dsn_params.notify)
        if dsn_params.orcpt is not None:
            transaction.orcpt[address] = dsn_params.orcpt
        return REPLY_RCPT_OK

    def data(self, arg: str) -> str:
        """354, the mail data up to the line holding one dot, then take()'s reply (or why the
        data was refused). The end of the input before the dot ends the session, no message
        taken."""
        if arg:
            return REPLY_SYNTAX.format("DATA")
        if self.transaction is None:
            return REPLY_NEED_MAIL
        if not self.transaction.recipients:
            return REPLY_NEED_RCPT
        transaction, self.transaction = self.transaction, None
        self.reply(REPLY_DATA)
        scan = DataScan(self.limits.max_size)
        while chunk := self.reader.readline(DATA_LINE_LIMIT + 1):
            if scan.feed(chunk):
                return scan.refusal() or self.taken(transaction.envelope(b"".join(scan.parts)))
        self.done = True
        return REPLY_END_IN_DATA.format(self.hostname)

    def taken(self, envelope: Envelope) -> str:
        """take()'s reply line, or a 451 with the first line of what it raised."""
        try:
            return one_line(self.take(envelope))
        except Exception as exc:
            reason = one_line(str(exc)) or type(exc).__name__
            return REPLY_NOT_STORED.format(reason[:200])

    def rset(self, arg: str) -> str:
        if arg:
            return REPLY_SYNTAX.format("RSET")
        self.transaction = None
        return REPLY_OK

    def vrfy(self, arg: str) -> str:
        return REPLY_VRFY if arg else REPLY_SYNTAX.format("VRFY address")

    def quit(self, arg: str) -> str:
        if arg:
            return REPLY_SYNTAX.format("QUIT")
        self.done = True
        return REPLY_BYE

    def address(self, path: str, smtputf8: bool, bad: str) -> str:
        """The address of a path, a bare local part qualified with the domain; Refused with
        bad (or 553 5.6.7 for non-ASCII without SMTPUTF8) when it is not one."""
        if not path.isascii() and not smtputf8:
            raise Refused(REPLY_NEEDS_SMTPUTF8)
        if path.startswith("@") and ":" in path:  # a source route, ignored (RFC 5321 §4.1.2)
            path = path.partition(":")[2]
        local, at, domain = path.rpartition("@")
        if not at:
            local, domain = path, self.limits.domain
        address = f"{local}@{domain}"  # RFC 5321 §4.5.3.1: 64 octets, a path's 256 with < >
        fits = len(local.encode()) <= 64 and len(address.encode()) <= 254
        if not (fits and LOCAL_PART_RE.match(local) and valid_domain(domain, smtputf8)):
            raise Refused(bad)
        return address


def from_to(arg: str, prefix: str, syntax: str) -> tuple[str, str]:
    """The path of MAIL FROM: or RCPT TO: (inside < >, or a bare address as Postfix takes it)
    and the parameters after it."""
    if arg[: len(prefix)].upper() != prefix:
        raise Refused(REPLY_SYNTAX.format(syntax))
    rest = arg[len(prefix) :].lstrip(" ")
    if not rest.startswith("<"):
        path, _, params = rest.partition(" ")
        if not path or path.endswith(">"):
            raise Refused(REPLY_SYNTAX.format(syntax))
        return path, params
    match = PATH_RE.match(rest)
    if match is None or match[2][:1] not in ("", " "):
        raise Refused(REPLY_SYNTAX.format(syntax))
    return match[1], match[2]


def valid_domain(domain: str, smtputf8: bool) -> bool:
    """A host name (UTF-8 labels too after SMTPUTF8) or an address literal."""
    if domain.startswith("["):
        return address_literal(domain) is not None
    if smtputf8 and not domain.isascii():
        return len(domain) <= 253 and UTF8_DOMAIN_RE.match(domain) is not None
    return DOMAIN_RE.match(domain) is not None


def one_line(text: str) -> str:
    """text's first line, control characters replaced, within a reply line's 512 octets."""
    lines = text.splitlines()
    return CONTROL.sub("?", lines[0] if lines else "")[:510]
