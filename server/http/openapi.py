"""What the OpenAPI document (`/openapi.json`) says each route answers, declared in one place.

Routers pass these dicts as `responses=`; `create_app` installs `service_openapi`. Every error
status a route can send is listed with OpenAI's error envelope, and FastAPI's 422 (this service
answers invalid input with 400) is left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.security import HTTPBearer
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

# One security scheme for both kinds of key: an admin key also works for inference.
bearer_key = HTTPBearer(
    auto_error=False,
    scheme_name="BearerKey",
    description="An inference key (`--api-keys`) or an admin key (`--admin-keys`); admin routes "
    "need an admin key, inference routes are open when no inference key is configured.",
)

# `openapi_extra` of routes that need a key only when keys are configured (an empty
# requirement makes the scheme optional).
KEY_OPTIONAL: dict[str, Any] = {"security": [{}]}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(BaseModel):
    """OpenAI's error envelope, the body of every error this service sends."""

    error: ErrorDetail


_WHEN = {
    400: "Invalid request: the message names the field (`param`)",
    401: "Missing or invalid key",
    403: "Not allowed with this key, or the admin API is off",
    404: "Unknown model or adapter",
    409: "The name is taken (send `replace`)",
    413: "A body, image, audio clip or adapter over its limit",
    500: "The engine failed on this request (a server fault; details in the server log)",
    503: "Not ready: starting, draining, or the engine stopped",
}

Responses = dict[int | str, dict[str, Any]]


def errors(*statuses: int) -> Responses:
    """`responses=` entries for these error statuses, each with the error envelope."""
    return {status: {"model": ErrorResponse, "description": _WHEN[status]} for status in statuses}


# Statuses every route of a kind can send, whatever the route does.
INFERENCE_ROUTE = errors(401, 503)  # inference key (when keys are configured), engine ready
ADMIN_ROUTE = errors(401, 403, 503)
BODY = errors(400, 413)  # a route that reads a body: invalid, or over --max-request-bytes


_REF = "#/components/schemas/"


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF + model.__name__}


def _sse(chunk: type[BaseModel]) -> dict[str, Any]:
    """A `text/event-stream` entry: `data: <chunk JSON>` events, then `data: [DONE]`.

    A failure after the first byte arrives as an event holding the error envelope. Each event's
    schema is OpenAPI 3.2's `itemSchema` for event streams, as FastAPI writes for its SSE routes.
    """
    json_event = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [_ref(chunk), _ref(ErrorResponse)]},
    }
    return {
        "itemSchema": {
            "type": "object",
            "required": ["data"],
            "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_event]}},
        },
    }


def json_or_sse(answer: type[BaseModel], chunk: type[BaseModel]) -> Responses:
    """The 200 of an inference route: one JSON answer, or with `stream` an event stream."""
    return {
        200: {
            "description": "The answer; with `stream: true`, server-sent events",
            "content": {
                "application/json": {"schema": _ref(answer)},
                "text/event-stream": _sse(chunk),
            },
        }
    }


def json_answer(answer: type[BaseModel], description: str) -> Responses:
    """The 200 of a route answering one JSON object built from `answer` (a model no route
    names as `response_model`; list it among `service_openapi`'s models)."""
    return {
        200: {"description": description, "content": {"application/json": {"schema": _ref(answer)}}}
    }


def json_or_events(answer: type[BaseModel], event: type[BaseModel]) -> Responses:
    """The 200 of the Responses API: one JSON answer, or with `stream` named events
    (`event: <type>`, `data: <event JSON>`), with no `[DONE]` at the end."""
    item = {
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"type": "string"},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": _ref(event),
            },
        },
    }
    return {
        200: {
            "description": "The response; with `stream: true`, server-sent events",
            "content": {
                "application/json": {"schema": _ref(answer)},
                "text/event-stream": {"itemSchema": item},
            },
        }
    }


def _without_validation_422(document: dict[str, Any]) -> dict[str, Any]:
    """Drop the 422 FastAPI adds to every route with parameters: this service never sends it.

    FastAPI has no switch for it (it leaves it out only when a route declares 422 or a 4XX or
    default response itself); the validation handler answers 400, which the routes declare.
    """
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    return document


def _add_schemas(document: dict[str, Any], models: Sequence[type[BaseModel]]) -> None:
    """Add models no route names as its `response_model` (answers built from `openai` types, and
    stream chunks), generated in one pass so nested models sharing a name stay apart."""
    refs, top = models_json_schema(
        [(model, "serialization") for model in models], ref_template=_REF + "{model}"
    )
    for model in models:
        if refs[(model, "serialization")] != _ref(model):
            raise RuntimeError(f"{model.__name__} is not named so in the OpenAPI document")
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in top.get("$defs", {}).items():
        if schemas.setdefault(name, schema) != schema:
            raise RuntimeError(f"two different schemas are named {name} in the OpenAPI document")


def service_openapi(app: FastAPI, models: Sequence[type[BaseModel]]) -> None:
    """Serve the document FastAPI generates, less the unsent 422, plus the schemas of `models`
    (those `json_or_sse` names)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            _add_schemas(document, [*models, ErrorResponse])
            app.openapi_schema = _without_validation_422(document)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
