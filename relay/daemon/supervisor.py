"""Daemon, the supervisor: the composition root, which recovers the spool, keeps the intake,
scheduler and API processes running, restarts one that dies, serves the HTTP endpoint and
reports readiness to systemd."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from relay import config
from relay.api import tokens
from relay.daemon.systemd import feed_watchdog, notify_reloading, notify_systemd
from relay.daemon.workers import ROLES, STATUS_FD, SUPERVISOR_PID, worker
from relay.intake import dkim, tls, users
from relay.observe import logs, metrics
from relay.spool import maildrop, reserve
from relay.spool.layout import DEAD
from relay.spool.run import DAEMON_LOCK, spool_lock
from relay.spool.store import Spool

# What `relay serve`, `relay worker` and `relay check-config` call (ROLES and worker live in
# relay.daemon.workers).
__all__ = ["ROLES", "StartupError", "preflight", "serve", "worker"]

START_TIMEOUT = 30.0
STALE = 10.0  # a worker silent this long is not ready (and systemd's watchdog is not fed)
RESTART_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)


class StartupError(Exception):
    """The daemon cannot start; str() is the one line for the operator."""


def serve(config_file: str | None, cfg: config.Config) -> int:
    """`relay serve`: recover the spool, then supervise the workers until SIGTERM/SIGINT."""
    logs.configure("supervisor")
    spool = Spool(cfg.spool.path)
    try:
        spool.prepare()
    except OSError as exc:
        raise StartupError(f"cannot create spool {cfg.spool.path}: {exc.strerror}") from None
    for warning in preflight(config_file, cfg):
        logs.event("insecure_permissions", level="warning", problem=warning)
    with spool_lock(spool, DAEMON_LOCK, wait=10.0) as held:
        if not held:
            raise StartupError(f"another relay is running on spool {cfg.spool.path}")
        logs.event("recovered", spool=str(spool.root), **spool.recover())
        return asyncio.run(Supervisor(config_file, cfg, spool).run())


def preflight(config_file: str | None, cfg: config.Config) -> list[str]:
    """Load what the workers will load (certificate, users, tokens, DKIM keys), so that a bad
    file stops the start with one line (ConfigError); returns warnings about secrets others
    can read."""
    tls.tls_context(cfg)
    dkim.signer(cfg.dkim)
    users_file, tokens_file = cfg.smtp.auth.users_file, cfg.api.tokens_file
    try:
        if users_file is not None:
            users.load(users_file)
        if tokens_file is not None:
            tokens.load(tokens_file)
    except users.UsersError as exc:
        raise config.ConfigError(f"smtp.auth.users_file: {exc}") from None
    except tokens.TokensError as exc:
        raise config.ConfigError(f"api.tokens_file: {exc}") from None
    secrets_ = [p for p in (users_file, tokens_file, cfg.smtp.tls.key) if p is not None]
    secrets_ += [key.key_file for key in cfg.dkim.keys]
    secrets_ += [hook.secret_file for hook in cfg.webhooks]
    warnings = [problem for path in secrets_ if (problem := exposed(path, 0o007, "o-rwx"))]
    if config_file:  # like Postfix's main.cf: readable is fine, writable by others is not
        warnings += [p for p in [exposed(Path(config_file), 0o022, "go-w")] if p]
    return warnings + [p for p in [maildrop_mode(cfg.sendmail.maildrop)] if p]


def maildrop_mode(directory: Path) -> str | None:
    """A warning unless the maildrop is mode 3733: others may add files, never list or read
    them; the setgid bit gives each file the relay's group (docs/sendmail.md)."""
    try:
        mode = directory.stat().st_mode & 0o7777
    except FileNotFoundError:
        return None  # the intake makes it, mode 3733
    except OSError as exc:
        return f"sendmail.maildrop {directory}: {exc.strerror}"
    if mode != maildrop.MODE:
        return (f"sendmail.maildrop {directory} is mode {mode:04o}, expected "
                f"{maildrop.MODE:04o} (chmod {maildrop.MODE:04o} {directory})")  # fmt: skip
    return None


