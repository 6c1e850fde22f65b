"""Benchmark: the intake's memory while many sessions are in DATA at once. Starts the real
daemon with a catch-all route to a hashing sink on loopback; N clients each send one message of
M bytes, all of it but the end-of-data line, wait until every session has got that far and the
intake has read every byte sent, then end their messages together. The intake's, scheduler's
and supervisor's RSS are sampled every 50 ms (and their kernel high-water marks read), every
message must reach the sink intact, and the results go to bench/results/data-memory-<label>.json
and .md (every loop bounded in count and time; loopback only)."""

from __future__ import annotations

import argparse
import asyncio
import binascii
import hashlib
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compare import sampling  # noqa: E402
from idle_connections import raise_fd_limit  # noqa: E402

from tests.support.daemon import Relay, free_port  # noqa: E402

SINK_IP = "127.0.0.3"
SENDER, RCPT = "bench@source.test", "user@sink.test"
MIB = 1 << 20
DEFAULT_MAX_MESSAGE = 26_214_400  # smtp.max_message_size's default
UNITS = {"": 1, "K": 10**3, "M": 10**6, "Ki": 1 << 10, "Mi": MIB}
# Each body line is 57 random octets in base64 and CRLF: 78 octets, the 76-character lines
# of RFC 2045 §6.8, so no line starts with a dot (nothing to dot-stuff, RFC 5321 §4.5.2).
RAW_LINE, LINE = 57, 78
POOL_LINES = 1 << 16  # 5 MB of distinct lines that every body is cut from
CHUNK = 840 * LINE  # bytes a client writes at a time
DATA_END = b"\r\n.\r\n"
READ = 1 << 18
SAMPLE_EVERY = 0.05  # seconds between RSS samples
MAX_COMMANDS = 10_000  # per sink connection
ROLES = ("intake", "scheduler", "supervisor")
MESSAGE_ID_RE = re.compile(rb"^Message-ID:\s*(<[^>\r\n]+>)", re.I | re.M)


# --- messages ----------------------------------------------------------------------------------


def pool(seed: int = 12) -> memoryview:
    """The body text every message is cut from, twice over, so that any run of lines up to the
    pool's length is one slice."""
    raw = random.Random(seed).randbytes(RAW_LINE * POOL_LINES)
    lines = b"".join(
        binascii.b2a_base64(raw[at : at + RAW_LINE], newline=False) + b"\r\n"
        for at in range(0, len(raw), RAW_LINE)
    )
    return memoryview(lines + lines)


@dataclass(frozen=True)
class Outgoing:
    """One client's message: its header block and a run of the pool's lines as its body."""

    message_id: str
    header: bytes
    start: int  # offset of the body's first line in the pool
    body_size: int

    @property
    def size(self) -> int:
        return len(self.header) + self.body_size

    def body(self, text: memoryview) -> Iterator[memoryview]:
        period = len(text) // 2
        for sent in range(0, self.body_size, CHUNK):
            at = (self.start + sent) % period
            yield text[at : at + min(CHUNK, self.body_size - sent)]


