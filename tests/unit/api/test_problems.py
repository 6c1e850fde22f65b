"""Problem details (RFC 9457) for every error the API answers: no token, an unknown token, a
missing scope, an unknown path, a wrong method, and a failure of our own (503, logged, no
traceback); and the tenant a token carries to the handlers."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from relay.api import app
from relay.api.problems import Problem
from relay.api.spec import Answer, Route
from tests.unit.api.live import Answer as Reply
from tests.unit.api.live import Client, add_token, run

PROBLEM = "application/problem+json"


def assert_problem(reply: Reply, status: int, title: str, detail: str) -> None:
    assert reply.status == status
    assert reply.content_type == PROBLEM
    assert reply.body["type"] == "about:blank"
    assert reply.body["title"] == title
    assert reply.body["status"] == status
    assert detail in reply.body["detail"]


@pytest.mark.parametrize(
    ("method", "path", "token", "status", "title", "detail"),
    [
        ("GET", "/v1/ping", None, 401, "Unauthorized", "needs a header Authorization: Bearer"),
        ("GET", "/v1/ping", "relay_not-a-token", 401, "Unauthorized", "not known to this relay"),
        ("GET", "/v1/nothing-here", None, 401, "Unauthorized", "needs a header Authorization"),
        ("GET", "/v1", None, 401, "Unauthorized", "needs a header Authorization"),
        ("GET", "/v1/ping", "send-only", 403, "Forbidden", "token sender lacks the scope read (it has send)"),
        ("GET", "/v1/nothing-here", "reader", 404, "Not Found", "no such resource"),
        ("GET", "/index.php", None, 404, "Not Found", "see /v1/openapi.json"),
        ("GET", "/metrics", None, 404, "Not Found", "no such resource"),
        ("POST", "/v1/ping", "reader", 405, "Method Not Allowed", "POST is not allowed here (allowed: GET)"),
        ("DELETE", "/v1/openapi.json", None, 405, "Method Not Allowed", "DELETE is not allowed"),
    ],
)  # fmt: skip
def test_errors_are_problem_details(
    tmp_path: Path, method: str, path: str, token: str | None, status: int, title: str, detail: str
) -> None:
    file = tmp_path / "tokens"
    known = {
        "reader": add_token(file, "reader"),
        "send-only": add_token(file, "sender", None, "send"),
    }

    async def scenario(client: Client) -> Reply:
        return await client.call(method, path, known.get(token or "", token))

    assert_problem(run(file, scenario), status, title, detail)


def test_401_and_403_say_how_to_authenticate(tmp_path: Path) -> None:
    file = tmp_path / "tokens"
    sender = add_token(file, "sender", None, "send")

    async def scenario(client: Client) -> list[Reply]:
        return [
            await client.call("GET", "/v1/ping"),
            await client.call("GET", "/v1/ping", "wrong"),
            await client.call("GET", "/v1/ping", sender),
        ]

    missing, wrong, scope = run(file, scenario)
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert missing.body["field"] == "Authorization"
    assert wrong.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert scope.headers["WWW-Authenticate"] == 'Bearer error="insufficient_scope", scope="read"'
    assert scope.body["scope"] == "read"


def test_405_names_the_allowed_methods(tmp_path: Path) -> None:
    file = tmp_path / "tokens"
    reader = add_token(file, "reader")

    async def scenario(client: Client) -> Reply:
        return await client.call("PUT", "/v1/ping", reader)

    assert run(file, scenario).headers["Allow"] == "GET"


@pytest.mark.parametrize(
    ("tenant", "scopes"), [(None, "read"), ("acme", "read"), ("acme", "read,send,cancel")]
)
def test_the_request_carries_the_tokens_tenant(
    tmp_path: Path, tenant: str | None, scopes: str
) -> None:
    file = tmp_path / "tokens"
    token = add_token(file, "app", tenant, scopes)

    async def scenario(client: Client) -> Reply:
        return await client.call("GET", "/v1/ping", token)

    reply = run(file, scenario)
    assert (reply.status, reply.content_type) == (200, "application/json; charset=utf-8")
    assert reply.body == {"tenant": tenant}


async def boom(request: web.Request) -> web.Response:
    raise RuntimeError("/secret/path/in/a/traceback")


async def refuse(request: web.Request) -> web.Response:
    raise Problem(400, "to: 'x' is not an address", field="to")


EXTRA = (
    Route("GET", "/v1/boom", boom, "boom", "fails", "read", {200: Answer("never")}),
    Route("GET", "/v1/refuse", refuse, "refuse", "refuses", "read", {200: Answer("never")}),
)


def test_our_own_failure_is_a_503_logged_without_its_traceback(tmp_path: Path) -> None:
    file = tmp_path / "tokens"
    reader = add_token(file, "reader")

    async def scenario(client: Client) -> Reply:
        return await client.call("GET", "/v1/boom", reader)

    with capture_logs() as logged:
        reply = run(file, scenario, routes=(*app.ROUTES, *EXTRA))
    assert_problem(reply, 503, "Service Unavailable", "could not answer this request")
    assert "secret" not in str(reply.body) and "Traceback" not in str(reply.body)
    [error] = [e for e in logged if e["event"] == "error"]
    assert error["log_level"] == "error" and error["stage"] == "api"
    assert error["error"] == "RuntimeError: /secret/path/in/a/traceback"
    assert error["path"] == "/v1/boom"


def test_a_handler_names_the_field_at_fault(tmp_path: Path) -> None:
    file = tmp_path / "tokens"
    reader = add_token(file, "reader")

    async def scenario(client: Client) -> Reply:
        return await client.call("GET", "/v1/refuse", reader)

    reply = run(file, scenario, routes=(*app.ROUTES, *EXTRA))
    assert_problem(reply, 400, "Bad Request", "'x' is not an address")
    assert reply.body["field"] == "to"
