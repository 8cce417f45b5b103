"""Schemathesis against `python -m server` on the tiny model: every operation of /openapi.json.

The server runs as users run it (default dtype), with inference and admin keys; requests carry
the admin key, so admin routes are fuzzed too. Generated requests are mixed with realistic ones
(the served model names, real messages, an image, adapter loads and uploads) so that calls reach
the engine and not only the validation layer; token counts are capped to keep it fast.

Checks: no 5xx, every status, content type and body documented. Run time: the examples and
coverage phases (deterministic) plus MAX_EXAMPLES generated cases per operation.
"""

from __future__ import annotations

import base64
import io
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from urllib3.filepost import encode_multipart_formdata

from adapters.sources import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from server.app import create_app
from server.settings import Settings
from server.testbed.default_model import DefaultModel
from tests.live_server import free_port, kill_tree, server_command
from tests.media import seeded_image

ADMIN_KEY = "fuzz-admin-key"
INFERENCE_KEY = "fuzz-inference-key"
BASE = "tiny-gemma4"
MODELS = [BASE, "demo-attn", "demo-mlp", "demo-all"]
MAX_TOKENS = 4
MAX_N = 2
# Generated cases per operation in the fuzzing phase. The examples and coverage phases come on
# top (about 1,000 requests, most answered 400 before the engine), and they dominate the time:
# the module took ~3.5 min with its server's start-up (2 cores, load average ~15 from other jobs).
MAX_EXAMPLES = 6
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
INFERENCE_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/responses"}
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
UPLOAD_PLACEHOLDER = b"demo-mlp:"

# (method, path) -> statuses seen; read by the last test, so the run cannot pass vacuously.
SEEN: dict[tuple[str, str], Counter[int]] = {}


def _png_data_url() -> str:
    buffer = io.BytesIO()
    seeded_image(size=32).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


IMAGE = _png_data_url()
MESSAGES: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Tell me about the river."}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "And then?"}]},
    ],
    [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": IMAGE}},
                {"type": "text", "text": "What is in this picture?"},
            ],
        }
    ],
]


def _chat_bodies() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"model": st.sampled_from(MODELS), "messages": st.sampled_from(MESSAGES)},
        optional={
            "max_tokens": st.integers(1, MAX_TOKENS),
            "stream": st.booleans(),
            "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
            "temperature": st.floats(0, 2),
            "top_p": st.floats(0.1, 1),
            "top_k": st.integers(-1, 50),
            "n": st.integers(1, MAX_N),
            "seed": st.integers(0, 2**31),
            "stop": st.sampled_from(["\n", ["the", "a"]]),
            "logprobs": st.just(True),
            "top_logprobs": st.integers(0, 5),
            "presence_penalty": st.floats(-2, 2),
            "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
        },
    )


def _completion_bodies() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "model": st.sampled_from(MODELS),
            "prompt": st.sampled_from(["Once upon a time", ["One", "Two"]]),
        },
        optional={
            "max_tokens": st.integers(1, MAX_TOKENS),
            "stream": st.booleans(),
            "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
            "temperature": st.floats(0, 2),
            "n": st.integers(1, MAX_N),
            "logprobs": st.integers(0, 5),
            "seed": st.integers(0, 2**31),
        },
    )


RESPONSE_INPUTS: list[Any] = [
    "Tell me about the river.",
    [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
    ],
    [
        {
            "role": "user",
            "content": [
                {"type": "input_image", "image_url": IMAGE},
                {"type": "input_text", "text": "What is in this picture?"},
            ],
        }
    ],
]
RESPONSE_TOOL = {
    "type": "function",
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 8}},
        "required": ["city"],
    },
}


def _response_bodies() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"model": st.sampled_from(MODELS), "input": st.sampled_from(RESPONSE_INPUTS)},
        optional={
            "max_output_tokens": st.integers(1, MAX_TOKENS),
            "stream": st.booleans(),
            "store": st.booleans(),
            "instructions": st.sampled_from(["Answer briefly.", ""]),
            "temperature": st.floats(0, 2),
            "top_p": st.floats(0.1, 1),
            "tools": st.just([RESPONSE_TOOL]),
            "tool_choice": st.sampled_from(["auto", "required", "none"]),
            "reasoning": st.fixed_dictionaries({"effort": st.sampled_from(["none", "high"])}),
            "text": st.sampled_from(
                [{"format": {"type": "text"}}, {"format": {"type": "json_object"}}]
            ),
        },
    )


