"""Operations, the control socket: queue operations for the CLI, sent over run/control.sock
to a running scheduler, or applied to the spool directly when the daemon is stopped."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import socket
import time
from typing import TYPE_CHECKING, Any

from relay.mail.target import expand
from relay.ops import summary
from relay.schedule.actions import OPS, selects
from relay.schedule.operate import change
from relay.spool.journal import Journal, cli_writer
from relay.spool.layout import DEAD, QUEUE, Layout
from relay.spool.run import CONTROL_SOCKET, DAEMON_LOCK, listen, spool_lock
from relay.spool.store import Spool, SpoolError, iter_messages

if TYPE_CHECKING:
    from relay.schedule.scheduler import Scheduler

Result = dict[str, list[str]]
# What a queued message waiting for these reasons waits out, where the scheduler says no more
# (the words of `relay queue list` and of the API's reason_detail).
REASON_DETAILS = {
    "held": "on hold: relay queue release lets it go",
    "quota": "over its sending quota until a window with room opens",
}
REPLY_LIMIT = 64 * 1024 * 1024  # the longest answer line the API reads (reasons of a page)


class ControlError(Exception):
    """The daemon could not be reached or the request was refused; str() is one line."""


# --- the daemon's side ------------------------------------------------------------------------


async def serve(scheduler: Scheduler, spool: Spool) -> asyncio.AbstractServer:
    """Answer one JSON request line per connection: {"op": ..., "target": ID|"ALL"}."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = json.loads(await reader.readline())
            reply: dict[str, Any] = await _execute(scheduler, spool, request)
        except Exception as exc:  # a malformed request must not take the scheduler down
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        writer.write(json.dumps(reply).encode() + b"\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    return await listen(spool, CONTROL_SOCKET, handle)


async def _execute(scheduler: Scheduler, spool: Spool, request: dict[str, Any]) -> Any:
    op = request["op"]
    if op == "reasons":
        ids = request.get("ids")
        return scheduler.reasons(None if ids is None else [str(i) for i in ids])
    if op == "destinations":
        return {"destinations": scheduler.destination_report()}
    if op == "summary":
        return await _summary(scheduler)
    if op == "cancel":
        return await _cancel(scheduler, spool, request)
    target, domain = str(request["target"]), request.get("domain")
    if op in OPS and request.get("batch") is not None:
        members = await asyncio.to_thread(batch_ids, spool, str(request["batch"]))
        return await _operate_each(scheduler, op, members, domain)
    if op in OPS:
        return await scheduler.operate(op, target, domain)
    if op == "requeue":
        result: Result = {"done": [], "busy": [], "missing": []}
        ids = expand(target, lambda: spool.ids(DEAD))
        for msg_id in ids:
            result[await scheduler.requeue(msg_id)].append(msg_id)
        return result
    raise ValueError(f"unknown op {op!r}")


async def _operate_each(
    scheduler: Scheduler, op: str, ids: list[str], domain: str | None
) -> Result:
    result: Result = {"done": [], "busy": [], "missing": [], "gone": []}
    for msg_id in ids:
        for kind, done in (await scheduler.operate(op, msg_id, domain)).items():
            result.setdefault(kind, []).extend(done)
    return result


async def _cancel(scheduler: Scheduler, spool: Spool, request: dict[str, Any]) -> Any:
    """The API's cancel: {"target": ID} or {"batch": BATCH}, as {"tenant": T} may (None:
    any); answers {"messages": {id: Operations.cancel's answer}}."""
    tenant = request.get("tenant")
    if request.get("target") is not None:
        ids = [str(request["target"])]
    else:
        ids = await asyncio.to_thread(batch_ids, spool, str(request["batch"]), tenant)
    return {"messages": {i: await scheduler.cancel(i, tenant) for i in ids}}


def batch_ids(spool: Spool, batch_id: str, tenant: str | None = None) -> list[str]:
    """The queued messages of a batch (of one tenant's, or of every tenant), read from their
    state files (which carry batch_id): a rare action pays one read of the queue."""
    return [
        msg.id
        for msg in iter_messages(spool, QUEUE)
        if msg.batch_id == batch_id and (tenant is None or msg.tenant == tenant)
    ]


async def _summary(scheduler: Scheduler) -> dict[str, Any]:
    """The qshape summary from the scheduler's index, reading no file, once its first scan is
    done."""
    if not scheduler.indexed:
        return {"indexed": False}
    arrivals = scheduler.arrivals()
    counted = await asyncio.to_thread(summary.count, arrivals, time.time())
    return {"indexed": True, "summary": counted.as_json()}


# --- the CLI's side ---------------------------------------------------------------------------


def request(
    spool: Spool, op: str, target: str, domain: str | None = None, batch: str | None = None
) -> Result:
    """Run op on target ("ALL" or a queue id) or on every queued message of a batch,
    optionally only for one recipient domain, live if the daemon runs, else on the spool."""
    if not spool.run_path("").exists():
        raise ControlError(f"{spool.root} is not a relay spool (no run/ directory)")
    with spool_lock(spool, DAEMON_LOCK, wait=0) as offline:
        if offline:
            return _offline(spool, op, target, domain, batch)
    message = {"op": op, "target": target, "domain": domain, "batch": batch}
    result: Result = _live(spool, message)
    return result


def inspect(spool: Spool, op: str, ids: list[str] | None = None) -> Any:
    """The running scheduler's view (op: reasons, of only ids if given; destinations,
    summary), or None when it is stopped."""
    with spool_lock(spool, DAEMON_LOCK, wait=0) as offline:
        if offline:
            return None
    return _live(spool, {"op": op} if ids is None else {"op": op, "ids": ids})


def _live(spool: Spool, message: dict[str, Any], timeout: float = 30.0) -> Any:
    """Ask the running scheduler; it may be restarting, so retry for a few seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _ask(spool.socket_address(CONTROL_SOCKET), message, timeout)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED) or time.monotonic() > deadline:
                raise ControlError(f"the daemon is running but not answering: {exc}") from None
            time.sleep(0.2)


async def ask(layout: Layout, message: dict[str, Any], timeout: float) -> Any:
    """The API's way to the running scheduler, without blocking its event loop; retried while
    the scheduler restarts; ControlError when it does not answer within timeout."""
    try:
        async with asyncio.timeout(timeout):
            return await _ask_async(layout, message)
    except (TimeoutError, OSError, ValueError) as exc:
        raise ControlError(f"the scheduler is not answering: {exc or 'timed out'}") from None


async def _ask_async(layout: Layout, message: dict[str, Any]) -> Any:
    while True:
        try:
            reader, writer = await asyncio.open_unix_connection(
                layout.socket_address(CONTROL_SOCKET), limit=REPLY_LIMIT
            )
            break
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                raise
            await asyncio.sleep(0.2)
    try:
        writer.write(json.dumps(message).encode() + b"\n")
        reply = json.loads(await reader.readline() or b"{}")
    finally:
        writer.close()
    if "error" in reply:
        raise ControlError(f"the scheduler refused the request: {reply['error']}")
    return reply


def _ask(address: str, message: dict[str, Any], timeout: float) -> Any:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.sendall(json.dumps(message).encode() + b"\n")
        reply = json.loads(sock.makefile("rb").readline() or b"{}")
    if "error" in reply:
        raise ControlError(f"the daemon refused the request: {reply['error']}")
    return reply


def _offline(spool: Spool, op: str, target: str, domain: str | None, batch: str | None) -> Result:
    """The same operations on a stopped daemon's spool, under its lock, journaled as the
    scheduler journals them, in a file of this command's own (cli-<pid>)."""
    journal = spool.open_journal(cli_writer())
    try:
        if batch is None:
            return _apply_offline(spool, journal, op, target, domain)
        result: Result = {"done": [], "busy": [], "missing": []}
        for msg_id in batch_ids(spool, batch):
            for kind, ids in _apply_offline(spool, journal, op, msg_id, domain).items():
                result[kind].extend(ids)
        return result
    finally:
        journal.close()


def _apply_offline(
    spool: Spool, journal: Journal, op: str, target: str, domain: str | None
) -> Result:
    result: Result = {"done": [], "busy": [], "missing": []}
    if op == "requeue":
        for msg_id in expand(target, lambda: spool.ids(DEAD)):
            try:
                spool.requeue(msg_id, time.time())
            except SpoolError:
                result["missing"].append(msg_id)
                continue
            result["done"].append(msg_id)
        return result
    for msg_id in expand(target, lambda: spool.ids(QUEUE)):
        try:
            msg = spool.load(msg_id)
        except SpoolError:
            result["missing"].append(msg_id)
            continue
        if not selects(msg, domain):
            continue
        if change(journal, op, msg, domain, time.time()):
            spool.remove(msg_id)
        else:
            spool.save(msg)
        result["done"].append(msg_id)
    return result
