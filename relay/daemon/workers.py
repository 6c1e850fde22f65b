"""Daemon, the workers: the entry point of the intake, scheduler and API processes the supervisor
starts, and what they share (config, signals, reloads, a graceful stop, the status pipe)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import gc
import os
import signal
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from relay import config
from relay.delivery.agent import SmtpAgent
from relay.history import ingest
from relay.history.store import History
from relay.intake import listeners
from relay.intake.handler import IntakeHandler
from relay.intake.notifier import Notifier
from relay.intake.pickup import Pickup
from relay.observe import logs, metrics
from relay.ops import control
from relay.schedule.scheduler import Scheduler
from relay.schedule.wake import listen_wake
from relay.spool.run import SCHEDULER_LOCK, WAKE_SOCKET, spool_lock
from relay.spool.store import Spool
from relay.suppression import feed as suppression_feed
from relay.suppression.feed import Feed
from relay.suppression.store import path_of

if TYPE_CHECKING:
    from relay.api.app import Server
    from relay.hooks.service import Webhooks

ROLES = ("intake", "scheduler", "api", "hooks")  # hooks while webhooks are configured
STATUS_FD = "RELAY_STATUS_FD"
SUPERVISOR_PID = "RELAY_SUPERVISOR_PID"
PR_SET_PDEATHSIG = 1
BIND_RETRY = 5.0
HEARTBEAT = 1.0  # workers report "alive" this often
# Accepting is what a client waits on; delivery can wait a moment: when both want the CPU the
# intake gets it first (the scheduler runs at this nice value, the intake at the daemon's).
SCHEDULER_NICE = 5
# The API yields to both: a slow client or a big query never takes the CPU from mail.
API_NICE = 10
GC_YOUNG = 20_000  # container allocations between collections of the youngest generation
T = TypeVar("T")


def worker(role: str, config_file: str | None, cfg: config.Config) -> int:
    """`relay worker ROLE`: one process of the daemon, started by the supervisor."""
    logs.configure(role)
    _die_with_parent()
    _tune_gc()
    os.nice({"scheduler": SCHEDULER_NICE, "api": API_NICE, "hooks": API_NICE}.get(role, 0))
    runner: Callable[[Worker], Coroutine[Any, Any, int]] = {
        "intake": run_intake,
        "scheduler": run_scheduler,
        "api": run_api,
        "hooks": run_hooks,
    }[role]
    return asyncio.run(runner(Worker(role, config_file, cfg)))


class Worker:
    """What the workers share: their config, signals, and the status pipe to the supervisor."""

    def __init__(self, role: str, config_file: str | None, cfg: config.Config) -> None:
        self.role = role
        self.config_file = config_file
        self.cfg = cfg
        self.spool = Spool(cfg.spool.path)
        self.signals: asyncio.Queue[signal.Signals] = asyncio.Queue()

    def listen_for_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self.signals.put_nowait, sig)

    def status(self, word: str) -> None:
        fd = os.environ.get(STATUS_FD)
        if fd:
            with contextlib.suppress(OSError):
                os.write(int(fd), f"{self.role} {word}\n".encode())

    def ready(self, **fields: Any) -> None:
        logs.event("ready", **fields)
        self.status("ready")

    def reload(self) -> config.Config | None:
        """Read the config file again; None (and a log line) if it is not valid."""
        try:
            self.cfg = config.load(self.config_file)
        except config.ConfigError as exc:
            logs.event("reload_failed", level="error", error=str(exc))
            return None
        logs.event("reloaded")
        return self.cfg

    async def until_stop(
        self,
        on_reload: Callable[[config.Config], Coroutine[Any, Any, None]],
        also: asyncio.Future[Any] | None = None,
    ) -> None:
        """Serve reloads until SIGTERM/SIGINT (or `also` finishes)."""
        while True:
            sig = asyncio.ensure_future(self.signals.get())
            await asyncio.wait(
                [sig, *([also] if also else [])], return_when=asyncio.FIRST_COMPLETED
            )
            if not sig.done():
                sig.cancel()
                return
            if sig.result() != signal.SIGHUP:
                return
            new = self.reload()
            if new is not None:
                await on_reload(new)

    async def stop_within_grace(
        self, stop: Coroutine[Any, Any, int], cut_now: Callable[[], Coroutine[Any, Any, int]]
    ) -> int:
        """Run `stop` (drain, then cut at grace); a second SIGTERM cuts at once. Returns the
        number of sessions or deliveries cut."""
        logs.event("stopping", grace=self.cfg.lifecycle.grace)
        stopping = asyncio.ensure_future(stop)
        cut = 0
        while not stopping.done():
            sig = asyncio.ensure_future(self.signals.get())
            await asyncio.wait([stopping, sig], return_when=asyncio.FIRST_COMPLETED)
            if sig.done() and sig.result() != signal.SIGHUP:
                cut += await cut_now()
            sig.cancel()
        return cut + stopping.result()

    async def heartbeat(self) -> None:
        while True:
            self.status("alive")
            await asyncio.sleep(HEARTBEAT)


async def run_intake(w: Worker) -> int:
    w.listen_for_signals()
    try:
        handler = IntakeHandler(w.cfg, w.spool, Notifier(w.spool.socket_address(WAKE_SOCKET)))
    except config.ConfigError as exc:
        logs.event("error", level="error", stage="intake", error=str(exc))
        return 1
    servers = await _bind(handler)
    if servers is None:
        return 1
    metrics.prime(w.cfg.provider_names())
    w.ready(listen=[f"{h}:{p}" for h, p in w.cfg.smtp.listen])
    beat = asyncio.ensure_future(w.heartbeat())
    # The maildrop's files, submitted over the socket just bound (docs/sendmail.md).
    picked = asyncio.Event()
    pickup = asyncio.ensure_future(Pickup(w.cfg, w.spool).run(picked))

    async def reload(cfg: config.Config) -> None:
        try:  # new sessions take the new limits, certificate and users; open ones keep theirs
            handler.configure(cfg)
        except config.ConfigError as exc:
            logs.event("reload_failed", level="error", error=str(exc))

    await w.until_stop(reload)

    async def cut_now() -> int:
        return handler.cut()

    picked.set()
    await pickup
    cut = await w.stop_within_grace(handler.drain(w.cfg.lifecycle.grace), cut_now)
    for server in servers:
        server.close()
    beat.cancel()
    logs.event("stopped", sessions_cut=cut)
    return 0


async def _bind(handler: IntakeHandler) -> list[asyncio.Server] | None:
    return await _retry_bind("intake", lambda: listeners.serve(handler))


async def _retry_bind(role: str, bind: Callable[[], Coroutine[Any, Any, T]]) -> T | None:
    deadline = time.monotonic() + BIND_RETRY
    while True:
        try:
            return await bind()
        except OSError as exc:
            # A predecessor orphaned by a killed supervisor may still be closing its sockets.
            if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                logs.failure(role, exc, action="listen")
                return None
            await asyncio.sleep(0.2)


async def run_api(w: Worker) -> int:
    """The journal's readers (the history, the automatic suppressions, the journal's pruning)
    and, while api.listen is set, the HTTP API; its own process, so that no request slows
    mail down."""
    w.listen_for_signals()
    listen = w.cfg.api.listen
    history = History(w.spool.history_path)
    server = None if listen is None else await _serve_api(w.cfg, history, listen)
    if listen is not None and server is None:
        history.close()
        return 1
    done = asyncio.Event()
    taken = (lambda: None) if server is None else server.feed.taken
    following = asyncio.ensure_future(
        ingest.follow(history, w.spool.events_dir, lambda: w.cfg.events.retention, done, taken)
    )
    # The automatic suppression entries: a second reader of the same journal (its own file).
    feed = Feed(path_of(w.spool.history_path), lambda: w.cfg.suppression)
    feeding = asyncio.ensure_future(suppression_feed.follow(feed, w.spool.events_dir, done))
    # No api.listen (restart-only): no HTTP, the journal's readers only.
    w.ready(listen=f"{listen[0]}:{listen[1]}" if listen else None)
    beat = asyncio.ensure_future(w.heartbeat())

    async def reload(cfg: config.Config) -> None:
        if server is not None:
            server.reconfigure(cfg)

    await w.until_stop(reload)
    logs.event("stopping", grace=w.cfg.lifecycle.grace)
    if server is not None:
        await server.stop()  # requests in flight finish, up to the grace period
    done.set()
    await following
    await feeding
    feed.close()
    history.close()
    beat.cancel()
    logs.event("stopped")
    return 0


async def _serve_api(
    cfg: config.Config, history: History, listen: tuple[str, int]
) -> Server | None:
    """The HTTP API listening on listen, or None (logged) if it cannot bind. Imported here:
    aiohttp costs a worker 16 MiB and a quarter second."""
    from relay.api.app import Server

    server = Server(cfg, history)
    if await _retry_bind("api", lambda: server.start(*listen)) is None:
        await server.stop()
        return None
    return server


async def run_hooks(w: Worker) -> int:
    """Every webhook endpoint's sender; its own process (at the API's nice value), so that a
    slow endpoint never takes time from mail. A reload starts the senders afresh."""
    w.listen_for_signals()
    w.spool.hooks_dir.mkdir(mode=0o700, exist_ok=True)
    stop = asyncio.Event()
    # Opened before ready: a new endpoint's outbox starts at the journal's end as it is now.
    running = asyncio.ensure_future(_webhooks(w.cfg, w.spool).run(stop))
    w.ready(webhooks=[h.name for h in w.cfg.webhooks])
    beat = asyncio.ensure_future(w.heartbeat())

    async def reload(cfg: config.Config) -> None:
        nonlocal stop, running
        stop.set()
        await running
        stop = asyncio.Event()
        running = asyncio.ensure_future(_webhooks(cfg, w.spool).run(stop))

    await w.until_stop(reload)
    stop.set()
    await running
    beat.cancel()
    logs.event("stopped")
    return 0


def _webhooks(cfg: config.Config, spool: Spool) -> Webhooks:
    """Every endpoint's sender, its outbox opened (imported here: aiohttp's client stays out of
    the other workers)."""
    from relay.hooks.service import Webhooks

    return Webhooks(cfg.webhooks, spool.hooks_dir, spool.events_dir)


async def run_scheduler(w: Worker) -> int:
    w.listen_for_signals()
    with spool_lock(w.spool, SCHEDULER_LOCK, wait=w.cfg.lifecycle.grace + 10) as held:
        if not held:
            logs.event("error", level="error", stage="scheduler", error="scheduler.lock is held")
            return 1
        return await _schedule(w)


async def _schedule(w: Worker) -> int:
    scheduler = Scheduler(w.cfg, w.spool, SmtpAgent(w.cfg), heartbeat=lambda: w.status("alive"))
    server = await control.serve(scheduler, w.spool)
    wake = await listen_wake(scheduler, w.spool)
    running = asyncio.ensure_future(scheduler.run())
    w.ready()
    await w.until_stop(scheduler.reconfigure, also=running)
    server.close()
    wake.close()
    if running.done():  # the dispatch loop died: exit non-zero so the supervisor restarts us
        logs.failure("scheduler", running.exception() or RuntimeError("dispatch loop ended"))
        return 1
    cut = await w.stop_within_grace(scheduler.stop(w.cfg.lifecycle.grace), scheduler.cut)
    await running
    logs.event("stopped", deliveries_cut=cut)
    return 0


def _tune_gc() -> None:
    """Fewer, cheaper cyclic collections: everything alive once the worker is set up (modules,
    config) is frozen out of them, and the youngest generation is collected every GC_YOUNG
    container allocations instead of 700. perf put the collector at 5% of the intake's CPU."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG, 20, 20)


def _die_with_parent() -> None:
    """Linux PR_SET_PDEATHSIG: SIGTERM (a graceful stop) when the supervisor dies, even by
    kill -9, so no worker outlives it and holds the port or the spool."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(os.environ.get(SUPERVISOR_PID, os.getppid())):
        os.kill(os.getpid(), signal.SIGTERM)  # the supervisor died before prctl took effect
