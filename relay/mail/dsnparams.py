"""Mail, the DSN parameters (RFC 3461): RET and ENVID on MAIL, NOTIFY and ORCPT on RCPT, read
from a client's command and written on the next hop's; xtext, their encoding (§4).

Pure: the intake takes the parameters out of a command (split_params), judges them
(parse_mail_params, parse_rcpt_params: a ParamError carries the reply), and the courier writes
them again, xtext-encoded, where the next hop advertises DSN (DsnRequest)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

MAIL_KEYWORDS = ("RET", "ENVID")
RCPT_KEYWORDS = ("NOTIFY", "ORCPT")
# What aiosmtpd judges itself, by command: everything else is judged here.
AIOSMTPD_KEYWORDS = {"MAIL": frozenset({"BODY", "SIZE", "SMTPUTF8"}), "RCPT": frozenset()}
RET_VALUES = ("FULL", "HDRS")
NOTIFY_VALUES = ("SUCCESS", "FAILURE", "DELAY")
NEVER = "NEVER"
ENVID_MAX = 100  # §4.4, the xtext as sent
ORCPT_MAX = 500  # §5: a RCPT line grows by at most 500 with NOTIFY and ORCPT
# RFC 5321 §4.1.2: esmtp-keyword; RFC 5322 §3.2.3: atext, what an ORCPT addr-type is made of.
KEYWORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
ADDR_TYPE_RE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+\Z")
HEXCHAR_RE = re.compile(r"\+([0-9A-Fa-f]{2})")
PRINTABLE_RE = re.compile(r"[ -~]*\Z")  # §4.2, §4.4: the decoded value, printable US-ASCII

REPLY_MALFORMED = "501 5.5.4 Malformed {} parameter: {}"
REPLY_TWICE = "501 5.5.4 {} parameter given twice"
REPLY_SYNTAX = "501 5.5.4 Syntax error in parameter {}"
REPLY_UNKNOWN = "555 5.5.4 {} parameter {} not recognized"


class ParamError(ValueError):
    """A parameter refused; reply is the SMTP reply that says which and why."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


@dataclass(frozen=True)
class MailParams:
    """RET (FULL or HDRS) and ENVID (decoded) as MAIL gave them; None where not given."""

    ret: str | None = None
    envid: str | None = None

    def options(self) -> list[str]:
        """What goes on the next hop's MAIL command."""
        options = [] if self.ret is None else [f"RET={self.ret}"]
        return options if self.envid is None else [*options, f"ENVID={xtext_encode(self.envid)}"]


@dataclass(frozen=True)
class RcptParams:
    """NOTIFY (("NEVER",) or some of SUCCESS, FAILURE, DELAY) and ORCPT ("addr-type;address",
    decoded) as RCPT gave them; None where not given."""

    notify: tuple[str, ...] | None = None
    orcpt: str | None = None

    def options(self) -> list[str]:
        """What goes on the next hop's RCPT command."""
        options = [] if self.notify is None else [f"NOTIFY={','.join(self.notify)}"]
        if self.orcpt is None:
            return options
        addr_type, _, address = self.orcpt.partition(";")
        return [*options, f"ORCPT={addr_type};{xtext_encode(address)}"]


@dataclass(frozen=True)
class DsnRequest:
    """One message's DSN parameters for the courier: MAIL's, and each recipient's in the
    order of the recipients offered."""

    mail: MailParams
    rcpts: tuple[RcptParams, ...]

    def rcpt(self, index: int) -> RcptParams:
        return self.rcpts[index] if index < len(self.rcpts) else RcptParams()


def xtext_decode(text: str) -> str:
    """RFC 3461 §4: "+" and two hex digits stand for a character; other characters are
    themselves, printable ASCII but "+" and "=". ValueError on anything else. Lower-case hex
    digits, which the RFC does not allow, are read too."""
    if not all("!" <= c <= "~" and c != "=" for c in text):
        raise ValueError("characters outside xtext")
    if text.count("+") != len(HEXCHAR_RE.findall(text)):
        raise ValueError('"+" not followed by two hex digits')
    return HEXCHAR_RE.sub(lambda m: chr(int(m[1], 16)), text)


def xtext_encode(text: str) -> str:
    """The xtext of printable ASCII text: "+", "=", space and controls as "+XX"."""
    return "".join(c if "!" <= c <= "~" and c not in "+=" else f"+{ord(c):02X}" for c in text)


