"""The OpenAPI document says what the routes really answer (no engine needed; the fuzz test in
test_openapi_fuzz.py checks it against the running server)."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
from openai.types.chat import ChatCompletionChunk

from server.app import create_app
from server.http.errors import NotFound, envelope, unexpected_error_body
from server.settings import Settings

DOCUMENT: dict[str, Any] = create_app(Settings()).openapi()
OPERATIONS = {
    (method.upper(), path): operation
    for path, operations in DOCUMENT["paths"].items()
    for method, operation in operations.items()
}
ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}


def _schema(ref_or_schema: dict[str, Any]) -> dict[str, Any]:
    """A validator-ready schema: the document's components as the root for `$ref`s."""
    return {**ref_or_schema, "components": DOCUMENT["components"]}


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for item in node for ref in _refs(item)]
    return []


def test_no_operation_declares_the_422_it_never_sends() -> None:
    assert all("422" not in op["responses"] for op in OPERATIONS.values())
    assert "HTTPValidationError" not in DOCUMENT["components"]["schemas"]


def test_every_reference_resolves() -> None:
    names = set(DOCUMENT["components"]["schemas"])
    assert {ref.removeprefix("#/components/schemas/") for ref in _refs(DOCUMENT)} <= names


@pytest.mark.parametrize(
    ("operation", "statuses"),
    [
        (("GET", "/health"), {"200", "503"}),
        (("GET", "/ready"), {"200", "503"}),
        (("GET", "/metrics"), {"200", "401", "403"}),
        (("GET", "/metrics/router"), {"200", "401", "403"}),
        (("GET", "/v1/models"), {"200", "401", "503"}),
        (("GET", "/v1/models/{model_id}"), {"200", "401", "404", "503"}),
        (
            ("POST", "/v1/chat/completions"),
            {"200", "400", "401", "404", "413", "500", "503"},
        ),
        (("POST", "/v1/completions"), {"200", "400", "401", "404", "413", "500", "503"}),
        (("POST", "/v1/responses"), {"200", "400", "401", "404", "413", "500", "503"}),
        (("GET", "/v1/responses/{response_id}"), {"200", "400", "401", "404", "503"}),
        (("DELETE", "/v1/responses/{response_id}"), {"200", "400", "401", "404", "503"}),
        (("GET", "/v1/adapters"), {"200", "400", "401", "403", "503"}),  # 400: bad `limit`
        (
            ("POST", "/v1/adapters"),
            {"200", "201", "400", "401", "403", "404", "409", "413", "503"},
        ),
        (("GET", "/v1/adapters/{name}"), {"200", "401", "403", "404", "503"}),
        (("DELETE", "/v1/adapters/{name}"), {"200", "401", "403", "404", "503"}),
        (
            ("POST", "/v1/load_lora_adapter"),
            {"200", "400", "401", "403", "404", "409", "413", "503"},
        ),
        (("POST", "/v1/unload_lora_adapter"), {"200", "400", "401", "403", "404", "413", "503"}),
    ],
)
def test_each_operation_declares_its_statuses(
    operation: tuple[str, str], statuses: set[str]
) -> None:
    responses = OPERATIONS[operation]["responses"]
    assert set(responses) == statuses
    for status in statuses - {"200", "201"}:
        if operation[1] not in ("/health", "/ready"):
            assert responses[status]["content"]["application/json"]["schema"] == ERROR_REF


def test_the_error_schema_is_the_envelope_sent() -> None:
    error_schema = _schema(ERROR_REF)
    jsonschema.validate(envelope(NotFound("no such model", param="model")), error_schema)
    jsonschema.validate(unexpected_error_body(), error_schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"detail": "Not Found"}, error_schema)  # FastAPI's own shape


def test_inference_answers_json_or_an_event_stream() -> None:
    for path, chunk in (
        ("/v1/chat/completions", "ChatCompletionChunk"),
        ("/v1/completions", "CompletionChunk"),
    ):
        content = OPERATIONS[("POST", path)]["responses"]["200"]["content"]
        assert set(content) == {"application/json", "text/event-stream"}
        data = content["text/event-stream"]["itemSchema"]["properties"]["data"]
        assert {"const": "[DONE]"} in data["anyOf"]
        assert f"#/components/schemas/{chunk}" in _refs(data)


def test_the_streamed_completion_chunk_allows_a_null_finish_reason() -> None:
    chunk = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "text": "a", "finish_reason": None, "logprobs": None}],
    }
    jsonschema.validate(chunk, _schema({"$ref": "#/components/schemas/CompletionChunk"}))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(chunk, _schema({"$ref": "#/components/schemas/Completion"}))
    first = ChatCompletionChunk.model_validate(
        {**chunk, "object": "chat.completion.chunk", "choices": []}
    )
    jsonschema.validate(
        first.model_dump(exclude_unset=True),
        _schema({"$ref": "#/components/schemas/ChatCompletionChunk"}),
    )


def test_adapter_loads_take_json_or_multipart_and_keys_are_bearer_tokens() -> None:
    body = OPERATIONS[("POST", "/v1/adapters")]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    form = body["multipart/form-data"]["schema"]["properties"]
    assert {"name", "archive", "adapter_config.json", "adapter_model.safetensors"} <= set(form)
    assert DOCUMENT["components"]["securitySchemes"]["BearerKey"]["scheme"] == "bearer"
    assert OPERATIONS[("GET", "/v1/adapters")]["security"] == [{"BearerKey": []}]
    # Inference and metrics need a key only when keys are configured.
    assert {} in OPERATIONS[("POST", "/v1/chat/completions")]["security"]


def test_responses_answer_json_or_named_events() -> None:
    content = OPERATIONS[("POST", "/v1/responses")]["responses"]["200"]["content"]
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/Response"}
    item = content["text/event-stream"]["itemSchema"]
    assert item["required"] == ["event", "data"]
    event_schema = _schema(item["properties"]["data"]["contentSchema"])
    # What the server sends validates; a chat chunk does not.
    done = {
        "type": "response.output_text.delta",
        "sequence_number": 3,
        "item_id": "msg_1",
        "output_index": 0,
        "content_index": 0,
        "delta": "Arr",
        "logprobs": [],
    }
    jsonschema.validate(done, event_schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"object": "chat.completion.chunk", "choices": []}, event_schema)
    deleted = OPERATIONS[("DELETE", "/v1/responses/{response_id}")]["responses"]["200"]
    jsonschema.validate(
        {"id": "resp_1", "object": "response", "deleted": True},
        _schema(deleted["content"]["application/json"]["schema"]),
    )
