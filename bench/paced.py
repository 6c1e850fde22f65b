"""Open-loop paced SMTP load on loopback: message i starts at t0 + i/rate over a new connection
and is timed from that scheduled start to the 250 after DATA (queueing delay included)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

HOST = "127.0.0.1"  # loopback only
MAX_OPEN = 200  # connections open at once; a message waiting for a slot starts late
MAX_MESSAGES = 100_000
LATE_AFTER = 0.01  # seconds after its scheduled start a message counts as late


@dataclass
class Outcome:
    messages: int  # scheduled
    latencies: list[float] = field(default_factory=list)  # seconds, one per accepted message
    accepted_at: list[float] = field(default_factory=list)  # perf_counter of each 250
    late: int = 0  # started more than LATE_AFTER after their scheduled time
    failures: list[str] = field(default_factory=list)  # refused or failed, one per message

    @property
    def errors(self) -> int:
        """Messages not accepted: refused, failed, or cut off by the deadline."""
        return self.messages - len(self.latencies)


class Refused(Exception):
    """The server answered with an unexpected reply code."""


async def reply(reader: asyncio.StreamReader, expect: bytes) -> None:
    """Read one (possibly multi-line) reply; raise Refused unless its code is `expect`."""
    for _ in range(100):
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            if line[:3] != expect:
                raise Refused(line.decode(errors="replace").strip())
            return
    raise Refused("reply too long")


async def send(port: int, envelope: tuple[str, str], data: bytes) -> float:
    """One message over a new connection; the perf_counter time of the 250 after DATA."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        await reply(reader, b"220")
        for command, expect in (
            (b"EHLO paced.test\r\n", b"250"),
            (f"MAIL FROM:<{envelope[0]}>\r\n".encode(), b"250"),
            (f"RCPT TO:<{envelope[1]}>\r\n".encode(), b"250"),
            (b"DATA\r\n", b"354"),
            (data, b"250"),
        ):
            writer.write(command)
            await reply(reader, expect)
        accepted = time.perf_counter()
        writer.write(b"QUIT\r\n")
        with contextlib.suppress(OSError, Refused, ValueError):  # accepted all the same
            await reply(reader, b"221")
        return accepted
    finally:
        writer.close()


def wire(body: bytes) -> bytes:
    """The DATA payload: dot-stuffed body and the terminating CRLF.CRLF."""
    stuffed = (b"." if body.startswith(b".") else b"") + body.replace(b"\r\n.", b"\r\n..")
    return stuffed + (b".\r\n" if stuffed.endswith(b"\r\n") else b"\r\n.\r\n")


async def paced(
    port: int, rate: float, envelope: tuple[str, str], body: bytes, duration: float, limit: float
) -> Outcome:
    """rate x duration messages, each started on schedule whatever the earlier ones are doing;
    whatever is not accepted within `limit` seconds is cut off and counts as an error."""
    out = Outcome(messages=min(MAX_MESSAGES, max(1, round(rate * duration))))
    data, slots = wire(body), asyncio.Semaphore(MAX_OPEN)
    t0 = time.perf_counter()
    deadline = t0 + limit

    async def one(scheduled: float) -> None:
        try:
            out.accepted_at.append(await send(port, envelope, data))
            out.latencies.append(out.accepted_at[-1] - scheduled)
        except (OSError, Refused, ValueError) as exc:
            out.failures.append(f"{type(exc).__name__}: {exc}")
        finally:
            slots.release()

    tasks: list[asyncio.Task[None]] = []
    for i in range(out.messages):
        scheduled = t0 + i / rate
        if scheduled >= deadline:
            break
        await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
        try:
            await asyncio.wait_for(slots.acquire(), deadline - time.perf_counter())
        except TimeoutError:
            break
        out.late += time.perf_counter() - scheduled > LATE_AFTER
        tasks.append(asyncio.create_task(one(scheduled)))
    if tasks:
        await asyncio.wait(tasks, timeout=max(0.001, deadline - time.perf_counter()))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    out.latencies.sort()
    out.accepted_at[:] = [t - t0 for t in out.accepted_at]  # seconds since t0
    return out


def achieved_per_s(out: Outcome) -> float:
    """Accepted messages per second, from the first scheduled start to the last 250."""
    span = max(out.accepted_at, default=0.0)
    return len(out.accepted_at) / span if span > 0 else 0.0
