"""Intake, AUTH: the users file as the sessions see it (read again when it changes), and the
password check off the event loop, slowed down by the guard after each failure."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass

from aiosmtpd.smtp import AuthResult, Session

from relay.config import Config
from relay.intake import users
from relay.intake.guard import Guard
from relay.observe import logs, metrics

REPLY_AUTH_OK = "235 2.7.0 Authentication successful"
REPLY_AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"


@functools.cache
def dummy_hash() -> str:
    """A well-formed hash that matches nothing, checked for unknown users so that failing with
    an unknown name takes as long as failing with a wrong password (made at first use: a
    scrypt hash costs every process that imports this module 0.16 s otherwise)."""
    return users.hash_password("relay-dummy-password")


@dataclass(frozen=True)
class Credentials:
    """What AUTH PLAIN or LOGIN decoded, waiting for the (slow, threaded) password check."""

    mechanism: str
    login: bytes
    password: bytes


def password_matches(password: str, user: users.User | None) -> bool:
    """The password check, as slow for an unknown user as for a known one (in a thread)."""
    return users.check_password(password, user.password_hash if user else dummy_hash())


class Auth:
    """The users of SMTP AUTH: who may log in, and the sender domains each may use."""

    def __init__(self, cfg: Config, guard: Guard) -> None:
        self.cfg = cfg
        self.guard = guard
        self.users: dict[str, users.User] = {}
        self.stamp: tuple[float, int] | None = None

    def reread(self) -> None:
        """Read the users file again at its next use (a reload may name another one)."""
        self.stamp = None

    def table(self) -> dict[str, users.User]:
        """The users file, read again when it changes (`relay user` on a running daemon)."""
        path = self.cfg.smtp.auth.users_file
        if path is None:
            return {}
        try:
            stat = path.stat()
            stamp = (stat.st_mtime, stat.st_size)
        except OSError:
            stamp = (0.0, 0)
        if stamp != self.stamp:
            try:
                self.users = users.load(path)
            except users.UsersError as exc:
                logs.failure("intake", exc, action="load_users")  # keep the previous table
            self.stamp = stamp
        return self.users

    def owner(self, session: Session) -> users.User | None:
        """The authenticated user of this session, if any."""
        if not session.authenticated:
            return None
        return self.table().get(str(session.auth_data))

    async def check(self, ip: str, creds: Credentials) -> AuthResult:
        """Check a password off the event loop; failures wait longer each time, then ban."""
        name = creds.login.decode("utf-8", "replace")
        user = self.table().get(name)
        password = creds.password.decode("utf-8", "replace")
        ok = await asyncio.to_thread(password_matches, password, user)
        if user is None or not ok:
            delay = self.guard.auth_failed(ip)
            await asyncio.sleep(delay)
            metrics.REJECTED.labels("auth_failed").inc()
            logs.event("auth_failed", client=ip, user=name, mechanism=creds.mechanism)
            return AuthResult(success=False, handled=False, message=REPLY_AUTH_FAILED)
        logs.event("authenticated", client=ip, user=name, mechanism=creds.mechanism)
        return AuthResult(success=True, auth_data=name, message=REPLY_AUTH_OK)
