"""Delivery, the pool: idle outbound SMTP sessions kept per destination for the next delivery."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiosmtplib import SMTP, SMTPException

# How long an idle session may take to answer RSET before it is given up (Postfix's
# smtp_rset_timeout), and a QUIT to be answered and the connection closed.
RSET_TIMEOUT = 20.0
CLOSE_TIMEOUT = 5.0


class Connection(SMTP):
    """aiosmtplib's client, whose closing (by either side) can be awaited."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.closed = asyncio.Event()

    def close(self) -> None:
        super().close()  # also what aiosmtplib calls when the server closes the connection
        self.closed.set()


@dataclass(frozen=True)
class Key:
    """Whom a session talks to: only a delivery to the same peer may reuse it."""

    host: str | None  # MX host or smarthost name
    ip: str | None
    port: int
    login: tuple[str, str] | None = field(default=None, repr=False)  # AUTH credentials


@dataclass(eq=False)
class Idle:
    """A session waiting for its next transaction, and what it achieved and carried so far."""

    smtp: Connection
    key: Key
    tls: bool
    verified: bool
    uses: int  # transactions carried
    since: float = field(default_factory=time.monotonic)


class Pool:
    """Idle sessions per destination, oldest first; sessions the server closed are dropped."""

    def __init__(self, idle_timeout: float) -> None:
        self._idle_timeout = idle_timeout
        self._idle: dict[str, list[Idle]] = {}

    def count(self, destination: str) -> int:
        return len(self._alive(destination))

    def put(self, destination: str, idle: Idle) -> None:
        idle.since = time.monotonic()
        self._idle.setdefault(destination, []).append(idle)

    def take(self, destination: str, key: Key, fits: Callable[[Idle], bool]) -> Idle | None:
        """The most recently used session to key that fits, out of the pool; None if none."""
        sessions = self._alive(destination)
        for idle in reversed(sessions):
            if idle.key == key and fits(idle):
                sessions.remove(idle)
                return idle
        return None

    def evict(self, destination: str, room: int) -> list[Idle]:
        """Out of the pool: the oldest sessions of destination beyond room."""
        sessions = self._alive(destination)
        excess = max(0, len(sessions) - max(0, room))
        evicted, sessions[:] = sessions[:excess], sessions[excess:]
        return evicted

    def expired(self) -> list[Idle]:
        """Out of the pool: every session idle for idle_timeout or longer."""
        stale = time.monotonic() - self._idle_timeout
        out: list[Idle] = []
        for destination in list(self._idle):
            sessions = self._alive(destination)
            out += [idle for idle in sessions if idle.since <= stale]
            sessions[:] = [idle for idle in sessions if idle.since > stale]
        return out

    def drain(self) -> list[Idle]:
        """Out of the pool: every session."""
        out = [idle for sessions in self._idle.values() for idle in sessions]
        self._idle.clear()
        return out

    def _alive(self, destination: str) -> list[Idle]:
        """destination's list of sessions, without those whose connection has gone."""
        sessions = self._idle.get(destination)
        if sessions is None:
            return []
        sessions[:] = [idle for idle in sessions if idle.smtp.is_connected]
        if not sessions:
            del self._idle[destination]
        return sessions


async def reset(smtp: SMTP, timeout: float) -> bool:
    """RSET an idle session (RFC 5321 §4.1.1.5): whether it is good for a transaction; one that
    is not (the server has gone, or refuses) is closed."""
    try:
        await smtp.rset(timeout=timeout)
    except (SMTPException, OSError):
        smtp.close()
        return False
    except BaseException:
        smtp.close()  # cancelled: the session is out of the pool, and must not be left open
        raise
    return True


async def hang_up(sessions: Iterable[Idle], timeout: float) -> None:
    """QUIT every session at once (RFC 5321 §4.1.1.10) and wait, at most timeout, for the
    servers to close the connections: a host limited to N connections then sees them gone."""
    await asyncio.gather(*(_hang_up(idle.smtp, timeout) for idle in sessions))


async def _hang_up(smtp: Connection, timeout: float) -> None:
    try:
        with contextlib.suppress(SMTPException, OSError):
            async with asyncio.timeout(timeout):
                await smtp.execute_command(b"QUIT")
                await smtp.closed.wait()
    finally:
        smtp.close()
