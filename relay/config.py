"""Configuration stage: YAML loaded and validated once into typed, frozen objects, with one-line
errors that name the key and the problem."""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import yaml

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
HostPort = tuple[str, int]
T = TypeVar("T")

DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}$){LABEL}(\.{LABEL})*\.?$")


class ConfigError(ValueError):
    """A configuration problem; str() is the one line shown to the operator."""


# --- value parsers: each takes the raw YAML value and returns the typed one or raises ----------


def duration(value: Any) -> float:
    """`30s`, `5m`, `2h`, `3d` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration (use 30s, 5m, 2h, 3d or seconds)")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = DURATION_RE.match(str(value))
        if match is None:
            raise ValueError(f"{value!r} is not a duration (use 30s, 5m, 2h, 3d or seconds)")
        seconds = float(match.group(1)) * DURATION_UNITS[match.group(2)]
    if seconds < 0:
        raise ValueError(f"{value!r} is negative")
    return seconds


def durations(value: Any) -> tuple[float, ...]:
    items = _list(value)
    if not items:
        raise ValueError("must list at least one duration")
    return tuple(_indexed(duration, items))


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{value!r} is not an integer")
    if value < 1:
        raise ValueError(f"{value} must be at least 1")
    return value


def port(value: Any) -> int:
    number = positive_int(value)
    if number > 65535:
        raise ValueError(f"{number} is not a TCP port (1-65535)")
    return number


def fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{value!r} is not a number")
    if not 0 <= value < 1:
        raise ValueError(f"{value} must be at least 0 and below 1")
    return float(value)


def hostname(value: Any) -> str:
    if not isinstance(value, str) or not HOSTNAME_RE.match(value):
        raise ValueError(f"{value!r} is not a host name")
    return value.rstrip(".")


def host_port(value: Any) -> HostPort:
    """`host:port`, `[v6]:port` or `v6addr` is not accepted without brackets."""
    text = str(value).strip()
    match = re.match(r"^\[([^\]]+)\]:(\d+)$", text) or re.match(r"^([^:\[\]]+):(\d+)$", text)
    if match is None:
        raise ValueError(f"{value!r} is not host:port (write IPv6 as [::1]:25)")
    host = match.group(1)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        hostname(host)
    return host, port(int(match.group(2)))


def host_ports(value: Any) -> tuple[HostPort, ...]:
    return tuple(_indexed(host_port, _list(value)))


def ip_port(value: Any) -> HostPort:
    """Like host_port, but the host must be an IP address (a DNS server cannot be a name)."""
    host, number = host_port(value)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{value!r}: {host!r} is not an IP address") from None
    return host, number


def ip_ports(value: Any) -> tuple[HostPort, ...]:
    return tuple(_indexed(ip_port, _list(value)))


def networks(value: Any) -> tuple[Network, ...]:
    def network(item: Any) -> Network:
        try:
            return ipaddress.ip_network(str(item), strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an IP network (e.g. 10.0.0.0/8)") from None

    return tuple(_indexed(network, _list(value)))


def providers(value: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """{name: [MX host glob, …]} in order; the first matching pattern names the provider."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{value!r} is not a mapping of provider name to MX host patterns")
    out = []
    for name, patterns in value.items():
        if not isinstance(name, str) or not re.match(r"^[a-z][a-z0-9_]*$", name):
            raise ValueError(f"{name!r} is not a provider name (lowercase letters, digits, _)")
        if name == "other":
            raise ValueError("'other' is implicit (everything that matches no pattern)")
        try:
            globs = tuple(str(p).lower() for p in _list(patterns))
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        out.append((name, globs))
    return tuple(out)


def optional_path(value: Any) -> Path | None:
    """A path, or "" / null for "not configured"."""
    return None if value in ("", None) else path(value)


def count(value: Any) -> int:
    """An integer, 0 or more (0 switches a limit off)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not an integer of 0 or more")
    return value


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


def choice(*options: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in options:
            raise ValueError(f"{value!r} is not one of {', '.join(options)}")
        return str(value)

    return parse


TLS_MODES = ("opportunistic", "required", "verify")


def tls_policies(value: Any) -> tuple[tuple[str, str], ...]:
    """{recipient domain: mode}; a leading dot also matches subdomains (".example.com")."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{value!r} is not a mapping of domain to TLS mode")
    mode = choice(*TLS_MODES)
    out = []
    for domain, setting in value.items():
        name = str(domain).lower().rstrip(".")
        hostname(name.lstrip("."))
        try:
            out.append((name, mode(setting)))
        except ValueError as exc:
            raise ValueError(f"{domain}: {exc}") from None
    return tuple(out)


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    key_file: Path