def outgoing(case: str, number: int, size: int) -> Outgoing:
    """Message `number` of a case: at most `size` octets, header block included."""
    message_id = f"<{case}.{number}@source.test>"
    header = (
        f"From: Bench <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: data memory {case} {number}\r\n"
        f"Date: {format_datetime(datetime.now(UTC))}\r\nMessage-ID: {message_id}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    lines = max(1, (size - len(header)) // LINE)
    start = (number * 7919) % POOL_LINES * LINE  # a prime stride: each body starts elsewhere
    return Outgoing(message_id, header, start, lines * LINE)


def sizes(text: str) -> list[int]:
    """5M (10^6 octets, as "5 MB"), 5Mi (2^20), 500K, 500Ki or plain octets, comma-separated."""
    matches = [re.fullmatch(r"([1-9]\d*)(Ki|Mi|K|M|)", item.strip()) for item in text.split(",")]
    if not all(matches):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of sizes like 5M,25Mi,1048576")
    return [int(m[1]) * UNITS[m[2]] for m in matches if m]


def counts(text: str) -> list[int]:
    """Session counts, comma-separated, each 1 to 5000."""
    items = [item.strip() for item in text.split(",")]
    if not all(item.isdigit() and 0 < int(item) <= 5000 for item in items):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of counts from 1 to 5000")
    return [int(item) for item in items]


# --- the sink ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivered:
    message_id: str
    digest: str  # SHA-256 of the body (after the header block), as delivered
    size: int  # octets of the body


class _Stream:
    """A connection's bytes, buffered by this object alone so that no message is kept."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.buf = b""

    async def _fill(self) -> None:
        chunk = await self.reader.read(READ)
        if not chunk:
            raise EOFError
        self.buf += chunk

    async def until(self, mark: bytes, limit: int) -> bytes:
        """Everything up to and with `mark`; ValueError past `limit` octets without it."""
        while (at := self.buf.find(mark)) < 0:
            if len(self.buf) > limit:
                raise ValueError(f"no {mark!r} within {limit} octets")
            await self._fill()
        out, self.buf = self.buf[: at + len(mark)], self.buf[at + len(mark) :]
        return out

    async def body(self, digest: Any, limit: int) -> int:
        """Hash the mail data up to the end-of-data line (dropped) as it streams past; the
        last octets stay buffered, since the end mark may straddle two reads."""
        size = 0
        while (at := self.buf.find(DATA_END)) < 0:
            part = self.buf[: -(len(DATA_END) - 1)]
            digest.update(part)
            size += len(part)
            self.buf = self.buf[len(part) :]
            if size > limit:
                raise ValueError(f"message over {limit} octets")
            await self._fill()
        digest.update(self.buf[: at + 2])
        self.buf = self.buf[at + len(DATA_END) :]
        return size + at + 2


SINK_REPLIES = {
    b"EHLO": b"250-sink.bench.test\r\n250 8BITMIME",
    b"HELO": b"250 sink.bench.test",
    **dict.fromkeys((b"MAIL", b"RCPT", b"RSET", b"NOOP", b"DATA"), b"250 2.0.0 Ok"),
}


class HashingSink:
    """An SMTP server on SINK_IP, in its own thread and event loop, that keeps no message: it
    reads each one's header block, hashes the body as it arrives and records the pair."""

    def __init__(self, limit: int) -> None:
        self.port = free_port(SINK_IP)
        self.limit = limit
        self.delivered: list[Delivered] = []
        self.errors: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.stopped = asyncio.Event()
        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(self._serve(),), daemon=True
        )
        self.listening = threading.Event()
        self.thread.start()
        if not self.listening.wait(10):
            raise RuntimeError(f"the sink did not listen on {SINK_IP}:{self.port}")

    async def _serve(self) -> None:
        server = await asyncio.start_server(self._session, SINK_IP, self.port)
        self.listening.set()
        async with server:
            await self.stopped.wait()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stopped.set)
        self.thread.join(10)
        self.loop.close()

    def wait_for(self, count: Callable[[], int], deadline: float) -> bool:
        while len(self.delivered) < count():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = _Stream(reader)
        writer.write(b"220 sink.bench.test ESMTP\r\n")
        try:
            for _ in range(MAX_COMMANDS):
                verb = (await stream.until(b"\r\n", 4096))[:4].upper()
                if verb == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    break
                if verb == b"DATA":
                    writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    self.delivered.append(await self._message(stream))
                writer.write(SINK_REPLIES.get(verb, b"502 5.5.1 Not implemented") + b"\r\n")
                await writer.drain()
        except (EOFError, ConnectionError):
            pass  # the relay closed the session
        except ValueError as exc:
            self.errors.append(str(exc))
        finally:
            writer.close()

    async def _message(self, stream: _Stream) -> Delivered:
        header = await stream.until(b"\r\n\r\n", MIB)
        found = MESSAGE_ID_RE.search(header)
        digest = hashlib.sha256()
        size = await stream.body(digest, self.limit)
        return Delivered(found[1].decode() if found else "", digest.hexdigest(), size)


# --- the clients -------------------------------------------------------------------------------


class SessionError(Exception):
    """The relay answered a command with something else than the reply expected."""


@dataclass
class Sent:
    message_id: str
    size: int
    digest: str = ""
    reply: str = ""  # the reply to the end of the data, or what went wrong before it

    @property
    def accepted(self) -> bool:
        return self.reply.startswith("250 ")


