"""The idempotency section: the window's default, its values, and one-line errors naming the key
(a window under a second, or longer than events.retention that keys are rebuilt from)."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import Config, ConfigError, load, parse

ROOT = Path(__file__).resolve().parents[3]


def test_default_and_the_example_file() -> None:
    assert Config().idempotency.window == 86400.0
    assert load(ROOT / "conf" / "relay.yaml").idempotency == Config().idempotency


@pytest.mark.parametrize(("text", "window"), [("{window: 2s}", 2.0), ("{window: 7d}", 604800.0)])
def test_values(text: str, window: float) -> None:
    assert parse(f"idempotency: {text}").idempotency.window == window


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("idempotency: {window: 0}", "idempotency.window: 0 is shorter than 1s"),
        ("idempotency: {window: soon}", "idempotency.window: 'soon' is not a duration"),
        ("idempotency: {windows: 1h}", "idempotency.windows: unknown key (known: window)"),
        (
            "idempotency: {window: 8d}",
            "idempotency.window: longer than events.retention (keys are rebuilt from events)",
        ),
        ("{idempotency: {window: 2h}, events: {retention: 1h}}", "idempotency.window: longer"),
    ],
)
def test_errors_name_the_key(text: str, error: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text)
    assert error in str(info.value)
