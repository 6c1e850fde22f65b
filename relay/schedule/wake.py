"""Schedule, the wake channel: the intake's wake-ups (one queue id per line on run/wake.sock)
make new mail due within milliseconds; a lost one is caught by the periodic scan."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from relay.spool.run import WAKE_SOCKET, listen
from relay.spool.store import Spool

if TYPE_CHECKING:
    from relay.schedule.scheduler import Scheduler


async def listen_wake(scheduler: Scheduler, spool: Spool) -> asyncio.AbstractServer:
    """Intake's wake-ups (one queue id per line) make new mail due within milliseconds."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                scheduler.notice(line.strip().decode("ascii", "replace"))
        except (ConnectionError, asyncio.CancelledError):
            # Cancelled at shutdown: ending quietly keeps Python 3.11's streams from logging
            # the cancellation as an unhandled error.
            pass
        finally:
            writer.close()

    return await listen(spool, WAKE_SOCKET, handle)