class Gate:
    """All sessions stop at the end of their data until every one has got there (or failed)
    and the bench says go."""

    def __init__(self, sessions: int) -> None:
        self.waiting = sessions
        self.all_arrived = asyncio.Event()
        self.go = asyncio.Event()

    def arrive(self) -> None:
        self.waiting -= 1
        if self.waiting <= 0:
            self.all_arrived.set()


async def reply(reader: asyncio.StreamReader, expect: str | None = None) -> str:
    """The last line of one (multi-line) reply; SessionError unless it starts with expect."""
    line = ""
    for _ in range(100):  # RFC 5321 §4.2.1: a multi-line reply is lines with "-" after the code
        line = (await reader.readline()).decode(errors="replace").rstrip("\r\n")
        if not line:
            raise SessionError("connection closed")
        if line[3:4] != "-":
            break
    if expect is not None and not line.startswith(expect):
        raise SessionError(line)
    return line


async def client(port: int, message: Outgoing, text: memoryview, gate: Gate) -> Sent:
    """One session: the envelope, the whole message but its end-of-data line, the gate, the
    end of data and its reply."""
    sent = Sent(message.message_id, message.size)
    arrived = False
    writer = None
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reply(reader, "220")
        for command, expect in (
            ("EHLO client.bench.test", "250"), (f"MAIL FROM:<{SENDER}> SIZE={message.size}", "250"),
            (f"RCPT TO:<{RCPT}>", "250"), ("DATA", "354"),
        ):  # fmt: skip
            writer.write(command.encode() + b"\r\n")
            await reply(reader, expect)
        sent.digest = await send_body(writer, message, text)
        arrived = True
        gate.arrive()
        await gate.go.wait()
        writer.write(b".\r\n")
        sent.reply = await reply(reader)
    except (OSError, SessionError, asyncio.CancelledError) as exc:
        sent.reply = f"{type(exc).__name__}: {exc}"
    finally:
        if not arrived:
            gate.arrive()
        if writer is not None:
            writer.close()
    return sent


async def send_body(writer: asyncio.StreamWriter, message: Outgoing, text: memoryview) -> str:
    """Write the header block and body a chunk at a time; the body's SHA-256."""
    writer.write(message.header)
    digest = hashlib.sha256()
    for chunk in message.body(text):
        digest.update(chunk)
        writer.write(chunk)
        await writer.drain()
    return digest.hexdigest()


# --- measuring ---------------------------------------------------------------------------------


def kib_fields(path: str) -> dict[str, int]:
    """The "Name: N kB" lines of a /proc status or meminfo file; {} once the process is gone."""
    try:
        text = Path(path).read_text()
    except OSError:
        return {}
    fields = (line.partition(":") for line in text.splitlines())
    return {name: int(value.split()[0]) for name, _, value in fields if value.endswith(" kB")}


def unread_octets(port: int) -> int:
    """Octets sent to or from `port` on 127.0.0.1 that no process has read yet: the receive
    and send queues of its TCP sockets (/proc/net/tcp)."""
    local = f"0100007F:{port:04X}"
    total = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cells = line.split()
        if local in (cells[1], cells[2]):
            tx, rx = cells[4].split(":")
            total += int(tx, 16) + int(rx, 16)
    return total


@dataclass
class Probe:
    """RSS samples of the daemon's processes, the peak of each per phase of the case; a memory
    guard that asks the clients to stop before the machine runs out."""

    pids: dict[str, int]
    min_available_kib: int
    phase: str = "idle"
    peaks: dict[str, dict[str, int]] = field(default_factory=dict)
    abort: threading.Event = field(default_factory=threading.Event)

    def rss_kib(self, role: str) -> int:
        return kib_fields(f"/proc/{self.pids[role]}/status").get("VmRSS", 0)

    def sample(self) -> None:
        for role in self.pids:
            phases = self.peaks.setdefault(role, {})
            phases[self.phase] = max(phases.get(self.phase, 0), self.rss_kib(role))
        if kib_fields("/proc/meminfo").get("MemAvailable", 1 << 40) < self.min_available_kib:
            self.abort.set()


