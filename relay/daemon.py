"""Daemon stage: the composition root, a supervisor that recovers the spool and keeps the intake
and scheduler processes running, and the entry point of each of those processes."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from relay import config, control, intake, logs
from relay.courier import Courier
from relay.resolver import Resolver
from relay.scheduler import Scheduler
from relay.spool import Spool

ROLES = ("intake", "scheduler")
READY_FD = "RELAY_READY_FD"
SUPERVISOR_PID = "RELAY_SUPERVISOR_PID"
PR_SET_PDEATHSIG = 1
BIND_RETRY = 5.0
START_TIMEOUT = 30.0
# Seconds for SMTP sessions and deliveries in flight to finish after SIGTERM.
GRACE = 30.0
RESTART_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)


class StartupError(Exception):
    """The daemon cannot start; str() is the one line for the operator."""


# --- supervisor -------------------------------------------------------------------------------


def serve(config_file: str | None, cfg: config.Config) -> int:
    """`relay serve`: recover the spool, then supervise the workers until SIGTERM/SIGINT."""
    logs.configure("supervisor")
    spool = Spool(cfg.spool.path)
    try:
        spool.prepare()
    except OSError as exc:
        raise StartupError(f"cannot create spool {cfg.spool.path}: {exc.strerror}") from None
    with control.spool_lock(spool, control.DAEMON_LOCK, wait=10.0) as held:
        if not held:
            raise StartupError(f"another relay is running on spool {cfg.spool.path}")
        logs.event("recovered", spool=str(spool.root), **spool.recover())
        return asyncio.run(Supervisor(config_file).run())


class Supervisor:
    """Starts the worker processes, reports readiness, restarts a worker that dies."""

    def __init__(self, config_file: str | None) -> None:
        self.config_args = ["--config", config_file] if config_file else []
        self.stop = asyncio.Event()
        self.ready: asyncio.Queue[str] = asyncio.Queue()
        self.children: dict[str, asyncio.subprocess.Process] = {}

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        read_fd, self.write_fd = os.pipe()
        loop.add_reader(read_fd, self._on_ready, read_fd)
        for role in ROLES:
            await self._spawn(role)
        if not await self._await_ready():
            await self._terminate()
            return 1
        logs.event("ready", pid=os.getpid())
        await self._supervise()
        await self._terminate()
        logs.event("stopped")
        return 0

    def _on_ready(self, fd: int) -> None:
        for role in os.read(fd, 4096).decode().split():
            self.ready.put_nowait(role)

    async def _spawn(self, role: str) -> None:
        self.children[role] = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "worker", role, *self.config_args,
            pass_fds=(self.write_fd,),
            env={**os.environ, READY_FD: str(self.write_fd), SUPERVISOR_PID: str(os.getpid())},
        )  # fmt: skip
        logs.event("started", role=role, pid=self.children[role].pid)

    async def _await_ready(self) -> bool:
        """Every worker must report ready before any of them exits or START_TIMEOUT passes."""
        missing = set(ROLES)
        exits = {role: asyncio.ensure_future(p.wait()) for role, p in self.children.items()}
        try:
            while missing and not self.stop.is_set():
                ready = asyncio.ensure_future(self.ready.get())
                done, _ = await asyncio.wait(
                    [ready, *exits.values()], timeout=START_TIMEOUT,
                    return_when=asyncio.FIRST_COMPLETED,
                )  # fmt: skip
                ready.cancel()
                failed = [role for role, task in exits.items() if task in done]
                if failed or not done:
                    logs.event("error", level="error", failed=failed or sorted(missing),
                               error="worker did not start; see its log lines above")  # fmt: skip
                    return False
                missing.discard(ready.result())
        finally:
            for task in exits.values():
                task.cancel()
        return not self.stop.is_set()

    async def _supervise(self) -> None:
        """Wait for a stop signal; restart any worker that exits meanwhile, with backoff."""
        restarts = dict.fromkeys(ROLES, 0)
        while not self.stop.is_set():
            waits = {asyncio.ensure_future(p.wait()): role for role, p in self.children.items()}
            stop = asyncio.ensure_future(self.stop.wait())
            done, _ = await asyncio.wait([stop, *waits], return_when=asyncio.FIRST_COMPLETED)
            for task in [stop, *waits]:
                task.cancel()
            for task in done & waits.keys():
                role = waits[task]
                logs.event("child_exited", level="error", role=role, code=task.result())
                delay = RESTART_BACKOFF[min(restarts[role], len(RESTART_BACKOFF) - 1)]
                restarts[role] += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), delay)
                if not self.stop.is_set():
                    logs.event("child_restarting", role=role, after=delay)
                    await self._spawn(role)

    async def _terminate(self) -> None:
        """SIGTERM every worker; SIGKILL what is still running after the grace period."""
        logs.event("stopping")
        live = [p for p in self.children.values() if p.returncode is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in live)), GRACE + 5)
        except TimeoutError:
            for proc in live:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await asyncio.gather(*(p.wait() for p in live))


# --- workers ----------------------------------------------------------------------------------


def worker(role: str, cfg: config.Config) -> int:
    """`relay worker ROLE`: one process of the daemon, started by the supervisor."""
    logs.configure(role)
    _die_with_parent()
    runner: Callable[[config.Config], Coroutine[Any, Any, int]] = {
        "intake": run_intake,
        "scheduler": run_scheduler,
    }[role]
    return asyncio.run(runner(cfg))


async def run_intake(cfg: config.Config) -> int:
    spool = Spool(cfg.spool.path)
    notify = intake.Notifier(spool.socket_address(control.WAKE_SOCKET))
    deadline = time.monotonic() + BIND_RETRY
    while True:
        try:
            servers = await intake.serve(cfg, spool, notify)
            break
        except OSError as exc:
            # A predecessor orphaned by a killed supervisor may still be closing its sockets.
            if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                logs.failure("intake", exc, action="listen")
                return 1
            await asyncio.sleep(0.2)
    _report_ready("intake", listen=[f"{h}:{p}" for h, p in cfg.smtp.listen])
    await _until_signalled()
    for server in servers:
        server.close()
    logs.event("stopped")
    return 0


async def run_scheduler(cfg: config.Config) -> int:
    spool = Spool(cfg.spool.path)
    with control.spool_lock(spool, control.SCHEDULER_LOCK, wait=GRACE + 10) as held:
        if not held:
            logs.event("error", level="error", stage="scheduler", error="scheduler.lock is held")
            return 1
        return await _schedule(cfg, spool)


async def _schedule(cfg: config.Config, spool: Spool) -> int:
    scheduler = Scheduler(cfg, spool, Resolver(cfg.delivery.dns), Courier(cfg.delivery))
    server = await control.serve(scheduler, spool)
    wake = await control.listen_wake(scheduler, spool)
    running = asyncio.ensure_future(scheduler.run())
    _report_ready("scheduler", queued=len(scheduler.index))
    signalled = asyncio.ensure_future(_until_signalled())
    await asyncio.wait([running, signalled], return_when=asyncio.FIRST_COMPLETED)
    server.close()
    wake.close()
    if running.done():  # the dispatch loop died: exit non-zero so the supervisor restarts us
        logs.event("error", level="error", stage="scheduler", error=repr(running.exception()))
        return 1
    cut = await scheduler.stop(GRACE)
    await running
    logs.event("stopped", cancelled=cut)
    return 0


def _die_with_parent() -> None:
    """Linux PR_SET_PDEATHSIG: SIGTERM (a graceful stop) when the supervisor dies, even by
    kill -9, so no worker outlives it and holds the port or the spool."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(os.environ.get(SUPERVISOR_PID, os.getppid())):
        os.kill(os.getpid(), signal.SIGTERM)  # the supervisor died before prctl took effect


def _report_ready(role: str, **fields: Any) -> None:
    logs.event("ready", **fields)
    fd = os.environ.get(READY_FD)
    if fd:
        os.write(int(fd), f"{role}\n".encode())


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
