"""Daemon, systemd: sd_notify(3) without libsystemd (ready, reloading, stopping, status) and
the watchdog, fed only while the relay is healthy."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable


def notify_systemd(*states: str) -> None:
    """sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET, if systemd set it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
        sock.sendto("\n".join(states).encode(), address)


def notify_reloading() -> None:
    """RELOADING=1: a reload starts now; READY=1 says when it is over."""
    notify_systemd(
        "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
    )


async def feed_watchdog(problems: Callable[[], list[str]]) -> None:
    """systemd's WatchdogSec: ping only while problems() is empty (every worker is alive)."""
    usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    if not usec:
        return
    while True:
        await asyncio.sleep(usec / 2e6)
        if not await asyncio.to_thread(problems):
            notify_systemd("WATCHDOG=1")