def dkim_keys(value: Any) -> tuple[DkimKey, ...]:
    """[{domain, selector, key_file}, …]: one signing key per sender domain."""

    def key(item: Any) -> DkimKey:
        if not isinstance(item, Mapping) or set(item) != {"domain", "selector", "key_file"}:
            raise ValueError(f"{item!r} needs exactly domain, selector and key_file")
        selector = str(item["selector"])
        if not re.match(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$", selector):
            raise ValueError(f"{selector!r} is not a DKIM selector")
        return DkimKey(hostname(item["domain"]).lower(), selector, path(item["key_file"]))

    keys = _indexed(key, _list(value))
    domains = [k.domain for k in keys]
    if len(domains) != len(set(domains)):
        raise ValueError("one key per domain")
    return tuple(keys)


def header_names(value: Any) -> tuple[str, ...]:
    def name(item: Any) -> str:
        if not isinstance(item, str) or not re.match(r"^[!-9;-~]+$", item):
            raise ValueError(f"{item!r} is not a header field name")
        return item.lower()

    names = tuple(_indexed(name, _list(value)))
    if "from" not in names:
        raise ValueError("must include from (RFC 6376 §5.4)")
    return names


def path(value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{value!r} is not a path")
    return Path(value).expanduser().absolute()


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{value!r} is not a list")
    return value


def _indexed(parse: Callable[[Any], T], items: list[Any]) -> list[T]:
    """Apply parse to each item, naming the failing index in the error."""
    out = []
    for index, item in enumerate(items):
        try:
            out.append(parse(item))
        except ValueError as exc:
            raise ValueError(f"[{index}] {exc}") from None
    return out


def _opt(parse: Callable[[Any], Any], default: Any) -> Any:
    """A dataclass field with its YAML parser and default."""
    return field(default=default, metadata={"parse": parse})


# --- the typed configuration --------------------------------------------------------------------

FQDN = socket.getfqdn()


@dataclass(frozen=True)
class SmtpConfig:
    listen: tuple[HostPort, ...] = _opt(host_ports, (("127.0.0.1", 2525),))
    hostname: str = _opt(hostname, FQDN)
    max_message_size: int = _opt(positive_int, 26_214_400)
    max_recipients: int = _opt(positive_int, 100)
    relay_networks: tuple[Network, ...] = _opt(
        networks, (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    )
    # RFC 5321 §4.5.3.2.7: a server should wait at least 5 minutes for the next command.
    idle_timeout: float = _opt(duration, 300.0)
    # Listeners that require AUTH (port 587 style; STARTTLS) and implicit TLS ones (port 465).
    submission: tuple[HostPort, ...] = _opt(host_ports, ())
    smtps: tuple[HostPort, ...] = _opt(host_ports, ())
    tls: InboundTlsConfig = field(default_factory=lambda: InboundTlsConfig())
    auth: AuthConfig = field(default_factory=lambda: AuthConfig())
    limits: LimitsConfig = field(default_factory=lambda: LimitsConfig())


@dataclass(frozen=True)
class InboundTlsConfig:
    # PEM certificate chain and key; both empty = no inbound TLS (no STARTTLS, no smtps).
    cert: Path | None = _opt(optional_path, None)
    key: Path | None = _opt(optional_path, None)


@dataclass(frozen=True)
class AuthConfig:
    # The users file (`relay user add`); empty = no SMTP AUTH.
    users_file: Path | None = _opt(optional_path, None)
    # RFC 4954 §4: AUTH PLAIN/LOGIN only over TLS; true also allows it in clear from loopback.
    plaintext_on_loopback: bool = _opt(boolean, False)
    # Failed AUTH: each failure is answered after a growing delay; this many within ban_time
    # and the client IP is refused for ban_time.
    max_failures: int = _opt(positive_int, 5)
    ban_time: float = _opt(duration, 900.0)


@dataclass(frozen=True)
class LimitsConfig:
    max_connections: int = _opt(count, 1000)
    # Per client IP, like Postfix's anvil; clients in relay_networks are exempt (Postfix's
    # smtpd_client_event_limit_exceptions). 0 = no limit.
    max_connections_per_ip: int = _opt(count, 50)
    commands_per_minute_per_ip: int = _opt(count, 600)
    # A session is closed this long after it started, however busy.
    session_timeout: float = _opt(duration, 1800.0)


@dataclass(frozen=True)
class SpoolConfig:
    path: Path = _opt(path, Path("/var/spool/relay"))


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[HostPort, ...] = _opt(ip_ports, ())
    timeout: float = _opt(duration, 5.0)
    max_queries: int = _opt(positive_int, 50)
    max_cache_ttl: float = _opt(duration, 3600.0)


@dataclass(frozen=True)
class RetryConfig:
    schedule: tuple[float, ...] = _opt(durations, (300.0, 1800.0, 7200.0, 21600.0, 43200.0))
    max_age: float = _opt(duration, 259_200.0)
    jitter: float = _opt(fraction, 0.1)


@dataclass(frozen=True)
class DeliveryConfig:
    port: int = _opt(port, 25)
    helo_name: str = _opt(hostname, FQDN)
    concurrency: int = _opt(positive_int, 100)
    connect_timeout: float = _opt(duration, 30.0)
    # RFC 5321 §4.5.3.2: 5 minutes per command; §4.5.3.2.6: 10 minutes after the final dot.
    command_timeout: float = _opt(duration, 300.0)
    data_timeout: float = _opt(duration, 600.0)
    # Backstop for lost wake-ups: how often the scheduler rescans the queue directory.
    scan_interval: float = _opt(duration, 30.0)
    dns: DnsConfig = field(default_factory=DnsConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    tls: OutboundTlsConfig = field(default_factory=lambda: OutboundTlsConfig())
    mta_sts: MtaStsConfig = field(default_factory=lambda: MtaStsConfig())


@dataclass(frozen=True)
class OutboundTlsConfig:
    # opportunistic: STARTTLS when offered, unverified, plain text if it fails (RFC 7435);
    # required: TLS or a temporary failure, never plain text; verify: required plus a valid
    # certificate for the MX host name.
    default: str = _opt(choice(*TLS_MODES), "opportunistic")
    policies: tuple[tuple[str, str], ...] = _opt(tls_policies, ())
    # Extra CA certificates (PEM) trusted for verify and MTA-STS; empty = the system's.
    ca_file: Path | None = _opt(optional_path, None)


@dataclass(frozen=True)
class MtaStsConfig:
    # RFC 8461: fetch and honour the recipient domain's MTA-STS policy.
    enabled: bool = _opt(boolean, False)
    # HTTPS port of https://mta-sts.<domain>/.well-known/mta-sts.txt (443; tests change it).
    port: int = _opt(port, 443)
    fetch_timeout: float = _opt(duration, 10.0)


@dataclass(frozen=True)
class MetricsConfig:
    listen: HostPort = _opt(host_port, ("127.0.0.1", 9025))


DEFAULT_DKIM_HEADERS = (
    "from", "reply-to", "subject", "date", "to", "cc", "message-id", "in-reply-to",
    "references", "mime-version", "content-type", "content-transfer-encoding",
)  # fmt: skip


@dataclass(frozen=True)
class DkimConfig:
    # Signing keys per sender domain (From: header domain); no key = not signed.
    keys: tuple[DkimKey, ...] = _opt(dkim_keys, ())
    headers: tuple[str, ...] = _opt(header_names, DEFAULT_DKIM_HEADERS)


@dataclass(frozen=True)
class LifecycleConfig:
    # SIGTERM: how long SMTP sessions and deliveries in flight may take to finish.
    grace: float = _opt(duration, 30.0)


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
    providers: tuple[tuple[str, tuple[str, ...]], ...] = _opt(providers, DEFAULT_PROVIDERS)

    def provider(self, mx_host: str | None) -> str:
        """The provider whose pattern matches mx_host first, else 'other'."""
        host = (mx_host or "").lower().rstrip(".")
        for name, patterns in self.providers:
            if any(fnmatch.fnmatchcase(host, p) for p in patterns):
                return name
        return "other"

    def provider_names(self) -> list[str]:
        return [name for name, _ in self.providers]


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
