"""Delivery, TLS policy: what TLS a delivery to one recipient domain demands and which MX hosts
it may use (from the configuration, the domain's own MTA-STS policy or the default), and the TLS
mode each address is tried in."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from relay.config.delivery import TLS_MODES, DeliveryConfig
from relay.delivery.mtasts import MtaSts, mx_matches
from relay.delivery.peer import Peer, RecipientResult, TlsFailed, Unsettled
from relay.delivery.resolver import Host, Route
from relay.observe import metrics

OPPORTUNISTIC, REQUIRED, VERIFY = TLS_MODES
# A session mode beside the policy modes: no STARTTLS at all (opportunistic's fallback).
PLAINTEXT = "plaintext"

# A new session to a peer in a TLS mode, and the transaction on it: the results, or
# TlsFailed (before any MAIL) when it cannot have the TLS the mode asks for.
Session = Callable[[Peer, str], Awaitable[list[RecipientResult]]]


@dataclass(frozen=True)
class Policy:
    """What a delivery to one domain must do: the TLS mode to enforce, where the rule comes from
    ("config", "mta-sts" or "default"), the MX host patterns allowed (empty: any) and whether an
    MTA-STS policy is only being tested (its failures reported, not enforced; RFC 8461 §5)."""

    mode: str
    source: str
    mx: tuple[str, ...] = ()
    testing: bool = False

    def allows(self, host: str) -> bool:
        """Whether host may be used under the mx patterns (RFC 8461 §4.1)."""
        return not self.mx or any(mx_matches(pattern, host) for pattern in self.mx)


class TlsPolicy:
    """The policy for each recipient domain; MTA-STS policies are cached per domain."""

    def __init__(self, cfg: DeliveryConfig) -> None:
        self._cfg = cfg
        # Verifies certificates for the verify mode, MTA-STS MX hosts and policy fetches.
        self.context = verifying_context(cfg.tls.ca_file)
        self._sts = MtaSts(cfg, self.context)

    async def for_route(self, route: Route) -> Policy:
        """The recipient domain's TLS policy for its MX hosts (for_domain); not looked up for a
        route through smarthosts only, whose own settings apply (for_host)."""
        if all(host.smarthost is not None for host in route.hosts):
            return Policy(OPPORTUNISTIC, "smarthost")
        return await self.for_domain(route.domain)

    async def for_domain(self, domain: str) -> Policy:
        """The policy for mail to domain: an entry in delivery.tls.policies wins, then the
        domain's MTA-STS policy (enforce or testing), then delivery.tls.default."""
        domain = domain.strip().rstrip(".").lower()
        mode = configured_mode(self._cfg.tls.policies, domain)
        if mode is not None:
            return Policy(mode, "config")
        default = Policy(self._cfg.tls.default, "default")
        if not self._cfg.mta_sts.enabled or domain.startswith("["):
            return default
        sts = await self._sts.policy(domain)
        if sts is None or sts.mode == "none":
            return default
        if sts.mode == "enforce":
            return Policy(VERIFY, "mta-sts", sts.mx)
        return Policy(self._cfg.tls.default, "mta-sts", sts.mx, testing=True)


def for_host(host: Host, policy: Policy) -> Policy:
    """The TLS policy at host: a smarthost's own tls and verify settings (MTA-STS and
    delivery.tls do not apply to it), else the recipient domain's policy."""
    smarthost = host.smarthost
    if smarthost is None:
        return policy
    if smarthost.tls in ("starttls", "smtps"):
        return Policy(VERIFY if smarthost.verify else REQUIRED, "smarthost")
    return Policy(PLAINTEXT if smarthost.tls == "none" else OPPORTUNISTIC, "smarthost")


def satisfies(policy: Policy, tls: bool, verified: bool) -> bool:
    """Whether a session with that TLS may carry mail under policy: opportunistic, plain text
    and testing take any; required takes TLS; verify a verified certificate."""
    if policy.testing or policy.mode in (OPPORTUNISTIC, PLAINTEXT):
        return True
    return verified if policy.mode == VERIFY else tls


async def attempt(peer: Peer, policy: Policy, session: Session) -> list[RecipientResult]:
    """One address under policy; Unsettled when it settles nothing, so the next is tried.

    Opportunistic: STARTTLS when offered, and once more in plain text if TLS fails, as it
    must not make delivery worse than no TLS (RFC 7435 §3). Required and verify: TLS or no
    transaction at all. Testing: as enforce would, but a failure is only reported.
    """
    if policy.testing:
        return await _testing(peer, policy, session)
    if policy.mode == OPPORTUNISTIC:
        try:
            return await session(peer, OPPORTUNISTIC)
        except TlsFailed:
            return await session(peer, PLAINTEXT)
    try:
        return await session(peer, policy.mode)
    except TlsFailed as exc:
        metrics.TLS.labels("failed").inc()
        raise Unsettled(peer, exc.reply) from None


async def _testing(peer: Peer, policy: Policy, session: Session) -> list[RecipientResult]:
    """RFC 8461 §5: under a policy in testing mode, try what enforce would demand (a listed
    MX host, a verified certificate); when that fails, note it and deliver as configured."""
    peer = unlisted(peer, policy)
    enforced = replace(policy, testing=False, mx=())
    if policy.mode == VERIFY:
        return await attempt(peer, enforced, session)
    try:
        return await session(peer, VERIFY)
    except TlsFailed as exc:
        peer = peer.noting(f"MTA-STS testing: {exc.reply.text}")
        metrics.STS_TESTING_FAILURES.inc()
    return await attempt(peer, enforced, session)


def unlisted(peer: Peer, policy: Policy) -> Peer:
    """RFC 8461 §5: note an MX host that an MTA-STS policy in testing mode does not list."""
    if policy.allows(peer.mx or ""):
        return peer
    metrics.STS_TESTING_FAILURES.inc()
    return peer.noting(f"MTA-STS testing: {peer.mx} is not an MX host the policy lists")


def reused(peer: Peer, policy: Policy) -> Peer:
    """Under a policy in testing mode, note what enforce would refuse of a reused session."""
    if not policy.testing:
        return peer
    peer = unlisted(peer, policy)
    if peer.verified:
        return peer
    metrics.STS_TESTING_FAILURES.inc()
    return peer.noting(f"MTA-STS testing: the session to {peer.where} is not verified")


def configured_mode(policies: Sequence[tuple[str, str]], domain: str) -> str | None:
    """The mode delivery.tls.policies sets for domain: an exact key wins; a key with a leading
    dot matches that domain and its subdomains, the longest such key winning."""
    exact = [mode for key, mode in policies if key == domain]
    if exact:
        return exact[0]
    suffixes = [
        (len(key), mode) for key, mode in policies
        if key.startswith(".") and (domain == key[1:] or domain.endswith(key))
    ]  # fmt: skip
    return max(suffixes, key=lambda found: found[0])[1] if suffixes else None


def verifying_context(ca_file: Path | None) -> ssl.SSLContext:
    """A client context that verifies the chain and the host name against the system's CAs
    plus ca_file (RFC 8461 §4.2; the verify mode)."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
