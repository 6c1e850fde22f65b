"""GET /v1/events served in-process over a real history and real loopback sockets: a client that
stops reading while 100 MB of events wait for it is dropped (counted) without the API's memory
growing, and a client beside it still gets its events live."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp

from relay.api import live as api_live
from relay.api import stream
from relay.api.app import build
from relay.api.tokens import Tokens
from relay.history.store import History
from relay.observe import metrics
from tests.support.sse import stalled
from tests.unit.api.live import add_token

EVENTS = 50_000
PAD = 2000  # bytes of each event's data: 100 MB waiting in all
MSG = f"{7:020x}"


def rss() -> int:
    """This process's resident memory in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def fill(history: History, first: int, count: int, msg_id: str | None = None) -> None:
    """Events straight into the history's events table (the stream reads nothing else)."""
    rows = [
        (f"{n:026d}", "held", msg_id or f"{n % 1000:020x}", 0.0,
         json.dumps({"event": "held", "id": msg_id or f"{n % 1000:020x}", "tenant": "acme",
                     "event_id": f"{n:026d}", "note": "x" * PAD}))
        for n in range(first, first + count)
    ]  # fmt: skip
    with history.transaction():
        history.db.executemany(
            "INSERT INTO events (event_id, event, id, at, data) VALUES (?,?,?,?,?)", rows
        )


async def read_frames(response: aiohttp.ClientResponse, got: list[str]) -> None:
    async for line in response.content:
        if line.startswith(b"id: "):
            got.append(line[4:].decode().strip())


def test_a_stalled_client_is_dropped_without_growing_memory(tmp_path: Path) -> None:
    history = History(tmp_path / "history.sqlite")
    fill(history, 0, EVENTS)
    token = add_token(tmp_path / "tokens", "app")
    dropped = metrics.STREAMS_DROPPED._value.get()

    async def main() -> tuple[int, float, list[str], str]:
        app = build(Tokens(tmp_path / "tokens"), history=history)
        runner = aiohttp.web.AppRunner(app, access_log=None)
        await runner.setup()
        site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site.port}"
        before = rss()
        # Replays everything from the oldest event (the id is unknown: a reset, then all).
        sock = stalled(url, token, "last_event_id=unknown")
        sock.setblocking(False)
        got: list[str] = []
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {token}"}
            async with session.get(f"{url}/v1/events?message_id={MSG}", headers=headers) as other:
                reading = asyncio.ensure_future(read_frames(other, got))
                await asyncio.sleep(2.0)  # the stalled stream's buffers are full by now
                fill(history, EVENTS, 3, MSG)
                app[api_live.FEED].taken()
                started = time.monotonic()
                while len(got) < 50 + 3 and time.monotonic() - started < 10:
                    await asyncio.sleep(0.05)
                live_after = time.monotonic() - started
                peak = before
                deadline = time.monotonic() + stream.STALL + 10
                while metrics.STREAMS_DROPPED._value.get() == dropped:
                    assert time.monotonic() < deadline, "the stalled client was never dropped"
                    peak = max(peak, rss())
                    await asyncio.sleep(0.2)
                reading.cancel()
        sock.settimeout(5)
        ending = "closed"
        try:
            while sock.recv(1 << 20):
                pass
        except OSError as exc:
            ending = type(exc).__name__
        sock.close()
        await runner.cleanup()
        return peak - before, live_after, got, ending

    grown, live_after, got, ending = asyncio.run(main())
    history.close()
    print(f"stalled: RSS grew {grown / 2**20:.1f} MiB, live after {live_after:.2f} s")
    # 100 MB were there to send; the relay held no more than its buffers.
    assert grown < 16 * 1024 * 1024, f"RSS grew {grown / 2**20:.1f} MiB"
    # the client beside it: the message's 50 replayed events, then the 3 new ones live
    assert len(got) == 53 and live_after < 2.0, (len(got), live_after)
    assert metrics.STREAMS_DROPPED._value.get() == dropped + 1
    assert ending in ("closed", "ConnectionResetError")  # its connection ended, not hanging