def _realistic_examples() -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Cases that must reach the engine or change the registry, per operation."""
    chat = {"model": "demo-attn", "messages": MESSAGES[0], "max_tokens": MAX_TOKENS}
    completion = {"model": "demo-mlp", "prompt": "Once upon a time", "max_tokens": MAX_TOKENS}
    return {
        ("POST", "/v1/chat/completions"): [
            {"body": chat},
            {"body": {**chat, "model": BASE, "stream": True}},
            {"body": {**chat, "messages": MESSAGES[2]}},
        ],
        ("POST", "/v1/completions"): [
            {"body": completion},
            {"body": {**completion, "stream": True, "stream_options": {"include_usage": True}}},
        ],
        ("POST", "/v1/responses"): [
            {"body": {"model": "demo-mlp", "input": RESPONSE_INPUTS[0], "max_output_tokens": 4}},
            {"body": {"model": BASE, "input": RESPONSE_INPUTS[1], "stream": True}},
            {"body": {"model": "demo-all", "input": RESPONSE_INPUTS[2], "tools": [RESPONSE_TOOL]}},
        ],
        ("GET", "/v1/models/{model_id}"): [{"path_parameters": {"model_id": "demo-all"}}],
        ("GET", "/v1/adapters/{name}"): [{"path_parameters": {"name": "demo-mlp"}}],
        ("POST", "/v1/adapters"): [
            {"body": {"name": "fuzz-attn", "path": "demo-attn", "replace": True}},
            {
                "body": {
                    "name": "fuzz-upload",
                    "replace": "true",
                    # Filled in with the demo adapter's files by `_fill_upload`.
                    ADAPTER_CONFIG: UPLOAD_PLACEHOLDER + ADAPTER_CONFIG.encode(),
                    ADAPTER_WEIGHTS: UPLOAD_PLACEHOLDER + ADAPTER_WEIGHTS.encode(),
                },
                "media_type": "multipart/form-data",
            },
        ],
        ("DELETE", "/v1/adapters/{name}"): [{"path_parameters": {"name": "fuzz-upload"}}],
        ("POST", "/v1/load_lora_adapter"): [
            {"body": {"lora_name": "fuzz-mlp", "lora_path": "demo-mlp", "load_inplace": True}}
        ],
        ("POST", "/v1/unload_lora_adapter"): [{"body": {"lora_name": "fuzz-mlp"}}],
    }


def _realistic_inference(case: schemathesis.Case) -> None:
    """Keep generated inference requests short (a few tokens, at most MAX_N choices), and send
    the valid ones to a served model, so the coverage phase's boundary values reach the engine."""
    body = case.body
    if not isinstance(body, dict):
        return
    meta = case.meta
    positive = meta is not None and meta.generation.mode is schemathesis.GenerationMode.POSITIVE
    if positive and body.get("model") not in MODELS:
        body["model"] = MODELS[sum(map(ord, str(body.get("model")))) % len(MODELS)]
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
            body[key] = MAX_TOKENS
    if case.operation.path == "/v1/responses":
        if body.get("max_output_tokens") is None:
            body["max_output_tokens"] = MAX_TOKENS
    elif body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_TOKENS
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > MAX_N:
        body["n"] = MAX_N


def _fill_upload(case: schemathesis.Case, adapters_dir: Path) -> None:
    """Make the upload example a real upload of the demo adapter `demo-mlp`, its files sent
    with file names as clients send them (generated multipart parts carry no file name)."""
    body = case.body
    if not isinstance(body, dict) or not any(
        isinstance(value, bytes) and value.startswith(UPLOAD_PLACEHOLDER) for value in body.values()
    ):
        return
    fields: dict[str, Any] = {}
    for key, value in body.items():
        if isinstance(value, bytes) and value.startswith(UPLOAD_PLACEHOLDER):
            name = value.removeprefix(UPLOAD_PLACEHOLDER).decode()
            fields[key] = (name, (adapters_dir / "demo-mlp" / name).read_bytes())
        else:
            fields[key] = value
    case.body, content_type = encode_multipart_formdata(fields)
    case.headers = {**(case.headers or {}), "Content-Type": content_type}


