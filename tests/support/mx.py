"""Scriptable MX hosts: real aiosmtpd servers, one per loopback address on one shared port, each
in its own thread and event loop, recording what they accept and replying as the test scripts."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
import trustme
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

T = TypeVar("T")
ACCEPT = "250 2.0.0 OK"
DROP = "<drop>"  # a scripted "reply" that closes the connection instead of answering
HANG = "<hang>"  # a scripted "reply" that never comes; the connection stays open
SLOW = "<slow {seconds}> "  # prefix: SLOW.format(seconds=2) + "250 ok" answers 2 s late
HELD = "<held> "  # prefix: HELD + "250 ok" answers when the test calls release() (or after 60 s)
HELD_AT_MOST = 60.0
PORT_ATTEMPTS = 200
PROBE_ADDRESSES = [f"127.0.0.{n}" for n in range(1, 10)]
LOWEST_PORT = 10_000
DSN_PARAMS = ("RET", "ENVID", "NOTIFY", "ORCPT")


@dataclass
class Received:
    """One accepted message."""

    mail_from: str  # "" for the null reverse path <>
    rcpt_tos: list[str]
    data: bytes  # exactly as received, dot-stuffing undone
    peer_ip: str
    tls: bool
    helo: str  # the name given in EHLO or HELO
    mail_options: list[str] = field(default_factory=list)  # e.g. ["SIZE=123", "BODY=8BITMIME"]
    # Each recipient's RCPT parameters (RFC 3461's, which only a sink with dsn=True takes).
    rcpt_options: dict[str, list[str]] = field(default_factory=dict)
    user: str | None = None  # who authenticated (AUTH) in the session that sent it


class _Script:
    """Replies consumed in order; the last one repeats."""

    def __init__(self, *replies: str) -> None:
        self._replies = list(replies or [ACCEPT])

    def next(self) -> str:
        return self._replies.pop(0) if len(self._replies) > 1 else self._replies[0]


class _Handler:
    """aiosmtpd hooks: reply as scripted, and record a message when DATA is accepted."""

    def __init__(self, sink: MxSink) -> None:
        self.sink = sink

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, name: str, replies: list[str]
    ) -> list[str]:
        if not self.sink.esmtp:
            return ["502 5.5.1 EHLO not implemented, try HELO"]
        session.host_name = name
        if self.sink.dsn:
            replies = [replies[0], "250-DSN", *replies[1:]]
        if self.sink.pipelining:  # aiosmtpd reads commands one by one whatever arrives together
            return [replies[0], "250-PIPELINING", *replies[1:]]
        return replies

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = await self._answer(server, "mail")
        if reply.startswith("2"):
            envelope.mail_from = address  # aiosmtpd gives the null reverse path as "<>"
            envelope.mail_options.extend([*options, *cast(_Server, server).dsn_taken])
            cast(_Server, server).rcpt_options = {}
        return reply

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = await self._answer(server, f"rcpt:{address}")
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
            cast(_Server, server).rcpt_options[address] = cast(_Server, server).dsn_taken
        return reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = await self._answer(server, "data")
        if reply.startswith("2"):
            self.sink.record(
                Received(
                    mail_from=_reverse_path(envelope.mail_from),
                    rcpt_tos=list(envelope.rcpt_tos),
                    data=envelope.original_content or b"",
                    peer_ip=cast(tuple[str, int], session.peer)[0],
                    tls=session.ssl is not None or self.sink.smtps,
                    helo=session.host_name or "",
                    mail_options=list(envelope.mail_options),
                    rcpt_options=dict(cast(_Server, server).rcpt_options),
                    user=str(session.auth_data) if session.authenticated else None,
                )
            )
        return reply

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return await self._answer(server, "rset")

    async def _answer(self, server: SMTP, key: str) -> str:
        reply = self.sink.next_reply(key)
        if reply.startswith("<slow "):
            seconds, _, reply = reply[len("<slow ") :].partition("> ")
            await asyncio.sleep(float(seconds))
        if reply.startswith(HELD):
            reply = reply[len(HELD) :]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.sink.gate.wait(), HELD_AT_MOST)
        if reply in (DROP, HANG):
            if reply == DROP:
                cast(asyncio.Transport, server.transport).abort()
            await asyncio.Event().wait()  # until connection_lost cancels this session's task
        return reply


class _Server(SMTP):
    """aiosmtpd's server, counting connections and keeping their sockets for shutdown."""

    def __init__(self, sink: MxSink, **options: Any) -> None:
        super().__init__(_Handler(sink), **options)
        self.sink = sink
        self.counted = False  # whether connected() was called and disconnected() not yet
        self.dsn_taken: list[str] = []  # the RFC 3461 parameters of the last MAIL or RCPT
        self.rcpt_options: dict[str, list[str]] = {}  # this transaction's, by recipient
        # aiosmtpd dispatches through this table; wrapping it logs every verb a client sends.
        self._smtp_methods = {
            verb: _logged(self, verb, method) for verb, method in self._smtp_methods.items()
        }

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's, with RET, ENVID, NOTIFY and ORCPT taken out of the parameters (it would
        refuse them) into dsn_taken, as sent, when the sink offers DSN."""
        address, params = super()._getaddr(arg)
        self.dsn_taken = []
        if self.sink.dsn and params:
            tokens = params.split()
            self.dsn_taken = [t for t in tokens if t.partition("=")[0].upper() in DSN_PARAMS]
            params = " ".join(t for t in tokens if t not in self.dsn_taken)
        return address, params

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # not the second call STARTTLS makes with the TLS transport
            self.counted = True
            self.sink.connected(cast(asyncio.Transport, transport))
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self.counted:
            self.counted = False
            self.sink.disconnected()
        super().connection_lost(error)


def _logged(
    server: _Server, verb: str, method: Callable[[str], Awaitable[None]]
) -> Callable[[str], Awaitable[None]]:
    @functools.wraps(method)  # keeps the HELP text aiosmtpd attaches to the method
    async def logged(arg: str) -> None:
        # Bytes already waiting behind this command: the client pipelined (RFC 2920).
        server.sink.command(verb, ahead=bool(server._reader._buffer))  # type: ignore[attr-defined]
        await method(arg)

    return logged


class _BrokenTlsServer(_Server):
    """Advertises STARTTLS and agrees to it, then answers the handshake with garbage."""

    async def smtp_STARTTLS(self, arg: str) -> None:
        await self.push("220 2.0.0 Ready to start TLS")
        transport = cast(asyncio.Transport, self.transport)
        transport.write(b"this is not a TLS handshake\r\n")
        transport.close()


class MxSink:
    """One MX host on ip:port, serving from a background thread until close()."""

    def __init__(
        self,
        ip: str,
        port: int,
        *,
        tls: bool = False,
        tls_context: ssl.SSLContext | None = None,
        broken_tls: bool = False,
        smtputf8: bool = False,
        esmtp: bool = True,
        auth: dict[str, str] | None = None,
        auth_require_tls: bool = True,
        smtps: ssl.SSLContext | None = None,
        pipelining: bool = True,
        dsn: bool = False,
    ) -> None:
        """auth: users and passwords that AUTH (PLAIN, LOGIN) accepts; offered only after
        STARTTLS unless auth_require_tls is false (or the sink is smtps). smtps: serve TLS
        from the first byte with this context (implicit TLS, RFC 8314). pipelining: announce
        PIPELINING (RFC 2920), as most MX hosts do. dsn: announce DSN (RFC 3461) and take its
        parameters, recorded in Received.mail_options and rcpt_options."""
        self.ip, self.port, self.esmtp = ip, port, esmtp
        self.dsn = dsn
        self.pipelining = pipelining
        self.smtps = smtps is not None
        self._smtps_context = smtps
        self.received: list[Received] = []
        self.connections = 0  # connections accepted so far
        self.open_now = 0  # connections open now
        self.max_open = 0  # the most connections open at once
        self.commands: list[str] = []  # verbs received, in order, over all connections
        self.pipelined: list[str] = []  # those that arrived with more bytes right behind them
        self._scripts: dict[str, _Script] = {}
        self._changed = threading.Condition()
        self.gate = asyncio.Event()  # what HELD replies wait for; release() opens it
        self._transports: list[asyncio.Transport] = []
        self._options: dict[str, Any] = {"hostname": f"mx.{ip}", "enable_SMTPUTF8": smtputf8}
        if auth is not None:
            self._options["authenticator"] = _authenticator(auth)
            # aiosmtpd cannot tell that a connection is TLS from the start: it would refuse AUTH.
            self._options["auth_require_tls"] = auth_require_tls and smtps is None
        if tls_context is not None:
            self._options["tls_context"] = tls_context
        elif tls or broken_tls:
            self._options["tls_context"] = _server_tls()
        self._server_class = _BrokenTlsServer if broken_tls else _Server
        self._listener: asyncio.Server | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"mx-{ip}", daemon=True)
        self._thread.start()
        try:
            self.start()
        except OSError:
            self.close()
            raise

    def script_mail(self, *replies: str) -> None:
        self._script("mail", replies)

    def script_rcpt(self, address: str, *replies: str) -> None:
        self._script(f"rcpt:{address}", replies)

    def script_rset(self, *replies: str) -> None:
        self._script("rset", replies)

    def script_data(self, *replies: str) -> None:
        """Replies after the final dot; messages given a non-2xx reply are not recorded."""
        self._script("data", replies)

    def release(self) -> None:
        """Send the HELD replies waiting now; those scripted after them wait for the next call."""

        def open_gate() -> None:
            self.gate.set()
            self.gate = asyncio.Event()

        self._loop.call_soon_threadsafe(open_gate)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Block until at least count messages were accepted; AssertionError if they never are."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.received) >= count, timeout):
                raise AssertionError(
                    f"{self.ip}: expected {count} message(s) within {timeout}s, "
                    f"got {len(self.received)}: {self.received!r}"
                )
            return list(self.received)

    def recipients(self) -> list[str]:
        with self._changed:
            return [rcpt for message in self.received for rcpt in message.rcpt_tos]

    def start(self) -> None:
        """Listen (again): the host is up."""
        if self._listener is None:
            self._listener = self._run(self._listen())

    def stop(self) -> None:
        """Close the listener so that connections are refused: the host is down."""
        if self._listener is not None:
            self._run(self._close(self._listener))
            self._listener = None

    def disconnect(self) -> None:
        """Close every open connection from the server's side, as an idle timeout would."""
        self._run(self._disconnect())

    def close(self) -> None:
        """Stop, drop every connection and end the thread."""
        self.stop()
        self._run(self._drop_connections())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    # --- called from the sink's own thread ------------------------------------------------------

    def next_reply(self, key: str) -> str:
        with self._changed:
            script = self._scripts.get(key)
            return script.next() if script is not None else ACCEPT

    def record(self, message: Received) -> None:
        with self._changed:
            self.received.append(message)
            self._changed.notify_all()

    def command(self, verb: str, ahead: bool) -> None:
        with self._changed:
            self.commands.append(verb)
            if ahead:
                self.pipelined.append(verb)

    def connected(self, transport: asyncio.Transport) -> None:
        with self._changed:
            self.connections += 1
            self.open_now += 1
            self.max_open = max(self.max_open, self.open_now)
            self._transports.append(transport)
            self._changed.notify_all()

    def disconnected(self) -> None:
        with self._changed:
            self.open_now -= 1
            self._changed.notify_all()

    def wait_open(self, count: int, timeout: float = 10.0) -> None:
        """Block until exactly count connections are open; AssertionError if that never comes."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.open_now == count, timeout):
                raise AssertionError(
                    f"{self.ip}: expected {count} open connection(s) within {timeout}s, "
                    f"have {self.open_now}"
                )

    def _script(self, key: str, replies: tuple[str, ...]) -> None:
        with self._changed:
            self._scripts[key] = _Script(*replies)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _listen(self) -> asyncio.Server:
        def protocol() -> SMTP:
            return self._server_class(self, loop=self._loop, **self._options)

        return await self._loop.create_server(protocol, self.ip, self.port, ssl=self._smtps_context)

    async def _disconnect(self) -> None:
        for transport in self._transports:
            transport.close()

    async def _close(self, listener: asyncio.Server) -> None:
        listener.close()
        await listener.wait_closed()

    async def _drop_connections(self) -> None:
        for transport in self._transports:
            transport.abort()
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class MxNet:
    """MX sinks on 127.0.0.2, 127.0.0.3, … all on one port (what delivery.port points at)."""

    def __init__(self) -> None:
        self.port = free_port(*PROBE_ADDRESSES)  # so that all sinks can share it
        self.sinks: list[MxSink] = []

    def sink(self, ip: str, **options: Any) -> MxSink:
        """Start a sink on ip:port; options as MxSink takes them (tls, broken_tls, …)."""
        sink = MxSink(ip, self.port, **options)
        self.sinks.append(sink)
        return sink

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


@pytest.fixture
def mx() -> Iterator[MxNet]:
    net = MxNet()
    try:
        yield net
    finally:
        net.close()


def _authenticator(users: dict[str, str]) -> Callable[..., AuthResult]:
    """aiosmtpd's authenticator hook: accept exactly the given users and passwords."""

    def check(
        server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if isinstance(data, LoginPassword):
            user, password = data.login.decode(), data.password.decode()
            if users.get(user) == password:
                return AuthResult(success=True, auth_data=user)
        return AuthResult(success=False, handled=False)

    return check


def _reverse_path(mail_from: str | None) -> str:
    """aiosmtpd gives the null reverse path as "<>"; Received says ""."""
    return "" if mail_from in (None, "<>") else str(mail_from)


def _port_range() -> range:
    """The ports this process hands out: below the kernel's ephemeral range (a port the kernel
    hands out can be taken as a client's source port before a server binds it), and under
    pytest-xdist a slice of it for each worker, so that two workers never pick the same port."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # gw0, gw1, … (unset without xdist)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    span = (low - LOWEST_PORT) // workers
    if span < PORT_ATTEMPTS:
        raise RuntimeError(f"no room for {workers} worker(s) between {LOWEST_PORT} and {low}")
    start = LOWEST_PORT + int(worker.removeprefix("gw")) * span
    return range(start, start + span)


_handed_out: set[int] = set()  # none is handed out twice before half the range has been


def free_port(*hosts: str) -> int:
    """A port free to listen on at every one of hosts (default 127.0.0.1), from this process's
    range and not handed out lately: what a test names in a config is bound only later."""
    ports = _port_range()
    if len(_handed_out) > len(ports) // 2:
        _handed_out.clear()
    for _ in range(PORT_ATTEMPTS):
        port = random.choice(ports)
        if port not in _handed_out and all(_bindable(ip, port) for ip in hosts or ["127.0.0.1"]):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no port free on all of {hosts} in {ports}")


def _bindable(ip: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family) as probe:
        try:
            probe.bind((ip, port))
        except OSError:
            return False
    return True


def server_tls(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    """A server context with a certificate that ca issued for names (tls_context=…)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


@functools.cache
def _server_tls() -> ssl.SSLContext:
    """A server context with a certificate for "mx.test" from a throwaway CA (tls=True)."""
    return server_tls(trustme.CA(), "mx.test")
