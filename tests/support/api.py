"""The HTTP API as the tests use it: tokens made with `relay token add`, and problem details
checked as RFC 9457 says."""

from __future__ import annotations

from typing import Any

from tests.support.daemon import Relay

PROBLEM = "application/problem+json"


def add_token(daemon: Relay, name: str, *options: str) -> str:
    """`relay token add`: the token is stdout's only line."""
    done = daemon.cli("token", "add", name, *options)
    [token] = done.stdout.splitlines()
    assert f"token {name} added" in done.stderr and "shown only this once" in done.stderr
    return token


def assert_problem(answer: tuple[int, dict[str, str], Any], status: int, detail: str) -> None:
    code, headers, body = answer
    assert code == status and headers["Content-Type"] == PROBLEM
    assert body["status"] == status and body["type"] == "about:blank" and body["title"]
    assert detail in body["detail"]
