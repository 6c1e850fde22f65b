"""API tokens: the file's lines and their errors, the scopes, a new token's shape, the file kept
0600 and hashed, and the running API's view of it following every change (no restart)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from relay.api import tokens
from tests.unit.api.live import Client, add_token, run

DIGEST = "a" * 64


@pytest.mark.parametrize(
    ("line", "tenant", "scopes"),
    [
        (f"app:{DIGEST}:*:read,send,cancel:2026-12-01T15:00:00Z", None, ("read", "send", "cancel")),
        (f"app:{DIGEST}:acme:read:2026-12-01T15:00:00Z", "acme", ("read",)),
        (f"a.b@c+d-e:{DIGEST}:user@x.test:cancel,read:2026-12-01T15:00:00Z", "user@x.test", ("read", "cancel")),
    ],
)  # fmt: skip
def test_a_line_of_the_file(line: str, tenant: str | None, scopes: tuple[str, ...]) -> None:
    token = tokens.parse_line(line, "tokens:1")
    assert (token.digest, token.tenant, token.scopes) == (DIGEST, tenant, scopes)
    assert token.created == "2026-12-01T15:00:00Z"
    assert token.line() == line.replace("cancel,read", "read,cancel")


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("app", "tokens:1: expected name:sha256:tenant:scopes:created"),
        (f"app:{DIGEST}:*:read", "tokens:1: expected name:sha256:tenant:scopes:created"),
        (f"a pp:{DIGEST}:*:read:2026-12-01T15:00:00Z", "tokens:1: expected name:sha256"),
        ("app:secret:*:read:2026-12-01T15:00:00Z", "tokens:1: expected name:sha256"),
        (f"app:{DIGEST.upper()}:*:read:2026-12-01T15:00:00Z", "tokens:1: expected name:sha256"),
        (f"app:{DIGEST}:a b:read:2026-12-01T15:00:00Z", "tokens:1: 'a b' is not a tenant"),
        (f"app:{DIGEST}:*:write:2026-12-01T15:00:00Z", "tokens:1: 'write' is not a scope (known: read, send, cancel)"),
        (f"app:{DIGEST}:*::2026-12-01T15:00:00Z", "tokens:1: give at least one scope"),
        (f"app:{DIGEST}:*:read:yesterday", "tokens:1: 'yesterday' is not a UTC time"),
    ],
)  # fmt: skip
def test_a_bad_line_is_named(line: str, error: str) -> None:
    with pytest.raises(tokens.TokensError) as caught:
        tokens.parse_line(line, "tokens:1")
    assert str(caught.value).startswith(error)


@pytest.mark.parametrize(
    ("text", "scopes"),
    [("read", ("read",)), ("send, read", ("read", "send")), ("cancel,send,read,read", ("read", "send", "cancel"))],
)  # fmt: skip
def test_scopes_are_kept_in_one_order(text: str, scopes: tuple[str, ...]) -> None:
    assert tokens.parse_scopes(text) == scopes


def test_a_new_token_is_random_prefixed_and_stored_as_its_sha256() -> None:
    record, secret = tokens.new("app", "acme", ("read",))
    other, second = tokens.new("app", "acme", ("read",))
    assert secret.startswith("relay_") and len(secret) >= len("relay_") + 43  # 32 bytes
    assert secret != second and record.digest != other.digest
    assert record.digest == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in record.line()


def test_the_file_is_private_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    secret = add_token(path, "app", "acme", "read,send")
    add_token(path, "ops", None, "cancel")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert secret not in path.read_text()
    table = tokens.load(path)
    assert sorted(table) == ["app", "ops"]
    assert table["ops"].tenant is None and table["app"].scopes == ("read", "send")
    assert [p.name for p in tmp_path.iterdir()] == ["tokens"]  # no temporary file left
    assert tokens.load(tmp_path / "missing") == {}


def test_a_bad_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# comment\n\napp:{DIGEST}:*:read:2026-12-01T15:00:00Z\nbroken\n")
    with pytest.raises(tokens.TokensError, match=rf"^{path}:4: expected name:sha256"):
        tokens.load(path)


def test_the_running_api_follows_the_file(tmp_path: Path) -> None:
    """Added, deleted, replaced by a broken file (the last good table stays): each change is
    seen at the next request, as `relay token` makes it on a running daemon."""
    path = tmp_path / "tokens"
    first = add_token(path, "first")

    async def scenario(client: Client) -> list[int]:
        seen = [(await client.call("GET", "/v1/ping", first)).status]
        second = add_token(path, "second")
        seen.append((await client.call("GET", "/v1/ping", second)).status)
        table = tokens.load(path)
        del table["first"]
        tokens.save(path, table)
        seen.append((await client.call("GET", "/v1/ping", first)).status)
        good = path.read_text()
        path.write_text(good + "broken\n")
        seen.append((await client.call("GET", "/v1/ping", second)).status)
        os.unlink(path)
        seen.append((await client.call("GET", "/v1/ping", second)).status)
        return seen

    assert run(path, scenario) == [200, 200, 401, 200, 401]
