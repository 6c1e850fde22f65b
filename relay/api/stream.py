"""API, the live event stream: `GET /v1/events` (Server-Sent Events), each event the history
takes in that the token's tenant and the filters match, replayed from after Last-Event-ID and
then live, with no gap and no repeat between the two (docs/events.md "The live stream")."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator

from aiohttp import web
from aiohttp_sse import EventSourceResponse, sse_response

from relay.api import live, submit
from relay.api.auth import TOKEN, tenant
from relay.api.batches import BATCH_RE
from relay.api.problems import Problem
from relay.api.schemas import query
from relay.api.spec import Answer, Route, problem
from relay.history.store import EventFilter, History
from relay.mail import events as names
from relay.observe import logs, metrics
from relay.spool.message import is_id

HEARTBEAT = 15.0  # a comment line this often keeps proxies and clients from timing out
STALL = 10.0  # a write waiting this long on a full buffer drops the client
PAGE = 500  # events read from the history at a time
LOOK = 1.0  # a quiet stream looks this often whether its client is gone (its slot is freed)
PARAMETERS = ("types", "message_id", "batch_id", "recipient", "last_event_id")
RESET = "reset"
MAX_ADDRESS = 320


def parse(request: web.Request) -> EventFilter:
    """The stream's filters within the token's tenant; 400 naming a bad one."""
    params = request.query
    for name in params:
        if name not in PARAMETERS:
            raise Problem(400, f"{name}: not a parameter of this endpoint", field=name)
    message_id, batch_id = params.get("message_id"), params.get("batch_id")
    if message_id is not None and not is_id(message_id):
        raise Problem(400, f"message_id: {message_id[:40]!r} is not a message id",
                      field="message_id")  # fmt: skip
    if batch_id is not None and not BATCH_RE.fullmatch(batch_id):
        raise Problem(400, f"batch_id: {batch_id[:70]!r} is not a batch id (1-64 of A-Z a-z "
                      "0-9 . _ -)", field="batch_id")  # fmt: skip
    recipient = params.get("recipient")
    if recipient is not None and not 0 < len(recipient) <= MAX_ADDRESS:
        raise Problem(400, f"recipient: an address of 1 to {MAX_ADDRESS} characters",
                      field="recipient")  # fmt: skip
    return EventFilter(tenant(request), types(params.getall("types", [])), message_id,
                       batch_id, recipient)  # fmt: skip


def types(values: list[str]) -> frozenset[str]:
    """Event names from types=a,b (or repeated), each with or without the message. prefix."""
    wanted = {word.strip().removeprefix(names.TYPE_PREFIX) for v in values for word in v.split(",")}
    wanted.discard("")
    unknown = sorted(wanted - names.NAMES)
    if unknown:
        raise Problem(400, f"types: {unknown[0][:40]!r} is not an event type (one of "
                      f"{', '.join(sorted(names.NAMES))})", field="types")  # fmt: skip
    return frozenset(wanted)


@contextlib.contextmanager
def slot(request: web.Request) -> Iterator[None]:
    """One of the token's api.max_streams_per_token streams, for the stream's life; 429 when
    it holds them all."""
    feed, name = request.app[live.FEED], request[TOKEN].name
    limit = request.app[submit.CONFIG].cfg.api.max_streams_per_token
    if feed.open.get(name, 0) >= limit:
        metrics.STREAMS_REFUSED.inc()
        raise Problem(
            429, f"token {name} has {limit} event streams open already "
            "(api.max_streams_per_token); close one", headers={"Retry-After": "5"},
        )  # fmt: skip
    feed.open[name] = feed.open.get(name, 0) + 1
    metrics.STREAMS.inc()
    try:
        yield
    finally:
        feed.open[name] -= 1
        metrics.STREAMS.dec()


async def start(request: web.Request, store: History, wanted: EventFilter) -> tuple[int, bool]:
    """Where the stream starts, and whether it starts with a reset: after Last-Event-ID's event
    (reset, from the oldest retained, when it is not in the history); with message_id alone,
    from that message's first event; else at the newest event taken in (live only)."""
    await live.catch_up(request)
    last = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    if last:
        seq = await asyncio.to_thread(store.seq_of, last)
        return (0, True) if seq is None else (seq, False)
    if wanted.message_id is not None:
        return 0, False
    return await asyncio.to_thread(store.last_seq), False


async def events(request: web.Request) -> web.StreamResponse:
    wanted = parse(request)
    store = live.history(request)
    with slot(request):
        after, reset = await start(request, store, wanted)
        async with sse_response(request, send_timeout=STALL, ping_interval=HEARTBEAT) as sse:
            try:
                if reset:
                    await sse.send(reset_data(request), event=RESET)
                await pump(request, sse, store, wanted, after)
            except TimeoutError:
                metrics.STREAMS_DROPPED.inc()
                logs.event("stream_dropped", token=request[TOKEN].name, stalled_for=STALL)
            except (ConnectionResetError, RuntimeError):
                pass  # the client went away mid-write
    return sse


def reset_data(request: web.Request) -> str:
    last = request.headers.get("Last-Event-ID") or request.query.get("last_event_id", "")
    return json.dumps({
        "last_event_id": last,
        "detail": "that event is not in the journal (older than events.retention, or unknown):"
                  " every retained event that matches follows",
    })  # fmt: skip


async def pump(
    request: web.Request, sse: EventSourceResponse, store: History, wanted: EventFilter, after: int
) -> None:
    """Send what the history has after `after`, then wait for more, until the client goes or
    the API stops."""
    feed = request.app[live.FEED]
    while not feed.closing and connected(request, sse):
        signal = feed.signal  # before the read: a batch taken in during it wakes the wait
        found, after = await asyncio.to_thread(store.events_after, after, wanted, PAGE)
        for stored in found:
            await sse.send(stored.data, id=stored.event_id, event=names.TYPE_PREFIX + stored.event)
        if len(found) < PAGE:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(signal.wait(), LOOK)


def connected(request: web.Request, sse: EventSourceResponse) -> bool:
    transport = request.transport
    return transport is not None and not transport.is_closing() and sse.is_connected()


STREAM = {
    "type": "string",
    "description": "text/event-stream: frames `id: <event id>`, `event: message.<event>`, "
    "`data: <the event, as in GET /v1/messages/{id}>`; `event: reset` first when "
    "Last-Event-ID is no longer retained; a `: ping` comment every 15 s",
}
ROUTES = (
    Route(
        "GET", "/v1/events", events, "streamEvents",
        "A live stream of events (Server-Sent Events), resumable with Last-Event-ID", "read",
        {
            200: Answer("the stream; it stays open", STREAM, media="text/event-stream"),
            400: problem("a filter is not valid (field names it)"),
            429: problem("the token has api.max_streams_per_token streams open (Retry-After)"),
        },
        parameters=(
            query("types", "only these events (comma-separated: delivered,bounced or "
                  "message.delivered,...)", {"type": "string"}),
            query("message_id", "only this message's events; without Last-Event-ID the stream "
                  "starts at its first event", {"type": "string"}),
            query("batch_id", "only this batch's events", {"type": "string"}),
            query("recipient", "only the events about this address and its messages' "
                  "message-wide ones (case-insensitive)", {"type": "string"}),
            query("last_event_id", "as the Last-Event-ID header: replay every event after "
                  "this one", {"type": "string"}),
        ),
    ),
)  # fmt: skip
