"""API, the description: each endpoint is one Route (method, path, handler, scope, parameters,
answers), from which the app registers its handlers and /v1/openapi.json is built, so an
endpoint added to the routes is served and described at once (OpenAPI 3.1)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from relay.api.problems import CONTENT_TYPE as PROBLEM_TYPE

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Schema = dict[str, Any]
OPENAPI = "3.1.0"
PROBLEM = "#/components/schemas/Problem"


def ref(name: str) -> Schema:
    """A reference to one of the document's component schemas."""
    return {"$ref": f"#/components/schemas/{name}"}


SCHEMAS: dict[str, Schema] = {
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details, the body of every error",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string", "description": "a URI; about:blank: see status"},
            "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": "string", "description": "what is wrong, for a person"},
            "field": {"type": "string", "description": "the request field at fault"},
        },
    },
}
# The errors every endpoint may answer, by whether it needs a token.
ERRORS = {
    401: "no token, or not a known one (`WWW-Authenticate: Bearer`)",
    403: "the token lacks the endpoint's scope",
    503: "the relay could not answer (its own trouble); try again",
}


@dataclass(frozen=True)
class Answer:
    description: str
    schema: Schema | None = None  # of the body
    headers: Mapping[str, str] = field(default_factory=dict)  # name: description
    media: str = "application/json"  # the body's content type


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # aiohttp's syntax, which is OpenAPI's: /v1/messages/{id}
    handler: Handler
    operation_id: str
    summary: str
    scope: str | None  # the token scope it needs; None: no token
    answers: Mapping[int, Answer]  # its own answers, success and specific errors
    parameters: tuple[Schema, ...] = ()  # OpenAPI parameter objects
    body: Schema | None = None  # the JSON request body's schema
    schemas: Mapping[str, Schema] = field(default_factory=dict)  # for components.schemas

    def operation(self) -> Schema:
        answers = {str(k): response(v) for k, v in sorted(self.answers.items())}
        errors = (401, 403, 503) if self.scope else (503,)
        answers |= {
            str(s): {"$ref": f"#/components/responses/E{s}"}
            for s in errors
            if str(s) not in answers
        }
        out: Schema = {
            "operationId": self.operation_id,
            "summary": self.summary,
            "security": [{"bearer": []}] if self.scope else [],
            "responses": answers,
        }
        if self.scope:
            out["description"] = f"Needs a token with scope `{self.scope}`."
            out["x-scope"] = self.scope
        if self.parameters:
            out["parameters"] = list(self.parameters)
        if self.body is not None:
            out["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": self.body}},
            }
        return out


def response(answer: Answer) -> Schema:
    out: Schema = {"description": answer.description}
    if answer.schema is not None:
        is_problem = answer.schema.get("$ref") == PROBLEM
        out["content"] = {PROBLEM_TYPE if is_problem else answer.media: {
            "schema": answer.schema
        }}  # fmt: skip
    if answer.headers:
        out["headers"] = {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in answer.headers.items()
        }
    return out


def problem(description: str, **headers: str) -> Answer:
    """An error answer: problem details."""
    return Answer(description, {"$ref": PROBLEM}, headers)


def document(routes: tuple[Route, ...]) -> Schema:
    """The OpenAPI 3.1 description of routes."""
    paths: dict[str, Schema] = {}
    schemas = dict(SCHEMAS)
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = route.operation()
        schemas |= route.schemas
    errors = {f"E{s}": response(problem(text)) for s, text in ERRORS.items()}
    errors["E401"]["headers"] = {
        "WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}
    }
    return {
        "openapi": OPENAPI,
        "info": {
            "title": "relay HTTP API",
            "version": "1",
            "description": "Tokens: `relay token add`. Errors: RFC 9457 problem details. "
            "Times: UTC, ISO 8601.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": errors,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