async def settle(port: int, hold: float, limit: float) -> tuple[float, bool]:
    """Wait until the intake has read every octet the clients sent (at most `limit` s), then
    `hold` s more; the seconds it took, and whether it got there."""
    started = time.monotonic()
    read_all = unread_octets(port) == 0
    while not read_all and time.monotonic() - started < limit:
        await asyncio.sleep(0.1)
        read_all = unread_octets(port) == 0
    await asyncio.sleep(hold)
    return time.monotonic() - started, read_all


async def guard(probe: Probe, tasks: list[asyncio.Task[Sent]]) -> None:
    """Cancel the clients when the probe's memory guard trips."""
    while not probe.abort.is_set():
        await asyncio.sleep(0.1)
    for task in tasks:
        task.cancel()


@dataclass
class Load:
    """What the clients got, and how long each phase took (s)."""

    sent: list[Sent]
    seconds: dict[str, float] = field(default_factory=dict)
    read_all: bool = False  # the intake had read every octet sent while all were held
    complete: bool = False  # the sink got every message spooled or accepted


async def load(port: int, messages: list[Outgoing], probe: Probe, args: argparse.Namespace) -> Load:
    """Every client in DATA at once, held at its end of data until the intake has read all
    they sent, then all released."""
    text, gate, out = pool(), Gate(len(messages)), Load([])
    tasks = [asyncio.create_task(client(port, m, text, gate)) for m in messages]
    watchdog = asyncio.create_task(guard(probe, tasks))
    try:
        async with asyncio.timeout(args.max_seconds):
            probe.phase, mark = "sending", time.monotonic()
            await gate.all_arrived.wait()
            probe.phase, out.seconds["sending"] = "holding", time.monotonic() - mark
            out.seconds["settle"], out.read_all = await settle(port, args.hold, args.max_seconds)
            probe.phase, mark = "finishing", time.monotonic()
            gate.go.set()
            await asyncio.wait(tasks)
            out.seconds["finishing"] = time.monotonic() - mark
    except TimeoutError:
        for task in tasks:
            task.cancel()
    watchdog.cancel()
    out.sent = list(await asyncio.gather(*tasks))
    return out


# --- one case ----------------------------------------------------------------------------------


def relay_settings(sink_port: int, sessions: int, size: int, idle: str | None) -> dict[str, Any]:
    """Everything to the sink (as bench/compare.py routes it); the default size limit unless
    the case's messages are larger; sessions within the connection limit."""
    route = {"host": SINK_IP, "port": sink_port, "tls": "none"}
    smtp: dict[str, Any] = {
        "max_message_size": max(DEFAULT_MAX_MESSAGE, size),
        "limits": {"max_connections": max(1000, sessions + 100)},
    }
    if idle is not None:
        smtp["idle_timeout"] = idle
    return {"smtp": smtp, "routes": [{"domains": ["*"], "via": [route]}]}


def run_case(sessions: int, size: int, args: argparse.Namespace) -> dict[str, Any]:
    """Start a daemon and a sink, load them, wait for delivery, stop both, remove the spool."""
    case: dict[str, Any] = {"sessions": sessions, "size": size}
    need = sessions * size + (1 << 30)
    free = shutil.disk_usage(args.spool_dir).free
    if free < need:
        return {**case, "skipped": f"{free // MIB} MiB free, {need // MIB} needed"}
    started = time.monotonic()
    sink = HashingSink(2 * size)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-data-memory-", dir=args.spool_dir) as tmp:
            case |= measure(Path(tmp), sink, sessions, size, args)
    finally:
        sink.close()
    return {**case, "wall_s": round(time.monotonic() - started, 1)}


def measure(
    root: Path, sink: HashingSink, sessions: int, size: int, args: argparse.Namespace
) -> dict[str, Any]:
    settings = relay_settings(sink.port, sessions, size, args.idle_timeout)
    relay = Relay(root, settings)
    relay.start()
    try:
        probe, baseline = start_probe(relay, args.min_available)
        done = drive(relay, sink, probe, sessions, size, args)
        hwm = {role: kib_fields(f"/proc/{pid}/status").get("VmHWM", 0)
               for role, pid in probe.pids.items()}  # fmt: skip
    finally:
        relay.stop()
        relay.close()
    return {
        "smtp": settings["smtp"],
        **outcome(done.sent, sink, relay),
        **memory(probe, baseline, hwm, sessions),
        "delivery_complete": done.complete,
        "read_all_while_held": done.read_all,
        "memory_guard_tripped": probe.abort.is_set(),
        "seconds": {name: round(value, 1) for name, value in done.seconds.items()},
    }


