"""Spool, run/: the daemon's lock files and UNIX sockets, named here and nowhere else."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import Awaitable, Callable, Iterator

from relay.spool.layout import Layout

CONTROL_SOCKET = "control.sock"  # the CLI's queue actions reach the live scheduler
WAKE_SOCKET = "wake.sock"  # the intake tells the scheduler of new mail
SUBMIT_SOCKET = "submit.sock"  # the API worker hands HTTP submissions to the intake
DAEMON_LOCK = "daemon.lock"
SCHEDULER_LOCK = "scheduler.lock"
QUOTA_LEDGER = "quota.json"  # the intake's sending-quota counts
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.contextmanager
def spool_lock(spool: Layout, name: str, wait: float) -> Iterator[bool]:
    """Hold run/<name>; yields False (holding nothing) if it stayed busy for `wait` seconds.

    daemon.lock: the supervisor for its lifetime, or an offline CLI for one command.
    scheduler.lock: the scheduler process, so that a scheduler orphaned by a killed supervisor
    finishes before its successor starts delivering.
    """
    fd = os.open(spool.run_path(name), os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.05)
        yield True
    finally:
        os.close(fd)


async def listen(spool: Layout, name: str, handle: Handler) -> asyncio.AbstractServer:
    """A UNIX stream server on run/<name>, replacing a socket left by a previous run."""
    address = spool.socket_address(name)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(address)
    return await asyncio.start_unix_server(handle, address)
