"""Intake, aiosmtpd's internals: every private part of aiosmtpd's SMTP protocol the session
relies on, reached from this module only and recorded as it was when the relay was written
against it (tests/unit/intake/test_internals.py fails, naming the part, if an upgrade changes
one; pyproject.toml pins aiosmtpd to the minor version written for)."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult

from relay.intake.auth import Credentials
from relay.intake.syntax import plain_path
from relay.mail.dsnparams import split_params

WRITTEN_FOR = "1.4.6"
Command = Callable[[str | None], Awaitable[None]]  # an SMTP verb's method, given its argument
# SMTP.__init__'s keyword options (the listeners pass them through RelaySMTP).
SMTP_OPTIONS = (
    "data_size_limit", "enable_SMTPUTF8", "decode_data", "hostname", "ident", "tls_context",
    "require_starttls", "timeout", "auth_required", "auth_require_tls", "auth_exclude_mechanism",
    "auth_callback", "command_call_limit", "authenticator", "proxy_protocol_timeout",
)  # fmt: skip


@dataclass(frozen=True)
class Internal:
    """One part of aiosmtpd relied on: what the relay does with it (what to re-check if it
    changed), its parameters, and for a method whose code the relay repeats, overrides or
    depends on, the fingerprint of its source when that was written."""

    use: str
    parameters: tuple[str, ...]
    source: str = ""  # fingerprint(); "" where only the signature is relied on


# SMTP's methods, by name.
METHODS = {
    "__init__": Internal(
        "builds _smtp_methods from dir(self) and finds the auth_ and handle_ hooks by dir():"
        " BaseSession.__dir__, hook_names and wrap_commands",
        ("self", "handler", *SMTP_OPTIONS, "loop"),
        "8a9ca80f23ad9bf2",
    ),
    "_handle_client": Internal(
        "dispatches each command through _smtp_methods (wrap_commands), and closes the"
        " connection after a TLSSetupException (RelaySMTP.handle_exception)",
        ("self",),
        "0e4d096403af6c74",
    ),
    "connection_made": Internal(
        "is called again on the same session after STARTTLS, with self.transport set"
        " (RelaySMTP.connection_made)",
        ("self", "transport"),
        "77a45df5065bba34",
    ),
    "smtp_DATA": Internal(
        "its checks, replies and end are repeated by start_data and end_data",
        ("self", "arg"),
        "3a33f30d3fd6d02f",
    ),
    "_getaddr": Internal("overridden by BaseSession._getaddr", ("self", "arg"), "0aeb21c56ac1260e"),
    "smtp_MAIL": Internal(
        "reads the parameters from _getaddr (BaseSession._getaddr takes out those it does not"
        " know, the DSN ones among them), judges BODY, SMTPUTF8 and SIZE, 555 for any other",
        ("self", "arg"),
        "80dd938e7791acfb",
    ),
    "smtp_RCPT": Internal(
        "reads the parameters from _getaddr (BaseSession._getaddr takes them all out), 555 for"
        " any left",
        ("self", "arg"),
        "a0d6605883c0e608",
    ),
    "smtp_EHLO": Internal(
        "adds to command_size_limits and never resets them: RelaySMTP.smtp_EHLO adds the"
        " DSN allowances after it",
        ("self", "hostname"),
        "1d91592dd954c4cd",
    ),
    "_authenticate": Internal(
        "overridden by BaseSession._authenticate",
        ("self", "mechanism", "auth_data"),
        "4252dad9a1780535",
    ),
    "auth_PLAIN": Internal(
        "decodes, then calls _authenticate('PLAIN', (login, password))",
        ("self", "_", "args"),
        "71fe14c537cc5039",
    ),
    "auth_LOGIN": Internal(
        "decodes, then calls _authenticate('LOGIN', (login, password))",
        ("self", "_", "args"),
        "f121f6cb809cc2ad",
    ),
    "_call_handler_hook": Internal("end_data calls the DATA hook", ("self", "command", "args")),
    "_set_post_data_state": Internal("end_data resets the envelope", ("self",)),
    "_reset_timeout": Internal("restart_idle_timer", ("self", "duration")),
    "check_helo_needed": Internal("start_data", ("self", "helo")),
    "check_auth_needed": Internal("start_data", ("self", "caller_method")),
}
# Attributes of a session, by name: the type of their value once a plain connection is made.
ATTRIBUTES = {
    "_smtp_methods": (dict, "wrap_commands replaces it"),
    "_reader": (asyncio.StreamReader, "reader: the mail data is read from it"),
    "_writer": (asyncio.StreamWriter, "close_stream"),
    "_auth_require_tls": (bool, "allow_auth_without_tls sets it"),
    "_tls_protocol": (type(None), "starttls_done: not None once STARTTLS is done"),
}


def fingerprint(method: Callable[..., Any]) -> str:
    """The first 16 hex digits of the SHA-256 of method's source."""
    return hashlib.sha256(inspect.getsource(method).encode()).hexdigest()[:16]


