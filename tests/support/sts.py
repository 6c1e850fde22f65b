"""MTA-STS policy host: a real HTTPS server on one loopback address that answers every GET as
the test scripts (a policy, an error status, silence) and counts the requests."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import trustme

from tests.support.dns import DnsServer
from tests.support.mx import server_tls

POLICY_PATH = "/.well-known/mta-sts.txt"


def policy(mode: str = "enforce", *mx: str, max_age: int = 86400) -> str:
    """Policy text in the RFC 8461 §3.2 format, CRLF line ends."""
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
    return "".join(f"{line}\r\n" for line in lines)


@dataclass
class _Answer:
    body: bytes
    status: int = 200
    content_type: str = "text/plain"
    chunked: bool = False
    hang: bool = False


class PolicyServer:
    """HTTPS on ip and a kernel-chosen port (what delivery.mta_sts.port points at)."""

    def __init__(self, ip: str, context: ssl.SSLContext) -> None:
        self.ip = ip
        self.requests: list[tuple[str, str]] = []  # (path, Host header) of each request
        self._lock = threading.Lock()
        self._answer = _Answer(policy("enforce", "mx.test").encode())
        self._closing = threading.Event()
        self._server = _Server((ip, 0), self)
        # The TLS handshake happens as each connection is accepted.
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name=f"sts-{ip}", daemon=True
        )
        self._thread.start()

    def serve(
        self,
        body: str | bytes,
        *,
        status: int = 200,
        content_type: str = "text/plain",
        chunked: bool = False,
    ) -> None:
        """Answer every request from now on with this."""
        with self._lock:
            data = body.encode() if isinstance(body, str) else body
            self._answer = _Answer(data, status, content_type, chunked)

    def hang(self) -> None:
        """Read requests but never answer them (until close)."""
        with self._lock:
            self._answer = _Answer(b"", hang=True)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def answer(self, path: str, host: str) -> _Answer:
        with self._lock:
            self.requests.append((path, host))
            return self._answer

    def wait_closing(self) -> None:
        self._closing.wait(30)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], sts: PolicyServer) -> None:
        self.sts = sts
        if ":" in address[0]:  # ::1
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_GET(self) -> None:
        sts = self.server.sts
        answer = sts.answer(self.path, self.headers.get("Host", ""))
        if answer.hang:
            sts.wait_closing()
            return
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Connection", "close")
        if answer.chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for start in range(0, len(answer.body), 7):
                piece = answer.body[start : start + 7]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            self.wfile.write(answer.body)
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the tests look at requests, not at a log."""


@dataclass
class Authority:
    """A throwaway CA and its certificate in a PEM file (what delivery.tls.ca_file names)."""

    ca: trustme.CA
    file: Path

    @classmethod
    def create(cls, directory: Path) -> Authority:
        ca = trustme.CA()
        file = directory / "ca.pem"
        ca.cert_pem.write_to_path(str(file))
        return cls(ca, file)

    def server_tls(self, *names: str) -> ssl.SSLContext:
        """A server context with a certificate this CA issued for names."""
        return server_tls(self.ca, *names)


@contextlib.contextmanager
def policy_host(
    dns: DnsServer, authority: Authority, domain: str, ip: str, policy_id: str = "1"
) -> Iterator[PolicyServer]:
    """A PolicyServer for domain on ip, with a certificate for mta-sts.<domain>; the DNS server
    maps that name to ip and publishes _mta-sts.<domain> with policy_id."""
    name = f"mta-sts.{domain}"
    server = PolicyServer(ip, authority.server_tls(name))
    dns.a(name, ip)
    publish(dns, domain, policy_id)
    try:
        yield server
    finally:
        server.close()


def publish(dns: DnsServer, domain: str, policy_id: str, *, ttl: int = 0) -> None:
    """The _mta-sts TXT record of domain (RFC 8461 §3.1); TTL 0 so that changes show at once."""
    dns.record(f"_mta-sts.{domain}", "TXT", f'"v=STSv1; id={policy_id};"', ttl=ttl)
