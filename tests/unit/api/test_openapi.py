"""The OpenAPI 3.1 document: served without a token, valid (openapi-spec-validator), built from
the same routes the app serves, and true: every operation answers, with and without a token and
with one lacking its scope, a status it documents, in the content type and schema it
documents."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from relay.api import app, tokens
from relay.api.spec import document
from relay.history import ingest
from relay.history.store import History
from relay.spool.journal import Journal
from tests.unit.api.live import Answer, Client, add_token, run

Operation = tuple[str, str, dict[str, Any]]
MSG_ID = "0123456789abcdef0123"


def operations(doc: dict[str, Any]) -> list[Operation]:
    return [
        (method.upper(), path, op)
        for path, item in doc["paths"].items()
        for method, op in item.items()
    ]


def documented(doc: dict[str, Any], op: dict[str, Any], status: int) -> dict[str, Any]:
    """The response object op documents for status (its $ref followed)."""
    response = op["responses"].get(str(status))
    assert response is not None, f"{op['operationId']}: {status} is not documented"
    if "$ref" in response:
        response = doc["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    return dict(response)


def conforms(doc: dict[str, Any], op: dict[str, Any], answer: Answer) -> None:
    response = documented(doc, op, answer.status)
    [(content_type, media)] = response["content"].items()
    assert answer.content_type.split(";")[0] == content_type, op["operationId"]
    schema = {**media["schema"], "components": doc["components"]}
    Draft202012Validator(schema).validate(answer.body)
    for header in response.get("headers", {}):
        assert header in answer.headers, f"{op['operationId']}: {header} missing"


def test_the_document_is_valid_openapi_3_1_and_lists_every_route() -> None:
    doc = document(app.ROUTES)
    validate(doc)
    assert doc["openapi"].startswith("3.1")
    assert {(m, p) for m, p, _ in operations(doc)} == {(r.method, r.path) for r in app.ROUTES}


# Each operation's answer to a token with every scope, over a history of one delivered message
# of batch b1 (no scheduler runs: nothing pending is asked of it).
EXPECTED = {
    "cancelMessage": 409,
    "sendMessage": 400,  # nothing pending; no body
    "addSuppression": 400,
    "deleteSuppression": 400,
}  # no body; no address


def history_of_one(path: Path) -> History:
    writer = Journal(path / "events", "scheduler", path)
    base = {"id": MSG_ID, "tenant": "default", "batch_id": "b1", "sender": "app@sender.test"}
    writer.append([
        {**base, "event": "received", "status": "queued", "rcpts": ["a@a.test"], "size": 10,
         "lane": "normal", "send_at": None},
        {**base, "event": "delivered", "status": "delivered", "rcpt": "a@a.test", "attempt": 1,
         "reply": "250 2.0.0 ok", "code": 250, "enhanced": "2.0.0", "mx": "mx.a.test",
         "ip": "127.0.0.2", "tls": False},
    ])  # fmt: skip
    writer.close()
    history = History(path / "history.sqlite")
    ingest.catch_up(history, path / "events")
    return history


def test_the_api_answers_as_its_document_says(tmp_path: Path) -> None:
    file = tmp_path / "tokens"
    full = add_token(file, "full", None, ",".join(tokens.SCOPES))
    history = history_of_one(tmp_path)

    async def scenario(client: Client) -> tuple[Answer, list[tuple[Operation, list[Answer]]]]:
        served = await client.call("GET", "/v1/openapi.json")
        calls = []
        for method, template, op in operations(served.body):
            path = template.replace("{id}", "b1" if "batches" in template else MSG_ID)
            answers = [await client.call(method, path, full)]
            if "x-scope" in op:
                answers.append(await client.call(method, path))
                others = ",".join(s for s in tokens.SCOPES if s != op["x-scope"])
                name = f"without-{op['x-scope']}"
                answers.append(await client.call(method, path, add_token(file, name, None, others)))
            calls.append(((method, path, op), answers))
        return served, calls

    served, calls = run(file, scenario, history=history)
    assert served.status == 200 and served.body == document(app.ROUTES)
    assert calls, "the document lists no operation"
    for (_, _, op), answers in calls:
        first = EXPECTED.get(op["operationId"], 200)
        assert [a.status for a in answers] == ([first, 401, 403] if "x-scope" in op else [first])
        for answer in answers:
            conforms(served.body, op, answer)


# Errors of the messages and batches endpoints: (method, path asked, path documented, status).
ERRORS = [
    ("GET", "/v1/messages?limit=0", "/v1/messages", 400),
    ("GET", "/v1/messages?cursor=x", "/v1/messages", 400),
    ("GET", "/v1/messages/ffffffffffffffffffff", "/v1/messages/{id}", 404),
    ("DELETE", "/v1/messages/nope", "/v1/messages/{id}", 404),
    ("GET", "/v1/batches/unknown", "/v1/batches/{id}", 404),
    ("DELETE", "/v1/batches/unknown", "/v1/batches/{id}", 404),
]


def test_the_errors_are_as_documented(tmp_path: Path) -> None:
    file = tmp_path / "tokens"
    full = add_token(file, "full", None, ",".join(tokens.SCOPES))

    async def scenario(client: Client) -> list[Answer]:
        return [await client.call(method, path, full) for method, path, _, _ in ERRORS]

    answers = run(file, scenario, history=history_of_one(tmp_path))
    doc = document(app.ROUTES)
    for (method, _, template, status), answer in zip(ERRORS, answers, strict=True):
        assert answer.status == status, (method, template, answer.body)
        conforms(doc, doc["paths"][template][method.lower()], answer)
