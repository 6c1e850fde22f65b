"""Intake, the session registry: the open sessions of one intake process and what each asks of
the intake (admission by the guard, a Draft for its DATA, a password check), and the drain that
stops them when the daemon stops."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

from aiosmtpd.smtp import AuthResult

from relay.config import Config
from relay.intake.auth import Auth, Credentials
from relay.intake.data import Draft
from relay.intake.guard import REPLY_BANNED, Guard, client_address
from relay.spool.spill import Spill


class Member(Protocol):
    """What the registry needs of a session."""

    ip: str
    transport: asyncio.BaseTransport | None

    @property
    def in_transaction(self) -> bool: ...

    def shut(self, reply: str = ..., count: bool = ...) -> None: ...


class Registry:
    """The open sessions, and the intake as they see it: its settings, guard and users."""

    def __init__(self, cfg: Config, spill: Callable[[], Spill]) -> None:
        self.cfg = cfg
        self.guard = Guard(cfg)
        self.auth = Auth(cfg, self.guard)
        self.spill = spill
        self.open: set[Member] = set()
        self.draining = False

    def configure(self, cfg: Config) -> None:
        """The settings new sessions take (a reload); open ones keep their limits."""
        self.cfg = self.guard.cfg = self.auth.cfg = cfg

    def join(self, session: Member) -> tuple[str, str] | None:
        """Admit a new session, or (reason, reply) to refuse it with."""
        refusal = self.guard.admit(session.ip)
        if refusal is None:
            self.open.add(session)
        return refusal

    def leave(self, session: Member) -> None:
        self.open.discard(session)
        self.guard.leave(session.ip)

    def draft(self) -> Draft:
        """Where a session's DATA goes while it arrives."""
        return Draft(self.spill)

    def plaintext_auth_allowed(self, ip: str) -> bool:
        return self.cfg.smtp.auth.plaintext_on_loopback and client_address(ip).is_loopback

    async def authenticate(self, session: Member, creds: Credentials) -> AuthResult:
        """The answer to an AUTH: a banned IP is told so and cut off, others are checked."""
        if self.guard.is_banned(session.ip):
            session.shut(REPLY_BANNED, count=False)
            return AuthResult(success=False, handled=True)
        return await self.auth.check(session.ip, creds)

    async def drain(self, grace: float) -> int:
        """Stop taking mail: new connections and idle sessions get 421 at once, sessions in a
        transaction when it ends. What is still open at grace is cut; returns how many."""
        self.draining = True
        deadline = time.monotonic() + grace
        while self.open and time.monotonic() < deadline:
            for session in list(self.open):
                if not session.in_transaction:
                    session.shut()
            await asyncio.sleep(0.05)
        return self.cut()

    def cut(self) -> int:
        """Close every session now (a second SIGTERM, or the grace period's end)."""
        self.draining = True
        open_sessions = [s for s in self.open if s.transport and not s.transport.is_closing()]
        for session in open_sessions:
            session.shut()
        return len(open_sessions)
