"""Configuration, the suppression section: what the relay does with a recipient on its tenant's
suppression list, whether tenants share one list, and when hard bounces and repeated soft
bounces put an address on it by themselves (docs/suppression.md)."""

from __future__ import annotations

from dataclasses import dataclass

from relay.config.schema import option
from relay.config.values import boolean, choice, count, duration


@dataclass(frozen=True)
class SuppressionConfig:
    # reject: `550 5.7.1` at RCPT; accept: taken, then dropped with a `suppressed` event.
    action: str = option(choice("reject", "accept"), "reject")
    # One list for every tenant instead of one per tenant.
    shared: bool = option(boolean, False)
    # A hard bounce (invalid recipient, bad domain) suppresses its address this long.
    hard_bounce_for: float = option(duration, 30 * 86400.0)
    # This many temporary failures of an address (0: never) within on_hold_window, each at
    # least on_hold_spacing after the one counted before, put it on hold for on_hold_for.
    on_hold: int = option(count, 5)
    on_hold_window: float = option(duration, 30 * 86400.0)
    on_hold_spacing: float = option(duration, 3600.0)
    on_hold_for: float = option(duration, 72 * 3600.0)
