"""The bounces section: its defaults (the example file says the same), its values, and one-line
errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import Config, ConfigError, load, parse
from relay.config.bounces import BouncesConfig

ROOT = Path(__file__).resolve().parents[3]


def test_defaults_and_the_example_file() -> None:
    assert Config().bounces == BouncesConfig(True, 262144, "", None)
    assert load(ROOT / "conf" / "relay.yaml").bounces == Config().bounces


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{enabled: false}", BouncesConfig(enabled=False)),
        ("{max_returned: 0}", BouncesConfig(max_returned=0)),
        ("{postmaster: postmaster@relay.example}", BouncesConfig(postmaster="postmaster@relay.example")),
        ("{postmaster: null}", BouncesConfig()),
        ("{delay_warning: 4h}", BouncesConfig(delay_warning=14400.0)),
        ("{delay_warning: ''}", BouncesConfig()),
    ],
)  # fmt: skip
def test_values(text: str, expected: BouncesConfig) -> None:
    assert parse(f"bounces: {text}").bounces == expected


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("{enabled: yes please}", "bounces.enabled: 'yes please' is not true or false"),
        ("{max_returned: 1.5}", "bounces.max_returned: 1.5 is not an integer of 0 or more"),
        ("{postmaster: root}", "bounces.postmaster: 'root' is not an address (local@domain)"),
        ("{delay_warning: soon}", "bounces.delay_warning: 'soon' is not a duration"),
        ("{delay_warning: 0.5s}", "bounces.delay_warning: '0.5s' is shorter than 1s"),
        ("{warn: 4h}", "bounces.warn: unknown key (known: enabled, max_returned, postmaster,"),
    ],
)
def test_errors_name_the_key(text: str, error: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(f"bounces: {text}")
    assert str(info.value).startswith(error), str(info.value)