def exposed(path: Path, forbidden: int, fix: str) -> str | None:
    """A warning if path's mode has any of the forbidden permission bits."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if mode & forbidden:
        return f"{path} is open to other users (mode {mode & 0o777:o}); chmod {fix}"
    return None


class Supervisor:
    """Starts the workers, reports readiness (HTTP, systemd), restarts a worker that dies,
    reloads on SIGHUP and drains on SIGTERM."""

    def __init__(self, config_file: str | None, cfg: config.Config, spool: Spool) -> None:
        self.config_file = config_file
        self.cfg = cfg
        self.spool = spool
        self.metrics_dir = spool.run_path("metrics")
        self.signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
        # The workers this daemon runs: the webhook sender's only while webhooks are configured
        # (restart-only). The API worker always runs: it keeps the history and the automatic
        # suppressions and prunes the journal, and serves HTTP while api.listen is set.
        wanted = {"hooks": bool(cfg.webhooks)}
        self.roles = tuple(r for r in ROLES if wanted.get(r, True))
        self.children: dict[str, asyncio.subprocess.Process] = {}
        self.ready: set[str] = set()
        self.seen: dict[str, float] = {}
        self.buffer = b""

    async def run(self) -> int:
        # Imported here: aiohttp stays out of the intake and scheduler (16 MiB each).
        from relay.observe.endpoint import Endpoint

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self.signals.put_nowait, sig)
        metrics.reset_directory(self.metrics_dir)
        registry = metrics.registry(
            self.metrics_dir,
            lambda: self.spool.count(DEAD),
            lambda: reserve.room(self.spool.space(), self.cfg.spool.min_free),
        )
        endpoint = Endpoint(registry, self.not_ready)
        try:
            await endpoint.start(*self.cfg.metrics.listen)
        except OSError as exc:
            logs.failure("supervisor", exc, action="listen", listen=self.cfg.metrics.listen)
            return 1
        read_fd, self.write_fd = os.pipe()
        loop.add_reader(read_fd, self._on_status, read_fd)
        for role in self.roles:
            await self._spawn(role)
        if not await self._await_ready():
            await self._terminate(grace=0.0)
            await endpoint.stop()
            return 1
        logs.event(
            "ready",
            pid=os.getpid(),
            metrics=f"{self.cfg.metrics.listen[0]}:{self.cfg.metrics.listen[1]}",
            api=f"{api[0]}:{api[1]}" if (api := self.cfg.api.listen) else None,
        )
        notify_systemd("READY=1", f"STATUS=relaying, pid {os.getpid()}")
        watchdog = asyncio.ensure_future(feed_watchdog(self.problems))
        await self._supervise()
        watchdog.cancel()
        await endpoint.stop()
        logs.event("stopped")
        return 0

    # --- worker status: ready and alive lines on a pipe --------------------------------------

    def _on_status(self, fd: int) -> None:
        self.buffer += os.read(fd, 4096)
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            role, _, word = line.decode().partition(" ")
            self.seen[role] = time.monotonic()
            if word == "ready":
                self.ready.add(role)

    def problems(self) -> list[str]:
        """Why the relay is not ready (for /readyz and the watchdog); empty when it is."""
        out = []
        now = time.monotonic()
        for role in self.roles:
            if role not in self.ready:
                out.append(f"{role}: not started")
            elif now - self.seen.get(role, 0.0) > STALE:
                out.append(f"{role}: no heartbeat for {now - self.seen[role]:.0f}s")
        try:
            self.spool.check_writable()
        except OSError as exc:
            out.append(f"spool: not writable: {exc.strerror}")
        return out

    def not_ready(self) -> list[str]:
        """/readyz: problems(), and a spool below its reserve, where new mail is refused while
        delivery goes on (so the watchdog is still fed)."""
        out = self.problems()
        with contextlib.suppress(OSError):  # a spool that is gone: problems() says so
            if shortage := reserve.shortage(self.spool.space(), self.cfg.spool.min_free):
                out.append(shortage)
        return out

    # --- worker processes --------------------------------------------------------------------

    async def _spawn(self, role: str) -> None:
        config_args = ["--config", self.config_file] if self.config_file else []
        env = {
            **os.environ,
            STATUS_FD: str(self.write_fd),
            SUPERVISOR_PID: str(os.getpid()),
            metrics.MULTIPROC_ENV: str(self.metrics_dir),
        }
        self.ready.discard(role)
        self.children[role] = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "worker", role, *config_args,
            pass_fds=(self.write_fd,), env=env,
        )  # fmt: skip
        logs.event("started", role=role, pid=self.children[role].pid)

    async def _await_ready(self) -> bool:
        """Every worker must report ready before any of them exits or START_TIMEOUT passes."""
        deadline = time.monotonic() + START_TIMEOUT
        while self.ready != set(self.roles):
            exited = [r for r, p in self.children.items() if p.returncode is not None]
            if exited or time.monotonic() > deadline or not self.signals.empty():
                failed = exited or sorted(set(self.roles) - self.ready)
                logs.event("error", level="error", failed=failed, error="worker did not start")
                return False
            await asyncio.sleep(0.02)
        return True

    async def _supervise(self) -> None:
        """Until SIGTERM: restart exited workers with backoff, reload on SIGHUP."""
        restarts = dict.fromkeys(self.roles, 0)
        while True:
            waits = {asyncio.ensure_future(p.wait()): role for role, p in self.children.items()}
            sig = asyncio.ensure_future(self.signals.get())
            done, _ = await asyncio.wait([sig, *waits], return_when=asyncio.FIRST_COMPLETED)
            for task in waits:
                task.cancel()
            if sig in done and sig.result() == signal.SIGHUP:
                self._reload()
            elif sig in done:
                await self._terminate(self.cfg.lifecycle.grace)
                return
            sig.cancel()
            for task in done & waits.keys():
                role = waits[task]
                await self._restart(role, task.result(), restarts)

    async def _restart(self, role: str, code: int, restarts: dict[str, int]) -> None:
        logs.event("child_exited", level="error", role=role, code=code)
        metrics.forget_process(self.metrics_dir, self.children[role].pid)
        delay = RESTART_BACKOFF[min(restarts[role], len(RESTART_BACKOFF) - 1)]
        restarts[role] += 1
        logs.event("child_restarting", role=role, after=delay)
        await asyncio.sleep(delay)
        await self._spawn(role)

    def _reload(self) -> None:
        """SIGHUP: validate the file, then let each worker apply it; restart-only keys are
        named (they keep their running values)."""
        notify_reloading()
        try:
            new = config.load(self.config_file)
        except config.ConfigError as exc:
            logs.event("reload_failed", level="error", error=str(exc))
            notify_systemd("READY=1")
            return
        logs.event("reloaded", restart_needed_for=config.restart_only_changes(self.cfg, new))
        self.cfg = new
        for proc in self.children.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGHUP)
        notify_systemd("READY=1")

    async def _terminate(self, grace: float) -> None:
        """SIGTERM every worker; a second SIGTERM here is passed on (workers then cut at once);
        SIGKILL what is still running a little after the grace period."""
        logs.event("stopping", grace=grace)
        notify_systemd("STOPPING=1")
        live = [p for p in self.children.values() if p.returncode is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        exits = asyncio.ensure_future(asyncio.gather(*(p.wait() for p in live)))
        deadline = time.monotonic() + grace + 5.0
        while not exits.done() and time.monotonic() < deadline:
            sig = asyncio.ensure_future(self.signals.get())
            waiting: list[asyncio.Future[Any]] = [exits, sig]
            await asyncio.wait(
                waiting, timeout=deadline - time.monotonic(), return_when=asyncio.FIRST_COMPLETED
            )
            if sig.done() and sig.result() != signal.SIGHUP:
                for proc in live:
                    with contextlib.suppress(ProcessLookupError):
                        proc.terminate()
            sig.cancel()
        if not exits.done():
            for proc in live:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        await exits