def start_probe(relay: Relay, min_available_mib: int) -> tuple[Probe, dict[str, int]]:
    """The probe of the daemon's three processes, and their RSS (KiB) before any load."""
    assert relay.proc is not None
    pids = {role: relay.worker_pid(role) for role in ROLES[:2]}
    probe = Probe({**pids, "supervisor": relay.proc.pid}, min_available_mib * 1024)
    time.sleep(1.0)  # the daemon has only just said it is ready
    baseline = {role: probe.rss_kib(role) for role in ROLES}
    for pid in probe.pids.values():
        # The peak from now on, not start-up's (proc(5): 5 resets the peak RSS, VmHWM).
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    return probe, baseline


def drive(
    relay: Relay,
    sink: HashingSink,
    probe: Probe,
    sessions: int,
    size: int,
    args: argparse.Namespace,
) -> Load:
    """The load, sampled, then the wait until the sink has every message the daemon spooled
    (its `received` lines) or the client saw accepted."""
    label = f"{sessions}x{size}"
    messages = [outgoing(label, number, size) for number in range(sessions)]
    deadline = time.monotonic() + args.max_seconds
    with sampling(probe.sample, SAMPLE_EVERY):
        done = asyncio.run(load(relay.port, messages, probe, args))
        probe.phase, mark = "delivering", time.monotonic()
        accepted = sum(s.accepted for s in done.sent)
        done.complete = sink.wait_for(
            lambda: max(accepted, len(relay.events("received"))), deadline
        )
        done.seconds["delivering"] = time.monotonic() - mark
    return done


def outcome(sent: list[Sent], sink: HashingSink, relay: Relay) -> dict[str, Any]:
    """What the clients were told, what the daemon spooled, and whether each message reached
    the sink with the body it was sent with."""
    digests = {s.message_id: s.digest for s in sent}
    intact = [d.message_id for d in sink.delivered if digests.get(d.message_id) == d.digest]
    accepted = [s.message_id for s in sent if s.accepted]
    return {
        "message_octets": sent[0].size if sent else 0,
        "accepted": len(accepted),
        "refused": sorted({s.reply for s in sent if not s.accepted})[:5],
        "spooled": len(relay.events("received")),
        "delivered": len(sink.delivered),
        "intact": len(intact),
        "accepted_not_delivered_intact": len(set(accepted) - set(intact)),
        "sink_errors": sink.errors[:5],
        "daemon_errors": [str(e.get("error")) for e in relay.events("error")][:5],
    }


def memory(
    probe: Probe, baseline: dict[str, int], hwm: dict[str, int], sessions: int
) -> dict[str, Any]:
    """The figures in MiB; a peak is the larger of the sampled one and the kernel's VmHWM."""
    sampled = {role: max(probe.peaks.get(role, {}).values(), default=0) for role in ROLES}
    peak = {role: max(sampled[role], hwm.get(role, 0)) for role in ROLES}
    phases = probe.peaks.get("intake", {})
    growth = peak["intake"] - baseline["intake"]
    return {
        "intake_rss_baseline_mib": mib(baseline["intake"]),
        "intake_rss_held_mib": mib(phases.get("holding", 0)),
        "intake_rss_peak_mib": mib(peak["intake"]),
        "intake_rss_growth_mib": mib(growth),
        "intake_rss_growth_per_session_mib": mib(growth / sessions),
        "intake_peak_phase": max(phases, key=phases.__getitem__, default=None),
        "intake_rss_by_phase_mib": {phase: mib(kib) for phase, kib in phases.items()},
        "scheduler_rss_peak_mib": mib(peak["scheduler"]),
        "supervisor_rss_peak_mib": mib(peak["supervisor"]),
        "rss_baseline_mib": {role: mib(kib) for role, kib in baseline.items()},
        "vm_hwm_mib": {role: mib(kib) for role, kib in hwm.items()},
    }


def mib(kib: float) -> float:
    return round(kib / 1024, 1)


# --- results -----------------------------------------------------------------------------------


