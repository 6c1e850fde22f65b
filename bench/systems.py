"""The systems `make bench` compares, and their sink: the relay daemon, a private Postfix in the
configuration the bench used before issue 12 ("postfix-old") or tuned as an operator tunes a pure
relay to one next hop ("postfix"), and Postfix's smtp-sink on loopback."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay.config.webhooks import new_secret  # noqa: E402
from tests.support.daemon import Relay, free_port  # noqa: E402
from tests.support.webhooks import Receiver  # noqa: E402

SINK_IP = "127.0.0.3"
COUNT_RE = re.compile(rb"mesg=(\d+)")
MAX_MESSAGE_SIZE = 26_214_400  # the relay's smtp.max_message_size default


class System(Protocol):
    """What the measurements need of a system under test."""

    port: int  # SMTP on 127.0.0.1

    def pids(self) -> list[int]: ...

    def close(self) -> None: ...


class Sink:
    """smtp-sink on SINK_IP:port, its running message counter read from its output."""

    def __init__(self) -> None:
        self.port = free_port(SINK_IP)
        self.count = 0
        self.proc = subprocess.Popen(
            ["smtp-sink", "-u", "postfix", "-c", f"{SINK_IP}:{self.port}", "1024"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()
        wait_port(SINK_IP, self.port)

    def _read(self) -> None:
        stdout = self.proc.stdout
        assert isinstance(stdout, io.BufferedReader)
        while chunk := stdout.read1(65536):
            found = COUNT_RE.findall(chunk)
            if found:
                self.count = int(found[-1])

    def wait_for(self, count: int, deadline: float) -> bool:
        while self.count < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)


@dataclass(frozen=True)
class Setting:
    """One step from the old bench Postfix towards the tuned one: main.cf lines, or turning
    chroot off in master.cf (bench/results/postfix-tuning.md: why, and what each measured)."""

    main: tuple[str, ...] = ()
    chroot_off: bool = False

    def lines(self) -> list[str]:
        """What it sets, as an operator would write it down."""
        return [*self.main, *(["master.cf: chroot n for every service"] * self.chroot_off)]


# The tuned Postfix is the old one plus all of these; `postfix-without-<name>` leaves one out.
TUNING: dict[str, Setting] = {
    # The private queue directory holds none of the files (etc/, lib/) a chrooted daemon
    # needs; Postfix's own master.cf ships with chroot off (Debian's turns it on).
    "no_chroot": Setting(chroot_off=True),
    # No reverse and forward DNS lookup of each client: relay access is by IP (mynetworks).
    "no_peername_lookup": Setting(("smtpd_peername_lookup = no",)),
    # smtpd pauses up to 1 s per message when arrivals outrun deliveries; the relay has no
    # such brake, and the next hop here is never the bottleneck.
    "no_in_flow_delay": Setting(("in_flow_delay = 0",)),
    # One known next hop: start at its full limit (the relay's 20 connections per
    # destination) instead of 5 and slow start.
    "full_concurrency": Setting(
        ("initial_destination_concurrency = 20", "smtp_destination_concurrency_limit = 20")
    ),
    # Reuse connections to the next hop always, as the relay does (delivery.reuse), not only
    # while a backlog builds up.
    "connection_cache": Setting((f"smtp_connection_cache_destinations = {SINK_IP}",)),
    # Leave the headers of loopback clients alone, as the relay does (no address rewriting).
    "no_header_rewrite": Setting(("local_header_rewrite_clients =",)),
    # No local delivery: no alias or passwd tables for smtpd to open (each new smtpd logged an
    # error for the missing aliases.db and a NIS warning), no biff; the relay's size limit.
    "no_local_tables": Setting(
        (
            "alias_maps =",
            "alias_database =",
            "local_recipient_maps =",
            "biff = no",
            f"message_size_limit = {MAX_MESSAGE_SIZE}",
        )
    ),
}
# Measured on top of the tuned Postfix and left out (`postfix-with-<name>`).
CANDIDATES: dict[str, Setting] = {
    # Nothing to look up with an IP-literal relayhost; postconf(5) discourages it.
    "dns_disabled": Setting(("smtp_dns_support_level = disabled",)),
    # More parallel deliveries to the sink than the relay's 20.
    "concurrency_50": Setting(
        ("initial_destination_concurrency = 50", "smtp_destination_concurrency_limit = 50")
    ),
}


def postfix_settings(name: str) -> tuple[Setting, ...]:
    """The settings of a Postfix system name: `postfix-old` none, `postfix` all of TUNING,
    `postfix-without-<n>[+<m>…]` all but those, `postfix-with-<n>` all plus one of CANDIDATES."""
    if name == "postfix-old":
        return ()
    if name == "postfix":
        return tuple(TUNING.values())
    kind, _, setting = name.removeprefix("postfix-").partition("-")
    left_out = set(setting.split("+"))
    if kind == "without" and left_out <= TUNING.keys():
        return tuple(value for key, value in TUNING.items() if key not in left_out)
    if kind == "with" and setting in CANDIDATES:
        return (*TUNING.values(), CANDIDATES[setting])
    raise ValueError(f"unknown system {name!r}")


class Postfix:
    """A private Postfix instance (own config and queue directories) relaying everything on
    127.0.0.1:port to the sink, with its default durability (queue files fsync'd before 250)."""

    def __init__(self, root: Path, sink_port: int, settings: tuple[Setting, ...]) -> None:
        self.port = free_port()
        self.etc, self.spool = root / "etc", root / "spool"
        for directory in (self.etc, self.spool, root / "data"):
            directory.mkdir(parents=True)
        shutil.chown(root / "data", "postfix")
        master = Path("/usr/share/postfix/master.cf.dist").read_text()
        master = re.sub(r"^smtp\s+inet\s.*$", f"127.0.0.1:{self.port} inet n - y - - smtpd",
                        master, count=1, flags=re.M)  # fmt: skip
        if any(setting.chroot_off for setting in settings):
            master = unchrooted(master)
        (self.etc / "master.cf").write_text(master)
        main = [*base_main(root, sink_port), *(line for s in settings for line in s.main)]
        (self.etc / "main.cf").write_text("\n".join([*main, ""]))
        self.env = dict(os.environ)
        # Creates the queue tree; its first run on a new queue exits 1 over mere warnings.
        subprocess.run(["postfix", "-c", str(self.etc), "check"], env=self.env, check=False,
                       capture_output=True)  # fmt: skip
        subprocess.run(["postfix", "-c", str(self.etc), "start"], env=self.env, check=True,
                       capture_output=True)  # fmt: skip
        wait_port("127.0.0.1", self.port)

    def pids(self) -> list[int]:
        master = int((self.spool / "pid" / "master.pid").read_text().split()[0])
        return [master, *descendants(master)]

    def close(self) -> None:
        subprocess.run(["postfix", "-c", str(self.etc), "stop"], env=self.env,
                       capture_output=True, check=False)  # fmt: skip


def base_main(root: Path, sink_port: int) -> list[str]:
    """main.cf of the old bench Postfix, which every tuned variant starts from."""
    return [
        "compatibility_level = 3.6",
        f"queue_directory = {root / 'spool'}",
        f"data_directory = {root / 'data'}",
        "mail_owner = postfix",
        "setgid_group = postdrop",
        "inet_interfaces = 127.0.0.1",
        "inet_protocols = ipv4",
        "myhostname = postfix.bench.test",
        "mydestination =",
        "mynetworks = 127.0.0.0/8",
        f"relayhost = [{SINK_IP}]:{sink_port}",
        "smtpd_relay_restrictions = permit_mynetworks, reject",
        "smtp_tls_security_level = none",
        "default_process_limit = 200",
        f"maillog_file_prefixes = {root}",
        f"maillog_file = {root / 'maillog'}",
    ]


# A master.cf service line up to its fifth column, chroot (continuation lines start with white
# space and comments with #, so neither matches).
SERVICE_RE = re.compile(r"^([^\s#]\S*(?:[ \t]+\S+){3}[ \t]+)\S+", re.M)


def unchrooted(master: str) -> str:
    """master.cf with every service's chroot column set to n."""
    return SERVICE_RE.sub(r"\1n", master)


class RelayUnderTest:
    """The relay daemon with a catch-all route to the sink (as Postfix's relayhost), and its
    HTTP API on as the embedded defaults have it (a revision without an API has none), so the
    history the API worker keeps is in the figures (its CPU too: pids() counts every worker)."""

    def __init__(
        self, root: Path, sink_port: int, source: Path | None = None, hook_delay: float = -1.0
    ) -> None:
        route = {"host": SINK_IP, "port": sink_port, "tls": "none"}
        settings: dict[str, object] = {"routes": [{"domains": ["*"], "via": [route]}]}
        if ((source or ROOT) / "relay" / "api").is_dir():
            settings["api"] = {"listen": f"127.0.0.1:{free_port()}"}
        self.receiver: Receiver | None = None
        if hook_delay >= 0:  # every event to a receiver answering after hook_delay seconds
            settings["webhooks"] = [self.webhook(root, hook_delay)]
        self.relay = Relay(root, settings, source)
        self.relay.start()
        self.port = self.relay.port

    def pids(self) -> list[int]:
        assert self.relay.proc is not None
        return [self.relay.proc.pid, *descendants(self.relay.proc.pid)]

    def webhook(self, root: Path, delay: float) -> dict[str, object]:
        secret = new_secret()
        (root / "hook.secret").write_text(secret + "\n")
        (root / "hook.secret").chmod(0o600)
        self.receiver = Receiver(secret, delay=delay)
        return {"name": "bench", "url": self.receiver.url, "secret_file": str(root / "hook.secret")}

    def close(self) -> None:
        self.relay.stop()
        self.relay.close()
        if self.receiver is not None:
            self.receiver.close()


def build(name: str, root: Path, sink_port: int) -> System:
    """The system called `name`: "relay", "relay@DIR" (the relay package in DIR, an earlier
    revision: bench/versions.py) or a Postfix name (see postfix_settings)."""
    if name == "relay":
        return RelayUnderTest(root, sink_port)
    if name.startswith("relay+hook"):  # relay+hook (answers at once), relay+hook@0.5 (slowly)
        delay = float(name.partition("@")[2] or 0)
        return RelayUnderTest(root, sink_port, hook_delay=delay)
    if name.startswith("relay@"):
        return RelayUnderTest(root, sink_port, Path(name.removeprefix("relay@")))
    return Postfix(root, sink_port, postfix_settings(name))


@contextmanager
def instance(name: str) -> Iterator[tuple[System, Sink]]:
    """A fresh sink and a fresh system under test relaying to it, both stopped afterwards."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{name.partition('@')[0]}-") as tmp:
        os.chmod(tmp, 0o755)  # Postfix's unprivileged processes must reach their queue
        sink = Sink()
        system: System | None = None
        try:
            system = build(name, Path(tmp), sink.port)
            yield system, sink
        finally:
            if system is not None:
                system.close()
            sink.close()


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True, check=False).stdout.split()  # fmt: skip
    children = [int(p) for p in out]
    return children + [g for c in children for g in descendants(c)]


def wait_port(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with smtplib.SMTP(host, port, timeout=2) as client:
                client.noop()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing answers SMTP on {host}:{port}")