def split_params(params: str, verb: str) -> tuple[str, list[str]]:
    """The parameters of a MAIL or RCPT command cut in two: those aiosmtpd judges (BODY, SIZE,
    SMTPUTF8 on MAIL; joined again) and the others, as the client wrote them, judged by
    parse_mail_params or parse_rcpt_params."""
    known = AIOSMTPD_KEYWORDS.get(verb)
    if known is None:
        return params, []
    kept: list[str] = []
    taken: list[str] = []
    for token in params.split():
        (kept if token.partition("=")[0].upper() in known else taken).append(token)
    return " ".join(kept), taken


def parse_mail_params(tokens: Sequence[str]) -> MailParams:
    """RET and ENVID from MAIL's parameters; ParamError for anything wrong or unknown."""
    values = _values("MAIL FROM", tokens, MAIL_KEYWORDS)
    ret, envid = values.get("RET"), values.get("ENVID")
    if ret is not None and ret.upper() not in RET_VALUES:
        raise ParamError(REPLY_MALFORMED.format("RET", "must be FULL or HDRS"))
    if envid is not None and len(envid) > ENVID_MAX:
        raise ParamError(REPLY_MALFORMED.format("ENVID", f"longer than {ENVID_MAX} characters"))
    return MailParams(
        ret=None if ret is None else ret.upper(),
        envid=None if envid is None else _decoded("ENVID", envid),
    )


def parse_rcpt_params(tokens: Sequence[str]) -> RcptParams:
    """NOTIFY and ORCPT from RCPT's parameters; ParamError for anything wrong or unknown."""
    values = _values("RCPT TO", tokens, RCPT_KEYWORDS)
    notify, orcpt = values.get("NOTIFY"), values.get("ORCPT")
    return RcptParams(
        notify=None if notify is None else _notify(notify),
        orcpt=None if orcpt is None else _orcpt(orcpt),
    )


def _values(command: str, tokens: Sequence[str], keywords: tuple[str, ...]) -> dict[str, str]:
    """keyword: value for each parameter, each of keywords at most once and with a value."""
    values: dict[str, str] = {}
    for token in tokens:
        keyword, eq, value = token.partition("=")
        name = keyword.upper()
        if not KEYWORD_RE.match(keyword):
            raise ParamError(REPLY_SYNTAX.format(token[:64]))
        if name not in keywords:
            raise ParamError(REPLY_UNKNOWN.format(command, name[:64]))
        if name in values:
            raise ParamError(REPLY_TWICE.format(name))
        if not eq or not value:
            raise ParamError(REPLY_MALFORMED.format(name, "no value"))
        values[name] = value
    return values


def _notify(value: str) -> tuple[str, ...]:
    """§4.1: NEVER alone, or one or more of SUCCESS, FAILURE, DELAY, each once."""
    items = value.upper().split(",")
    if items == [NEVER]:
        return (NEVER,)
    if NEVER in items:
        raise ParamError(REPLY_MALFORMED.format("NOTIFY", "NEVER must stand alone"))
    unknown = [item for item in items if item not in NOTIFY_VALUES]
    if unknown:
        what = f"{unknown[0][:32]!r} is not NEVER, SUCCESS, FAILURE or DELAY"
        raise ParamError(REPLY_MALFORMED.format("NOTIFY", what))
    if len(set(items)) != len(items):
        raise ParamError(REPLY_MALFORMED.format("NOTIFY", "a value is repeated"))
    return tuple(items)


def _orcpt(value: str) -> str:
    """§4.2: addr-type ";" xtext, decoded: "rfc822;user@example.org"."""
    addr_type, semicolon, encoded = value.partition(";")
    if not semicolon or not ADDR_TYPE_RE.match(addr_type) or not encoded:
        raise ParamError(REPLY_MALFORMED.format("ORCPT", "must be addr-type;address"))
    if len(value) > ORCPT_MAX:
        raise ParamError(REPLY_MALFORMED.format("ORCPT", f"longer than {ORCPT_MAX} characters"))
    return f"{addr_type};{_decoded('ORCPT', encoded)}"


def _decoded(name: str, text: str) -> str:
    """text's xtext decoded, which must be printable US-ASCII."""
    try:
        decoded = xtext_decode(text)
    except ValueError as exc:
        raise ParamError(REPLY_MALFORMED.format(name, f"not xtext ({exc})")) from None
    if not PRINTABLE_RE.match(decoded):
        raise ParamError(REPLY_MALFORMED.format(name, "decodes to a non-printable character"))
    return decoded