def relay_package() -> str:
    """Which relay package `python -m relay` imports from this directory (the daemon's)."""
    found = subprocess.run(
        [sys.executable, "-c", "import relay; print(relay.__file__)"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return str(Path(found.stdout.strip()).parent)


def write(out: Path, label: str, meta: dict[str, Any], cases: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"data-memory-{label}"
    stem.with_suffix(".json").write_text(json.dumps({**meta, "cases": cases}, indent=1) + "\n")
    stem.with_suffix(".md").write_text(render(meta, cases))


COLUMNS = (
    ("intake_rss_baseline_mib", "intake RSS baseline MiB"),
    ("intake_rss_held_mib", "all held in DATA"), ("intake_rss_peak_mib", "peak"),
    ("intake_rss_growth_mib", "growth"), ("intake_rss_growth_per_session_mib", "per session"),
    ("scheduler_rss_peak_mib", "scheduler peak MiB"),
    ("supervisor_rss_peak_mib", "supervisor peak MiB"),
)  # fmt: skip


def render(meta: dict[str, Any], cases: list[dict[str, Any]]) -> str:
    lines = [
        f"DATA memory benchmark {meta['date']} on {meta['machine']}; relay from "
        f"{meta['relay_package']}{'; ' + meta['note'] if meta['note'] else ''}; "
        f"smtp.idle_timeout: {meta['idle_timeout'] or 'the default'}.",
        "",
        "Each session sends one message whole but for its end-of-data line; once every session "
        "is there and the intake has read all they sent (its sockets' queues empty), they are "
        f"held {meta['hold_s']:g} s, then all end their data. Peak: the larger of the 50 ms "
        "samples and the kernel's VmHWM. Accepted: the client got its 250; spooled: the "
        "daemon's `received` lines; intact: delivered with the SHA-256 of the body sent.",
        "",
        "| sessions | message | "
        + " | ".join(title for _, title in COLUMNS)
        + " | accepted | spooled | delivered intact | wall s |",
        "|---|---|" + "---|" * len(COLUMNS) + "---|---|---|---|",
    ]
    for case in cases:
        head = [str(case["sessions"]), f"{case['size'] / 1e6:g} MB"]
        if "skipped" in case:
            lines.append("| " + " | ".join([*head, f"skipped: {case['skipped']}"]) + " |")
            continue
        cells = [f"{case[key]:g}" for key, _ in COLUMNS]
        stopped = " (stopped: memory low)" if case["memory_guard_tripped"] else ""
        tail = [f"{case['accepted']}/{case['sessions']}{stopped}", str(case["spooled"]),
                f"{case['intact']}/{case['delivered']}", f"{case['wall_s']:g}"]  # fmt: skip
        lines.append("| " + " | ".join([*head, *cells, *tail]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", type=counts, default="30,300", help="comma-separated")
    parser.add_argument("--sizes", type=sizes, default="5M,25M", help="per message, "
                        "comma-separated: 5M = 5,000,000 octets, 5Mi = 5 MiB")  # fmt: skip
    parser.add_argument("--hold", type=float, default=2.0, help="seconds every session stays "
                        "at its end of data once the intake has read all")  # fmt: skip
    parser.add_argument("--max-seconds", type=float, default=600.0, help="per case")
    parser.add_argument("--min-available", type=int, default=2048, help="MiB: stop a case's "
                        "clients when MemAvailable falls below it")  # fmt: skip
    parser.add_argument("--idle-timeout", help="smtp.idle_timeout (default: the daemon's)")
    parser.add_argument("--spool-dir", default=tempfile.gettempdir(), help="where spools go")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--label", default="latest", help="data-memory-LABEL.json and .md")
    parser.add_argument("--note", default="", help="a line for the table's heading")
    args = parser.parse_args()
    raise_fd_limit(max(args.sessions) * 2 + 200)
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "relay_package": relay_package(),
        "note": args.note,
        "hold_s": args.hold,
        "idle_timeout": args.idle_timeout,
    }
    cases: list[dict[str, Any]] = []
    for size in args.sizes:
        for count in args.sessions:
            cases.append(run_case(count, size, args))
            print(json.dumps(cases[-1]), flush=True)
            write(Path(args.out), args.label, meta, cases)
    print(render(meta, cases), end="")


if __name__ == "__main__":
    main()