@pytest.fixture(scope="module")
def fuzz_server(tiny: DefaultModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m server` with both kinds of key and the demo adapters as an adapter root."""
    state = tmp_path_factory.mktemp("fuzz-state")
    port = free_port()
    flags = [
        *("--admin-keys", ADMIN_KEY, "--api-keys", INFERENCE_KEY),
        *("--adapter-roots", str(tiny.adapters_dir), "--state-dir", str(state)),
        *("--max-loras", "3", "--max-num-seqs", "16"),
    ]
    process = subprocess.Popen(server_command(tiny.model_dir.parent, port, *flags))
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            assert process.poll() is None, "the server exited while starting"
            try:
                if httpx.get(f"{base_url}/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            raise TimeoutError("the fuzzing server did not get ready")
        yield base_url
    finally:
        kill_tree(process)


# The document is generated in-process at collection time (no engine needed); the last test
# checks that the running server serves the same one.
DOCUMENT = create_app(Settings()).openapi()
CONFIG = schemathesis.Config()
# Every request carries the admin key (it also works for inference), not a generated token.
CONFIG.projects.default.update(headers=dict(AUTH))
CONFIG.projects.default.generation.update(with_security_parameters=False)
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG)
EXAMPLES = _realistic_examples()


@schema.hook
def before_add_examples(context: schemathesis.HookContext, cases: list[Any]) -> None:
    operation = context.operation
    assert operation is not None
    for example in EXAMPLES.get((operation.method.upper(), operation.path), []):
        if "body" in example:
            example = {"media_type": "application/json", **example}
        cases.append(operation.Case(headers=dict(AUTH), **example))


@schema.hook
def before_generate_body(
    context: schemathesis.HookContext, strategy: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    path = context.operation.path if context.operation is not None else ""
    if path == "/v1/chat/completions":
        return st.one_of(strategy, _chat_bodies())
    if path == "/v1/completions":
        return st.one_of(strategy, _completion_bodies())
    if path == "/v1/responses":
        return st.one_of(strategy, _response_bodies())
    return strategy


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_as_documented(
    case: schemathesis.Case, fuzz_server: str, tiny: DefaultModel
) -> None:
    if case.operation.path in INFERENCE_PATHS:
        _realistic_inference(case)
    _fill_upload(case, tiny.adapters_dir)
    response = case.call(base_url=fuzz_server, timeout=120)
    key = (case.operation.method.upper(), case.operation.path)
    SEEN.setdefault(key, Counter())[response.status_code] += 1
    case.validate_response(response, checks=CHECKS)


def test_the_fuzzing_reached_every_operation_and_the_engine(fuzz_server: str) -> None:
    """Not vacuous: every operation was called, and requests got real answers from the engine."""
    assert httpx.get(f"{fuzz_server}/openapi.json").json() == DOCUMENT
    operations = {
        (result.ok().method.upper(), result.ok().path) for result in schema.get_all_operations()
    }
    assert len(operations) == 17
    assert set(SEEN) == operations, f"never called: {operations - set(SEEN)}"
    assert SEEN[("POST", "/v1/chat/completions")][200] >= 5
    assert SEEN[("POST", "/v1/completions")][200] >= 3
    assert SEEN[("POST", "/v1/responses")][200] >= 3
    assert SEEN[("POST", "/v1/adapters")][200] + SEEN[("POST", "/v1/adapters")][201] >= 2
    assert SEEN[("DELETE", "/v1/adapters/{name}")][200] >= 1
    assert SEEN[("POST", "/v1/unload_lora_adapter")][200] >= 1
    assert sum(sum(statuses.values()) for statuses in SEEN.values()) >= 17 * MAX_EXAMPLES
