"""Configuration stage: YAML loaded and validated once into typed, frozen objects, with one-line
errors that name the key and the problem."""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, get_type_hints

import yaml

from relay.config.shaping import (
    DEFAULT_LIMITS,
    LanesConfig,
    Limits,
    QuotasConfig,
    ReuseConfig,
    RouteRule,
    ThrottleConfig,
    destinations,
    domain_matches,
    routes,
)
from relay.config.values import (
    TLS_MODES,
    DkimKey,
    HostPort,
    Network,
    boolean,
    choice,
    count,
    dkim_keys,
    duration,
    durations,
    fraction,
    header_names,
    host_port,
    host_ports,
    hostname,
    ip_ports,
    networks,
    option,
    optional_path,
    path,
    port,
    positive_int,
    providers,
    tls_policies,
)

if TYPE_CHECKING:
    from relay.spool.store import Space

T = TypeVar("T")
__all__ = [
    "TLS_MODES",
    "Config",
    "ConfigError",
    "DkimKey",
    "HostPort",
    "Network",
    "hostname",
    "load",
    "parse",
]


class ConfigError(ValueError):
    """A configuration problem; str() is the one line shown to the operator."""


# --- the typed configuration --------------------------------------------------------------------

FQDN = socket.getfqdn()


@dataclass(frozen=True)
class SmtpConfig:
    listen: tuple[HostPort, ...] = option(host_ports, (("127.0.0.1", 2525),))
    hostname: str = option(hostname, FQDN)
    max_message_size: int = option(positive_int, 26_214_400)
    max_recipients: int = option(positive_int, 100)
    relay_networks: tuple[Network, ...] = option(
        networks, (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    )
    # RFC 5321 §4.5.3.2.7: a server should wait at least 5 minutes for the next command.
    idle_timeout: float = option(duration, 300.0)
    # Listeners that require AUTH (port 587 style; STARTTLS) and implicit TLS ones (port 465).
    submission: tuple[HostPort, ...] = option(host_ports, ())
    smtps: tuple[HostPort, ...] = option(host_ports, ())
    tls: InboundTlsConfig = field(default_factory=lambda: InboundTlsConfig())
    auth: AuthConfig = field(default_factory=lambda: AuthConfig())
    limits: LimitsConfig = field(default_factory=lambda: LimitsConfig())


@dataclass(frozen=True)
class InboundTlsConfig:
    # PEM certificate chain and key; both empty = no inbound TLS (no STARTTLS, no smtps).
    cert: Path | None = option(optional_path, None)
    key: Path | None = option(optional_path, None)


@dataclass(frozen=True)
class AuthConfig:
    # The users file (`relay user add`); empty = no SMTP AUTH.
    users_file: Path | None = option(optional_path, None)
    # RFC 4954 §4: AUTH PLAIN/LOGIN only over TLS; true also allows it in clear from loopback.
    plaintext_on_loopback: bool = option(boolean, False)
    # Failed AUTH: each failure is answered after a growing delay; this many within ban_time
    # and the client IP is refused for ban_time.
    max_failures: int = option(positive_int, 5)
    ban_time: float = option(duration, 900.0)


@dataclass(frozen=True)
class LimitsConfig:
    max_connections: int = option(count, 1000)
    # Per client IP, like Postfix's anvil; clients in relay_networks are exempt (Postfix's
    # smtpd_client_event_limit_exceptions). 0 = no limit.
    max_connections_per_ip: int = option(count, 50)
    commands_per_minute_per_ip: int = option(count, 600)
    # A session is closed this long after it started, however busy.
    session_timeout: float = option(duration, 1800.0)


# The disk reserve (Postfix's queue_minfree): by default the smaller of 512 MiB and 5% of the
# spool's file system, so that a small disk is not refused from the start; and, with any
# reserve on, the smaller of 1000 inodes and 1% of the file system's inodes (a message takes
# two; what is kept lets deliveries rewrite their state files and write bounces).
RESERVE_BYTES, RESERVE_SHARE = 512 * 1024 * 1024, 0.05
RESERVE_INODES, RESERVE_INODE_SHARE = 1000, 0.01


def min_free_bytes(value: Any) -> int | None:
    """Bytes (0 = no reserve), or "auto" (None: computed from the file system's size)."""
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a number of bytes (0 or more) nor auto")
    return value


@dataclass(frozen=True)
class SpoolConfig:
    path: Path = option(path, Path("/var/spool/relay"))
    # Below this many free bytes on the spool's file system, MAIL FROM gets 452 4.3.1.
    min_free: int | None = option(min_free_bytes, None)

    def reserve(self, space: Space) -> tuple[int, int]:
        """The bytes and inodes kept free on the spool's file system (0 = none)."""
        if self.min_free == 0:
            return 0, 0
        share = int(space.total_bytes * RESERVE_SHARE)
        reserve = min(RESERVE_BYTES, share) if self.min_free is None else self.min_free
        return reserve, min(RESERVE_INODES, int(space.total_inodes * RESERVE_INODE_SHARE))

    def shortage(self, space: Space, size: int = 0) -> str | None:
        """Why a new message cannot be taken: free bytes or inodes below the reserve, or a
        declared SIZE (RFC 1870) that does not fit above it; None when it can."""
        min_bytes, min_inodes = self.reserve(space)
        if space.free_bytes < min_bytes:
            return f"spool: below min_free: {space.free_bytes} bytes free, reserve {min_bytes}"
        if space.free_inodes < min_inodes:
            return (
                f"spool: below the inode reserve: {space.free_inodes} inodes free, "
                f"reserve {min_inodes}"
            )
        room = space.free_bytes - min_bytes
        if min_bytes and size > room:
            return f"spool: SIZE={size} is more than the {room} bytes free above min_free"
        return None


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[HostPort, ...] = option(ip_ports, ())
    timeout: float = option(duration, 5.0)
    max_queries: int = option(positive_int, 50)
    max_cache_ttl: float = option(duration, 3600.0)


@dataclass(frozen=True)
class RetryConfig:
    schedule: tuple[float, ...] = option(durations, (300.0, 1800.0, 7200.0, 21600.0, 43200.0))
    max_age: float = option(duration, 259_200.0)
    jitter: float = option(fraction, 0.1)


@dataclass(frozen=True)
class DeliveryConfig:
    port: int = option(port, 25)
    helo_name: str = option(hostname, FQDN)
    concurrency: int = option(positive_int, 100)
    connect_timeout: float = option(duration, 30.0)
    # RFC 5321 §4.5.3.2: 5 minutes per command; §4.5.3.2.6: 10 minutes after the final dot.
    command_timeout: float = option(duration, 300.0)
    data_timeout: float = option(duration, 600.0)
    # Backstop for lost wake-ups: how often the scheduler rescans the queue directory.
    scan_interval: float = option(duration, 30.0)
    dns: DnsConfig = field(default_factory=DnsConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    tls: OutboundTlsConfig = field(default_factory=lambda: OutboundTlsConfig())
    mta_sts: MtaStsConfig = field(default_factory=lambda: MtaStsConfig())
    reuse: ReuseConfig = field(default_factory=ReuseConfig)


@dataclass(frozen=True)
class OutboundTlsConfig:
    # opportunistic: STARTTLS when offered, unverified, plain text if it fails (RFC 7435);
    # required: TLS or a temporary failure, never plain text; verify: required plus a valid
    # certificate for the MX host name.
    default: str = option(choice(*TLS_MODES), "opportunistic")
    policies: tuple[tuple[str, str], ...] = option(tls_policies, ())
    # Extra CA certificates (PEM) trusted for verify and MTA-STS; empty = the system's.
    ca_file: Path | None = option(optional_path, None)


@dataclass(frozen=True)
class MtaStsConfig:
    # RFC 8461: fetch and honour the recipient domain's MTA-STS policy.
    enabled: bool = option(boolean, False)
    # HTTPS port of https://mta-sts.<domain>/.well-known/mta-sts.txt (443; tests change it).
    port: int = option(port, 443)
    fetch_timeout: float = option(duration, 10.0)


@dataclass(frozen=True)
class MetricsConfig:
    listen: HostPort = option(host_port, ("127.0.0.1", 9025))


DEFAULT_DKIM_HEADERS = (
    "from", "reply-to", "subject", "date", "to", "cc", "message-id", "in-reply-to",
    "references", "mime-version", "content-type", "content-transfer-encoding",
)  # fmt: skip


@dataclass(frozen=True)
class DkimConfig:
    # Signing keys per sender domain (From: header domain); no key = not signed.
    keys: tuple[DkimKey, ...] = option(dkim_keys, ())
    headers: tuple[str, ...] = option(header_names, DEFAULT_DKIM_HEADERS)


@dataclass(frozen=True)
class LifecycleConfig:
    # SIGTERM: how long SMTP sessions and deliveries in flight may take to finish.
    grace: float = option(duration, 30.0)


DEFAULT_PROVIDERS = (
    ("gmail", ("*.google.com", "*.googlemail.com")),
    ("outlook", ("*.outlook.com", "*.hotmail.com")),
    ("yahoo", ("*.yahoodns.net", "*.yahoo.com")),
    ("icloud", ("*.icloud.com", "*.me.com")),
)


@dataclass(frozen=True)
class Config:
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)
    dkim: DkimConfig = field(default_factory=DkimConfig)
    # MX host patterns naming a destination's provider (metrics labels, later shaping).
    providers: tuple[tuple[str, tuple[str, ...]], ...] = option(providers, DEFAULT_PROVIDERS)
    lanes: LanesConfig = field(default_factory=LanesConfig)
    # Limits per destination: a recipient domain, or a provider (all domains whose MX matches).
    destinations: tuple[tuple[str, Limits], ...] = option(destinations, DEFAULT_LIMITS)
    throttle: ThrottleConfig = field(default_factory=ThrottleConfig)
    quotas: QuotasConfig = field(default_factory=QuotasConfig)
    # Transport rules by recipient domain: the MX hosts (the default) or smarthosts.
    routes: tuple[RouteRule, ...] = option(routes, ())

    def provider(self, mx_host: str | None) -> str:
        """The provider whose pattern matches mx_host first, else 'other'."""
        host = (mx_host or "").lower().rstrip(".")
        for name, patterns in self.providers:
            if any(fnmatch.fnmatchcase(host, p) for p in patterns):
                return name
        return "other"

    def provider_names(self) -> list[str]:
        return [name for name, _ in self.providers]

    def destination(self, domain: str, mx_host: str | None) -> str:
        """Whose limits a recipient domain shares: its own entry, else its first MX host's (or
        smarthost's) entry, else its MX provider's, else the domain alone under the default."""
        limits = dict(self.destinations)
        host = (mx_host or "").lower().rstrip(".")
        for name in (domain, host):
            if "." in name and name in limits:
                return name
        provider = self.provider(mx_host)
        return provider if provider in limits else domain

    def limits(self, destination: str) -> Limits:
        limits = dict(self.destinations)
        return limits.get(destination, limits["default"])

    def route_rule(self, domain: str) -> RouteRule | None:
        """The first transport rule matching domain; None: deliver via MX."""
        for rule in self.routes:
            if any(domain_matches(d, domain) for d in rule.domains):
                return rule if rule.via else None
        return None


# What a SIGHUP cannot change: the process must restart for these.
RESTART_ONLY = ("smtp.listen", "smtp.submission", "smtp.smtps", "spool.path", "metrics.listen")


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """The keys among RESTART_ONLY whose values differ."""

    def value(cfg: Config, key: str) -> Any:
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name)

    return [key for key in RESTART_ONLY if value(old, key) != value(new, key)]


