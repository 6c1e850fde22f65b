"""Test DNS server: a real authoritative server on one loopback port (UDP and TCP) whose records
and faults tests set, from any thread, while it answers in its own threads."""

from __future__ import annotations

import socketserver
import threading
from collections import Counter
from collections.abc import Iterator

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

# RFC 2308 §5: a negative answer carries an SOA whose minimum says how long to remember it.
NEGATIVE_TTL = 5
SOA = dns.rrset.from_text(
    ".", NEGATIVE_TTL, "IN", "SOA", f"ns.test. hostmaster.test. 1 3600 600 86400 {NEGATIVE_TTL}"
)

Key = tuple[dns.name.Name, dns.rdatatype.RdataType]
# A fault applies to one query type of a name, or (None) to every type.
FaultKey = tuple[dns.name.Name, dns.rdatatype.RdataType | None]
# The reply code each answering fault sends; "drop" sends nothing.
FAULT_RCODES = {
    "servfail": dns.rcode.SERVFAIL,
    "refused": dns.rcode.REFUSED,
    "nxdomain": dns.rcode.NXDOMAIN,
}


class DnsServer:
    """Answers from a record table: a name without records is NXDOMAIN, one without the asked
    type is an empty NOERROR; servfail(), refuse(), nxdomain() and drop() make a name, or one
    query type of it, misbehave until clear()."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self._lock = threading.Lock()
        self._records: dict[Key, dns.rrset.RRset] = {}
        self._faults: dict[FaultKey, str] = {}
        self._counts: Counter[Key] = Counter()
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []

    @property
    def address(self) -> str:
        """The form delivery.dns.nameservers takes in relay's config."""
        return f"{self.host}:{self.port}"

    def mx(self, domain: str, *hosts: tuple[int, str], ttl: int = 60) -> None:
        """Replace domain's MX records with (preference, hostname) pairs."""
        exchanges = [f"{pref} {host.rstrip('.')}." for pref, host in hosts]
        self.record(domain, "MX", *exchanges, ttl=ttl)

    def a(self, name: str, *ips: str, ttl: int = 60) -> None:
        self.record(name, "A", *ips, ttl=ttl)

    def aaaa(self, name: str, *ips: str, ttl: int = 60) -> None:
        self.record(name, "AAAA", *ips, ttl=ttl)

    def record(self, name: str, rdtype: str, *rdatas: str, ttl: int = 60) -> None:
        """Replace name's records of rdtype, given in zone-file text (none given: remove them)."""
        owner = dns.name.from_text(name)
        key = (owner, dns.rdatatype.from_text(rdtype))
        rrset = dns.rrset.from_text_list(owner, ttl, "IN", rdtype, rdatas) if rdatas else None
        with self._lock:
            if rrset is None:
                self._records.pop(key, None)
            else:
                self._records[key] = rrset

    def null_mx(self, domain: str) -> None:
        self.mx(domain, (0, "."))

    def servfail(self, name: str, rdtype: str | None = None) -> None:
        """Answer SERVFAIL for name (only its rdtype queries, when given)."""
        self.fault(name, "servfail", rdtype)

    def refuse(self, name: str, rdtype: str | None = None) -> None:
        """Answer REFUSED for name (only its rdtype queries, when given)."""
        self.fault(name, "refused", rdtype)

    def nxdomain(self, name: str, rdtype: str | None = None) -> None:
        """Answer NXDOMAIN for name (only its rdtype queries, when given) whatever its records:
        the broken server of RFC 4074 §4.2 that denies a name exists when asked for AAAA."""
        self.fault(name, "nxdomain", rdtype)

    def drop(self, name: str, rdtype: str | None = None) -> None:
        """Never answer queries for name (only its rdtype queries, when given): clients time
        out."""
        self.fault(name, "drop", rdtype)

    def fault(self, name: str, fault: str, rdtype: str | None = None) -> None:
        """Make name's queries (of rdtype only, when given) get fault: one of FAULT_RCODES or
        "drop"; a fault for one type wins over one for the whole name."""
        if fault not in (*FAULT_RCODES, "drop"):
            raise ValueError(f"unknown DNS fault {fault!r}")
        key = (dns.name.from_text(name), dns.rdatatype.from_text(rdtype) if rdtype else None)
        with self._lock:
            self._faults[key] = fault

    def clear(self, name: str) -> None:
        """Forget name's records and faults: it becomes NXDOMAIN."""
        owner = dns.name.from_text(name)
        with self._lock:
            for fault in [key for key in self._faults if key[0] == owner]:
                del self._faults[fault]
            for key in [key for key in self._records if key[0] == owner]:
                del self._records[key]

    def queries(self, name: str, rdtype: str) -> int:
        """How many queries for name and type arrived (UDP and TCP)."""
        with self._lock:
            return self._counts[(dns.name.from_text(name), dns.rdatatype.from_text(rdtype))]

    def start(self) -> None:
        udp, tcp = _bind_pair(self)
        self.port = udp.server_address[1]
        self._servers = [udp, tcp]
        for server in self._servers:
            thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join()
        self._servers, self._threads = [], []

    def reply(self, wire: bytes, udp: bool) -> bytes | None:
        """The wire response to a wire query, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        response = self._respond(query) if query.question else None
        if response is None:
            return None
        # RFC 1035 §4.2.1, RFC 6891 §6.2.5: a UDP reply fits the client's payload size or is
        # truncated with TC set, which sends the client to TCP.
        max_size = max(query.payload, 512) if udp else 65535
        return response.to_wire(max_size=max_size, prefer_truncation=True)

    def _respond(self, query: dns.message.Message) -> dns.message.Message | None:
        question = query.question[0]
        with self._lock:
            self._counts[(question.name, question.rdtype)] += 1
            fault = self._faults.get((question.name, question.rdtype))
            fault = fault or self._faults.get((question.name, None))
            rrset = self._records.get((question.name, question.rdtype))
            exists = any(name == question.name for name, _ in self._records)
        if fault == "drop":
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if fault is None and rrset is not None:
            response.answer.append(rrset)
            return response
        rcode = (
            FAULT_RCODES[fault] if fault else dns.rcode.NOERROR if exists else dns.rcode.NXDOMAIN
        )
        response.set_rcode(rcode)
        if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            response.authority.append(SOA)  # RFC 2308 §3: a negative answer carries the SOA
        return response


class _UdpServer(socketserver.ThreadingUDPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], dns_server: DnsServer) -> None:
        self.dns = dns_server
        super().__init__(address, _UdpHandler)


class _TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], dns_server: DnsServer) -> None:
        self.dns = dns_server
        super().__init__(address, _TcpHandler)


class _UdpHandler(socketserver.BaseRequestHandler):
    server: _UdpServer

    def handle(self) -> None:
        wire, sock = self.request
        response = self.server.dns.reply(wire, udp=True)
        if response is not None:
            sock.sendto(response, self.client_address)


class _TcpHandler(socketserver.StreamRequestHandler):
    """RFC 1035 §4.2.2: each message is preceded by its two-byte length."""

    server: _TcpServer
    timeout = 10

    def handle(self) -> None:
        try:
            while len(prefix := self.rfile.read(2)) == 2:
                wire = self.rfile.read(int.from_bytes(prefix, "big"))
                response = self.server.dns.reply(wire, udp=False)
                if response is not None:
                    self.wfile.write(len(response).to_bytes(2, "big") + response)
        except OSError:
            pass  # the client went away or stalled past the timeout


def _bind_pair(dns_server: DnsServer) -> tuple[_UdpServer, _TcpServer]:
    """A UDP and a TCP server on the same free port (the kernel picks it for UDP)."""
    for _ in range(20):
        udp = _UdpServer((dns_server.host, 0), dns_server)
        try:
            return udp, _TcpServer((dns_server.host, udp.server_address[1]), dns_server)
        except OSError:
            udp.server_close()
    raise RuntimeError("no loopback port free for both UDP and TCP")


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    """A started DnsServer, closed after the test."""
    server = DnsServer()
    server.start()
    try:
        yield server
    finally:
        server.close()