_HOOKS: dict[tuple[type, tuple[str, ...]], list[str]] = {}


def hook_names(cls: type, prefixes: tuple[str, ...]) -> list[str]:
    """The method names of cls that start with one of prefixes, found once per class: what
    aiosmtpd's SMTP.__init__ looks for in dir() of each new session and of its handler."""
    key = (cls, prefixes)
    if key not in _HOOKS:
        _HOOKS[key] = [name for name in dir(cls) if name.startswith(prefixes)]
    return _HOOKS[key]


class BaseSession(SMTP):
    """aiosmtpd's SMTP protocol with the private parts the relay uses behind names of its own,
    and the two it overrides."""

    verb = ""  # the command being run (RelaySMTP sets it): MAIL and RCPT have parameters taken
    taken: Sequence[str] = ()  # those _getaddr took out of the last MAIL or RCPT (always reset)

    def __dir__(self) -> list[str]:
        """Only the SMTP verbs and AUTH mechanisms: aiosmtpd scans dir() of each new session
        with inspect.getmembers, which took a seventh of the intake's CPU on the full list."""
        return hook_names(type(self), ("smtp_", "auth_"))

    def wrap_commands(self, wrap: Callable[[str, Command], Command]) -> None:
        """Put wrap(verb, method) in the place of each verb's method: aiosmtpd has no hook
        before each command, and dispatches them through this table."""
        self._smtp_methods = {name: wrap(name, m) for name, m in self._smtp_methods.items()}

    @property
    def reader(self) -> asyncio.StreamReader:
        """The stream aiosmtpd reads the client's commands from."""
        return self._reader

    def close_stream(self) -> None:
        self._writer.close()

    def restart_idle_timer(self) -> None:
        self._reset_timeout()

    def allow_auth_without_tls(self) -> None:
        self._auth_require_tls = False

    @property
    def starttls_done(self) -> bool:
        return self._tls_protocol is not None

    async def start_data(self, arg: str) -> bool:
        """aiosmtpd's DATA up to its 354, with the same checks and replies; False if refused."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return False
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return False
        if arg:
            await self.push("501 Syntax: DATA")
            return False
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        return True

    async def end_data(self, problem: str | None) -> None:
        """aiosmtpd's end of DATA once the data is read: problem (a refusal) or the handler's
        DATA hook's reply, then a new envelope."""
        if problem is not None:
            await self.push(problem)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's parser (email's RFC 5322 one, 70 µs a call, twice per message) for
        anything but a plain path, which a regex reads the same way
        (tests/unit/intake/test_session.py compares the two; a local-part limit, which we do
        not set, is left to aiosmtpd too). After EHLO, the parameters of MAIL and RCPT that
        aiosmtpd does not know (it refuses them with a 555 that names none) are taken out
        into self.taken, as the client wrote them, for the handler to judge (the DSN ones of
        RFC 3461, relay/mail/dsnparams.py); aiosmtpd upper-cases what it is left."""
        self.taken = []
        plain = plain_path(arg)
        if plain is None or self.local_part_limit:
            address, params = super()._getaddr(arg)
        else:
            address, params = plain
        session = self.session
        if address and params and session is not None and session.extended_smtp:
            params, self.taken = split_params(params, self.verb)
        return address, params

    def _authenticate(self, mechanism: str, auth_data: Any) -> AuthResult:
        """What auth_PLAIN and auth_LOGIN decoded, left unanswered for the password check."""
        login, password = auth_data
        return AuthResult(
            success=False, handled=False, auth_data=Credentials(mechanism, login, password)
        )