def load(file: str | os.PathLike[str] | None) -> Config:
    """Read and validate a YAML file (None: the embedded defaults); ConfigError on any problem."""
    if file is None:
        return Config()
    try:
        text = Path(file).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: not UTF-8 text") from None
    return parse(text, str(file))


def parse(text: str, source: str = "<config>") -> Config:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{source}:{where} {problem}") from None
    if data is None:
        data = {}
    cfg = _build(Config, data, "")
    problem = _inconsistency(cfg)
    if problem:
        raise ConfigError(problem)
    return cfg


def why(exc: OSError | ssl.SSLError) -> str:
    """The short reason an OS or TLS error gives (no errno or library prefix)."""
    return str(getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc)


def _inconsistency(cfg: Config) -> str | None:
    """Settings that are each valid but do not go together."""
    tls, auth = cfg.smtp.tls, cfg.smtp.auth
    if (tls.cert is None) != (tls.key is None):
        return "smtp.tls: cert and key go together (give both or neither)"
    if (cfg.smtp.submission or cfg.smtp.smtps) and auth.users_file is None:
        return "smtp.submission/smtps require AUTH: set smtp.auth.users_file"
    if (cfg.smtp.submission or cfg.smtp.smtps) and tls.cert is None:
        return "smtp.submission/smtps need TLS (RFC 8314): set smtp.tls.cert and smtp.tls.key"
    providers = {"default", *cfg.provider_names()}
    for name, _ in cfg.destinations:
        if "." not in name and name not in providers:
            known = ", ".join(sorted(providers))
            return f"destinations: {name}: not a domain nor a provider (known: {known})"
    ca_file = cfg.delivery.tls.ca_file
    if ca_file is not None:
        try:
            ssl.create_default_context().load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            return f"delivery.tls.ca_file: cannot load {ca_file}: {why(exc)}"
    return None


def _build(cls: type[T], data: Any, prefix: str) -> T:
    """Build dataclass cls from a mapping, parsing each known key and rejecting unknown ones."""
    where = prefix.rstrip(".") or "top level"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    assert is_dataclass(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(map(str, data)) - set(known))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(known)})")
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for name, value in data.items():
        spec = known[str(name)]
        key = f"{prefix}{name}"
        if is_dataclass(hints[spec.name]):
            values[spec.name] = _build(hints[spec.name], value, key + ".")
            continue
        try:
            values[spec.name] = spec.metadata["parse"](value)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    return cls(**values)
