"""The api section: the listener's default, "" turning the API off, the tokens file, one-line
errors naming the key, and api.listen among the keys a reload cannot change."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import Config, ConfigError, load, parse, restart_only_changes

ROOT = Path(__file__).resolve().parents[3]


def test_defaults_and_the_example_file() -> None:
    assert Config().api.listen == ("127.0.0.1", 8025)
    assert Config().api.tokens_file is None
    assert load(ROOT / "conf" / "relay.yaml").api == Config().api


@pytest.mark.parametrize(
    ("text", "listen", "tokens_file"),
    [
        ('api: {listen: ""}', None, None),
        ("api: {listen: null}", None, None),
        ('api: {listen: "[::1]:8080", tokens_file: /etc/relay/tokens}', ("::1", 8080), Path("/etc/relay/tokens")),
        ('api: {tokens_file: ""}', ("127.0.0.1", 8025), None),
    ],
)  # fmt: skip
def test_values(text: str, listen: tuple[str, int] | None, tokens_file: Path | None) -> None:
    api = parse(text).api
    assert (api.listen, api.tokens_file) == (listen, tokens_file)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("api: {listen: 8025}", "api.listen: 8025 is not host:port"),
        ('api: {listen: "127.0.0.1:0"}', "api.listen: 0 must be at least 1"),
        (
            "api: {tokens: x}",
            "api.tokens: unknown key (known: listen, tokens_file, max_streams_per_token)",
        ),
        ("api: {tokens_file: 5}", "api.tokens_file: 5 is not a path"),
        (
            'api: {listen: "127.0.0.1:9025"}',
            "api.listen: 127.0.0.1:9025 is another listener's address",
        ),
        (
            '{api: {listen: "127.0.0.1:25"}, smtp: {listen: ["127.0.0.1:25"]}}',
            "api.listen: 127.0.0.1:25 is another",
        ),
    ],
)
def test_errors_name_the_key(text: str, error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    assert str(caught.value).startswith(error)


def test_the_listener_needs_a_restart() -> None:
    old, new = parse(""), parse('api: {listen: "127.0.0.1:9000", tokens_file: /x}')
    assert restart_only_changes(old, new) == ["api.listen"]
