"""Intake, wake-ups: each accepted message's id told to the scheduler, so that it is delivered
at once rather than at the scheduler's next scan."""

from __future__ import annotations

import asyncio


class Notifier:
    """Wake-ups to the scheduler: one id per line over a persistent UNIX stream connection.

    Lossless while the scheduler runs. While it is down (or restarting), ids wait in a bounded
    backlog and the connection is retried; what is dropped is found by the scheduler's scan
    at its start and every scan_interval, so a wake-up only ever makes delivery faster.
    """

    BACKLOG = 10_000
    WRITE_BUFFER = 1 << 20

    def __init__(self, address: str) -> None:
        self.address = address
        self.writer: asyncio.StreamWriter | None = None
        self.backlog: list[bytes] = []
        self.connecting: asyncio.Task[None] | None = None

    def __call__(self, msg_id: str) -> None:
        line = msg_id.encode() + b"\n"
        writer = self.writer
        if writer is not None and not writer.is_closing():
            if writer.transport.get_write_buffer_size() < self.WRITE_BUFFER:
                writer.write(line)
            return
        if len(self.backlog) < self.BACKLOG:
            self.backlog.append(line)
        if self.connecting is None or self.connecting.done():
            self.connecting = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        try:
            _, writer = await asyncio.open_unix_connection(self.address)
        except OSError:
            self.backlog.clear()  # the scheduler is down: its start-up scan finds them
            return
        writer.write(b"".join(self.backlog))
        self.backlog.clear()
        self.writer = writer
