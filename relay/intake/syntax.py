"""Intake, command syntax: the checks on each command line before aiosmtpd parses it (RFC 5321
§4.1.2), and the fast reading of the plain MAIL/RCPT path nearly every client sends."""

from __future__ import annotations

import re

from relay.mail.address import MAILBOX

REPLY_CONTROL_CHARACTER = "500 5.5.2 Syntax error: control character in command"
REPLY_NOT_UTF8 = "500 5.5.2 Syntax error: command is not valid UTF-8"
REPLY_UNBALANCED = "501 5.5.4 Syntax error in parameters: unbalanced < >"
REPLY_CONTROL_IN_PARAMETER = "501 5.5.4 Syntax error in parameters: control character"
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # all C0 controls but TAB, and DEL
# The path nearly every client sends: <dot-atom@host name>, then nothing or a space and the
# parameters. Anything else (quoted or UTF-8 local parts, address literals, comments, <>)
# goes to aiosmtpd's RFC 5322 parser.
PLAIN_PATH = re.compile(
    rf"<(?P<addr>{MAILBOX})>(?: +(?P<rest>[^ \t(].*))?\Z",
    re.S,
)


def syntax_problem(command: str, arg: str) -> str | None:
    """The reply for a command line that is not valid SMTP, or None. MAIL and RCPT get 501
    (a bad parameter); their non-ASCII addresses are judged later (553 5.6.7 or 501 5.1.3)."""
    if command in ("MAIL", "RCPT"):
        if CONTROL.search(arg):
            return REPLY_CONTROL_IN_PARAMETER
        return REPLY_UNBALANCED if arg.count("<") != arg.count(">") else None
    if CONTROL.search(arg):
        return REPLY_CONTROL_CHARACTER
    try:
        arg.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes arrive as surrogates
        return REPLY_NOT_UTF8
    return None


def plain_path(arg: str) -> tuple[str, str] | None:
    """(address, parameters) of a plain MAIL/RCPT path as aiosmtpd's _getaddr gives them, or
    None for anything that needs its full parser."""
    match = PLAIN_PATH.match(arg)
    return None if match is None else (match["addr"], match["rest"] or "")
