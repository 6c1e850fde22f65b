"""Intake, access control: connection limits (in total and per client IP), the per-IP
command rate, and slowing down then banning IPs that fail AUTH, in the manner of Postfix's
anvil. Clients in relay_networks are exempt from the per-IP limits (Postfix's
smtpd_client_event_limit_exceptions), not from the total."""

from __future__ import annotations

import ipaddress
import time
from collections import Counter, deque

from relay.config.model import Config

REPLY_TOO_MANY = "421 4.7.0 Too many connections, try again later"
REPLY_TOO_MANY_FROM_IP = "421 4.7.0 Too many connections from your IP address, try again later"
REPLY_TOO_FAST = "421 4.7.0 Too many commands from your IP address, slow down"
REPLY_BANNED = "421 4.7.0 Too many failed authentications from your IP address, try again later"
WINDOW = 60.0  # the command rate is per minute
MAX_AUTH_DELAY = 5.0


def client_address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A peer's address without its IPv6 zone, and IPv4 for an IPv4-mapped IPv6 one."""
    address = ipaddress.ip_address(ip.partition("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


class Guard:
    """Counts per client IP; every table is pruned as clients leave or windows pass."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.open = 0
        self.per_ip: Counter[str] = Counter()
        self.commands: dict[str, deque[float]] = {}
        self.failures: dict[str, deque[float]] = {}
        self.banned: dict[str, float] = {}  # ip → monotonic time the ban ends

    def trusted(self, ip: str) -> bool:
        address = client_address(ip)
        return any(address in net for net in self.cfg.smtp.relay_networks)

    def admit(self, ip: str) -> tuple[str, str] | None:
        """Count a new connection, or (reason, reply) to refuse it with."""
        limits = self.cfg.smtp.limits
        if self.is_banned(ip):
            return "banned", REPLY_BANNED
        if limits.max_connections and self.open >= limits.max_connections:
            return "too_many_connections", REPLY_TOO_MANY
        per_ip = limits.max_connections_per_ip
        if per_ip and self.per_ip[ip] >= per_ip and not self.trusted(ip):
            return "too_many_connections", REPLY_TOO_MANY_FROM_IP
        self.open += 1
        self.per_ip[ip] += 1
        return None

    def leave(self, ip: str) -> None:
        self.open -= 1
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]
            self.commands.pop(ip, None)

    def command(self, ip: str) -> bool:
        """Record one command; False when the IP is over its per-minute rate."""
        limit = self.cfg.smtp.limits.commands_per_minute_per_ip
        if not limit or self.trusted(ip):
            return True
        now = time.monotonic()
        recent = self.commands.setdefault(ip, deque())
        while recent and recent[0] <= now - WINDOW:
            recent.popleft()
        if len(recent) >= limit:
            return False
        recent.append(now)
        return True

    def auth_failed(self, ip: str) -> float:
        """Record a failed AUTH; returns how long to wait before answering (1 s, 2 s, … 5 s).
        max_failures within ban_time bans the IP for ban_time."""
        auth = self.cfg.smtp.auth
        now = time.monotonic()
        recent = self.failures.setdefault(ip, deque())
        while recent and recent[0] <= now - auth.ban_time:
            recent.popleft()
        recent.append(now)
        if len(recent) >= auth.max_failures:
            self.banned[ip] = now + auth.ban_time
            del self.failures[ip]
        return min(float(len(recent)), MAX_AUTH_DELAY)

    def is_banned(self, ip: str) -> bool:
        until = self.banned.get(ip)
        if until is None:
            return False
        if until <= time.monotonic():
            del self.banned[ip]
            return False
        return True
