"""Spool, the layout: the spool's directories and the path of every file in them, the one
place that knows their names."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

from relay.spool.reserve import Space

QUEUE = "queue"
DEAD = "dead"
MSG = "msg"
TMP = "tmp"
CORRUPT = "corrupt"
RUN = "run"
EVENTS = "events"  # the event journal (relay.spool.journal, docs/events.md)
HISTORY = "history"  # the message history (relay.history, docs/events.md)
HOOKS = "hooks"  # each webhook endpoint's outbox (relay.hooks, docs/webhooks.md)
STATE_SUFFIX = ".json"


class Layout:
    """A spool directory's tree (docs/spool.md): where each file is, and what is in a directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._run_fd: int | None = None
        self._space: tuple[float, Space] | None = None  # the last reading, by monotonic time

    def prepare(self) -> None:
        """Create the directory tree (0700) if it does not exist yet."""
        for name in (QUEUE, DEAD, MSG, TMP, CORRUPT, RUN, EVENTS, HISTORY, HOOKS):
            (self.root / name).mkdir(mode=0o700, parents=True, exist_ok=True)

    def content_path(self, msg_id: str) -> Path:
        return self.root / MSG / msg_id

    def state_path(self, msg_id: str, where: str = QUEUE) -> Path:
        return Path(self._state_file(msg_id, where))

    def _state_file(self, msg_id: str, where: str) -> str:
        """state_path() as a plain string: pathlib's joins cost a fifth of indexing a large
        queue, so load() uses this."""
        return f"{self.root}/{where}/{msg_id}{STATE_SUFFIX}"

    @property
    def events_dir(self) -> Path:
        """The event journal's files (relay.spool.journal)."""
        return self.root / EVENTS

    @property
    def history_path(self) -> Path:
        """The message history's SQLite file (relay.history)."""
        return self.root / HISTORY / "history.sqlite"

    @property
    def hooks_dir(self) -> Path:
        """The webhook endpoints' outboxes (relay.hooks)."""
        return self.root / HOOKS

    def run_path(self, name: str) -> Path:
        return self.root / RUN / name

    def socket_address(self, name: str) -> str:
        """A path for a UNIX socket in run/ that fits sun_path (108 bytes) however deep the
        spool is, through this process's descriptor of the run/ directory when needed."""
        full = str(self.run_path(name))
        if len(full) < 100:
            return full
        if self._run_fd is None:
            self._run_fd = os.open(self.root / RUN, os.O_RDONLY | os.O_DIRECTORY)
        return f"/proc/self/fd/{self._run_fd}/{name}"

    def space(self, max_age: float = 0.0) -> Space:
        """The file system's free and total bytes and inodes; a reading younger than max_age
        seconds is reused (one statvfs a second is enough to see a disk fill, and MAIL FROM
        asks at every transaction). OSError if the spool is gone."""
        now = time.monotonic()
        if self._space is not None and now - self._space[0] < max_age:
            return self._space[1]
        st = os.statvfs(self.root)
        space = Space(st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize, st.f_favail, st.f_files)
        self._space = (now, space)
        return space

    def check_writable(self) -> None:
        """Create and remove a file in tmp/ (readyz.<random>); OSError when that fails."""
        probe = self.root / TMP / f"readyz.{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()

    def ids(self, where: str = QUEUE) -> list[str]:
        """Ids with a state file in `where`, oldest first."""
        return sorted(self._ids(where))

    def count(self, where: str = QUEUE) -> int:
        """How many state files `where` holds."""
        return sum(1 for _ in self._ids(where))

    def _ids(self, where: str) -> Iterator[str]:
        names = os.listdir(self.root / where)
        return (n[: -len(STATE_SUFFIX)] for n in names if n.endswith(STATE_SUFFIX))
