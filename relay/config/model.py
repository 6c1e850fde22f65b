"""Configuration, the model: the whole configuration, one section per top-level YAML key, loaded and
validated once into typed, frozen objects, with one-line errors that name the key and the
problem."""

from __future__ import annotations

import fnmatch
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from relay.config.api import ApiConfig
from relay.config.bounces import BouncesConfig
from relay.config.delivery import DeliveryConfig
from relay.config.destinations import DEFAULT_LIMITS, Limits, destinations
from relay.config.dkim import DkimConfig
from relay.config.events import EventsConfig
from relay.config.idempotency import IdempotencyConfig
from relay.config.lanes import LanesConfig
from relay.config.lifecycle import LifecycleConfig
from relay.config.metrics import MetricsConfig
from relay.config.providers import DEFAULT_PROVIDERS, providers
from relay.config.quotas import QuotasConfig
from relay.config.routes import RouteRule, domain_matches, routes
from relay.config.schema import ConfigError, build, option
from relay.config.sendmail import SendmailConfig
from relay.config.smtp import SmtpConfig
from relay.config.spool import SpoolConfig
from relay.config.suppression import SuppressionConfig
from relay.config.throttle import ThrottleConfig
from relay.config.webhooks import WebhookConfig, webhooks


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
    api: ApiConfig = field(default_factory=ApiConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    idempotency: IdempotencyConfig = field(default_factory=IdempotencyConfig)
    bounces: BouncesConfig = field(default_factory=BouncesConfig)
    suppression: SuppressionConfig = field(default_factory=SuppressionConfig)
    sendmail: SendmailConfig = field(default_factory=SendmailConfig)
    # Endpoints sent the journal's events, signed (Standard Webhooks); none by default.
    webhooks: tuple[WebhookConfig, ...] = option(webhooks, ())

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
RESTART_ONLY = (
    "smtp.listen", "smtp.submission", "smtp.smtps", "spool.path", "metrics.listen", "api.listen",
)  # fmt: skip


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
    cfg = build(Config, data, "")
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
    taken = (cfg.metrics.listen, *cfg.smtp.listen, *cfg.smtp.submission, *cfg.smtp.smtps)
    if cfg.api.listen is not None and cfg.api.listen in taken:
        return f"api.listen: {cfg.api.listen[0]}:{cfg.api.listen[1]} is another listener's address"
    if cfg.idempotency.window > cfg.events.retention:
        return "idempotency.window: longer than events.retention (keys are rebuilt from events)"
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
    return _webhooks_inconsistency(cfg.webhooks)


def _webhooks_inconsistency(hooks: tuple[WebhookConfig, ...]) -> str | None:
    """A webhook's extra CA file must load, as delivery.tls.ca_file must."""
    for index, hook in enumerate(hooks):
        if hook.ca_file is not None:
            try:
                ssl.create_default_context().load_verify_locations(cafile=hook.ca_file)
            except (OSError, ssl.SSLError) as exc:
                return f"webhooks: [{index}] ca_file: cannot load {hook.ca_file}: {why(exc)}"
    return None
