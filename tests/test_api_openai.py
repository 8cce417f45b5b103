"""The API through the official `openai` client on a real socket, against the real engine."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import pytest_asyncio
import soundfile
from openai.types.chat import ChatCompletionChunk

from server.engine.protocol import Prompt, Sampling
from server.engine.vllm_engine import VllmEngine
from server.inference.protocol import CompletionChunk
from server.testbed.default_model import DefaultModel
from tests.conftest import engine_settings
from tests.image_host import image_host
from tests.live_server import LiveServer, live_server
from tests.media import seeded_audio, seeded_image

BASE = "tiny-gemma4"
ADAPTERS = ["demo-all", "demo-attn", "demo-mlp", "demo-pirate", "demo-tools"]
MAX_TOKENS = 12


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def api(
    engine: VllmEngine, tiny: DefaultModel, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LiveServer]:
    settings = engine_settings(
        cache_dir=tiny.model_dir.parent,
        state_dir=tmp_path_factory.mktemp("api-state"),
        allow_remote_images=True,
        remote_image_timeout_seconds=1.0,
        max_image_bytes=2**20,
    )
    async with live_server(settings, engine, first_adapter_id=10_000) as server:
        yield server


def png_data_url() -> str:
    buffer = io.BytesIO()
    seeded_image().save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def wav_base64() -> str:
    buffer = io.BytesIO()
    soundfile.write(buffer, seeded_audio(), 16_000, format="WAV", subtype="FLOAT")
    return base64.b64encode(buffer.getvalue()).decode()


CONTENTS: dict[str, list[dict[str, object]]] = {
    "text": [{"type": "text", "text": "Tell me a story about a cat."}],
    "image": [
        {"type": "image_url", "image_url": {"url": png_data_url()}},
        {"type": "text", "text": "What is in this picture?"},
    ],
    "audio": [
        {"type": "input_audio", "input_audio": {"data": wav_base64(), "format": "wav"}},
        {"type": "text", "text": "What do you hear?"},
    ],
}


def messages(kind: str) -> list[dict[str, object]]:
    return [{"role": "user", "content": CONTENTS[kind]}]


async def bridge_text(engine: VllmEngine, api: LiveServer, kind: str, model: str) -> str:
    """What the engine bridge answers for the same conversation, rendered by the app's renderer."""
    services = api.app.state.services
    from server.inference.protocol import ChatMessage

    prompt: Prompt = await services.chat.renderer.render(
        [ChatMessage.model_validate(m) for m in messages(kind)]
    )
    lease = await services.adapters.acquire(model)
    pieces = []
    sampling = Sampling(max_tokens=MAX_TOKENS, temperature=0.0)
    async for chunk in engine.generate(f"bridge-{kind}-{model}", prompt, sampling, lease.adapter):
        pieces.extend(c.text for c in chunk.completions)
    lease.release()
    return "".join(pieces)


def async_client(api: LiveServer, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=api.v1, api_key=key, max_retries=0)


@pytest.mark.parametrize("kind", list(CONTENTS))
async def test_chat_routes_each_model_to_its_adapter(
    api: LiveServer, engine: VllmEngine, kind: str
) -> None:
    client = async_client(api)
    answers = {}
    for model in [BASE, *ADAPTERS]:
        reply = await client.chat.completions.create(
            model=model, messages=messages(kind), max_tokens=MAX_TOKENS, temperature=0
        )
        assert reply.model == model
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage is not None and reply.usage.completion_tokens > 0
        answers[model] = reply.choices[0].message.content
        assert answers[model] == await bridge_text(engine, api, kind, model)
    for adapter in ADAPTERS:
        assert answers[adapter] != answers[BASE], f"{adapter} answered like the base model"


@pytest.mark.parametrize("model", [BASE, "demo-all"])
async def test_sync_client_stream_joins_to_the_same_text(api: LiveServer, model: str) -> None:
    def call() -> tuple[str, str, list[str], object]:
        client = openai.OpenAI(base_url=api.v1, api_key="unused", max_retries=0)
        whole = client.chat.completions.create(
            model=model, messages=messages("image"), max_tokens=MAX_TOKENS, temperature=0
        )
        stream = client.chat.completions.create(
            model=model,
            messages=messages("image"),
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        roles = [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == MAX_TOKENS
        return whole.choices[0].message.content or "", text, roles, finish

    whole, streamed, roles, finish = await asyncio.to_thread(call)
    assert roles == ["assistant"]
    assert streamed == whole
    assert finish == "length"


async def raw_events_and_whole(
    api: LiveServer, path: str, body: dict[str, object]
) -> tuple[list[str], dict[str, Any]]:
    """The raw `data:` payloads of a streamed request (before [DONE]), and its whole answer."""
    async with httpx.AsyncClient(base_url=api.base_url, timeout=120) as http:
        async with http.stream("POST", path, json=body) as response:
            raw = (await response.aread()).decode()
        whole = (await http.post(path, json={**body, "stream": False})).json()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    return [event.removeprefix("data: ") for event in events[:-2]], whole


@pytest.mark.parametrize("logprobs", [False, True])
async def test_stream_events_are_the_openai_types_own_json(api: LiveServer, logprobs: bool) -> None:
    """Each raw event is byte for byte the `openai` chunk type's JSON of itself (the events are
    built from per-request templates, not through pydantic), and the text is the whole answer's."""
    body: dict[str, object] = {
        "model": "demo-all",
        "messages": messages("text"),
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logprobs": logprobs,
    }
    events, whole = await raw_events_and_whole(api, "/v1/chat/completions", body)
    texts = [""]
    for data in events:
        chunk = ChatCompletionChunk.model_validate_json(data)
        assert chunk.model_dump_json(exclude_unset=True) == data
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if not logprobs:
                assert choice.logprobs is None
            elif choice.delta.content:
                assert choice.logprobs is not None and choice.logprobs.content
    assert texts == [choice["message"]["content"] for choice in whole["choices"]]
    assert len(events) > 3  # the role, several content chunks, usage
    assert chunk.usage is not None and chunk.usage.completion_tokens == MAX_TOKENS


async def test_completions_stream_and_whole_agree(api: LiveServer) -> None:
    client = async_client(api)
    whole = await client.completions.create(
        model="demo-mlp", prompt=["Once upon a time", "Hello"], max_tokens=8, temperature=0
    )
    assert [c.index for c in whole.choices] == [0, 1]
    stream = await client.completions.create(
        model="demo-mlp",
        prompt="Once upon a time",
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    assert whole.usage is not None and whole.usage.completion_tokens == 16


@pytest.mark.parametrize("logprobs", [None, 2])
async def test_completion_stream_events_are_the_openai_types_own_json(
    api: LiveServer, logprobs: int | None
) -> None:
    """Each raw completion event is byte for byte the chunk type's JSON of itself (built from
    per-request templates), for two prompts (greedy: vLLM refuses `n` > 1 then), and the texts
    are the whole answer's."""
    body: dict[str, object] = {
        "model": "demo-mlp",
        "prompt": ["Once upon a time", 'A "quoted" prompt'],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logprobs": logprobs,
    }
    events, whole = await raw_events_and_whole(api, "/v1/completions", body)
    texts = [""] * 2
    for data in events:
        chunk = CompletionChunk.model_validate_json(data)
        assert chunk.model_dump_json(exclude_unset=True) == data
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            assert (choice.logprobs is None) == (logprobs is None)
    assert texts == [choice["text"] for choice in whole["choices"]]
    assert len(events) > 2 * 2  # several text chunks per completion, usage
    assert chunk.usage is not None and chunk.usage.completion_tokens == 2 * MAX_TOKENS


async def test_sampling_parameters_are_applied(api: LiveServer) -> None:
    client = async_client(api)
    common = {"model": "demo-attn", "messages": messages("text"), "max_tokens": 8}
    seeded = [
        (
            await client.chat.completions.create(
                **common, temperature=1.0, seed=7, top_p=0.9, extra_body={"top_k": 50}
            )
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
    many = await client.chat.completions.create(**common, n=3, temperature=1.0, seed=1)
    assert [c.index for c in many.choices] == [0, 1, 2]
    logprobs = await client.chat.completions.create(
        **common, temperature=0, logprobs=True, top_logprobs=3
    )
    content = logprobs.choices[0].logprobs.content
    assert len(content) == 8 and all(len(step.top_logprobs) == 3 for step in content)
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)
    stopped = await client.chat.completions.create(
        **common, temperature=0, stop=[logprobs.choices[0].message.content[2:5]]
    )
    assert stopped.choices[0].finish_reason == "stop"
    penalised = await client.chat.completions.create(
        **common, temperature=0, presence_penalty=2.0, frequency_penalty=2.0
    )
    assert penalised.choices[0].message.content is not None


# A JSON schema with an enum, a boolean and a bounded integer (also used by the Responses tests).
BALL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "size": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["color", "ok", "size"],
    "additionalProperties": False,
}


async def test_json_schema_response_validates(api: LiveServer) -> None:
    schema = BALL_SCHEMA
    reply = await async_client(api).chat.completions.create(
        model="demo-all",
        messages=messages("text"),
        max_tokens=60,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema},
        },
    )
    jsonschema.validate(json.loads(reply.choices[0].message.content or ""), schema)


async def test_json_object_response_parses(api: LiveServer) -> None:
    reply = await async_client(api).chat.completions.create(
        model="demo-mlp",
        messages=messages("text"),
        max_tokens=100,
        temperature=0,
        response_format={"type": "json_object"},
    )
    content = reply.choices[0].message.content or ""
    # A random model may not close its object within max_tokens; what it wrote is still JSON.
    assert content.startswith("{")
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)


async def test_concurrent_requests_each_get_their_adapter(api: LiveServer) -> None:
    client = async_client(api)
    models = [BASE, *ADAPTERS]

    async def ask(model: str) -> str:
        reply = await client.chat.completions.create(
            model=model, messages=messages("text"), max_tokens=MAX_TOKENS, temperature=0
        )
        return reply.choices[0].message.content or ""

    alone = {model: await ask(model) for model in models}
    mixed = [models[i % len(models)] for i in range(16)]
    answers = await asyncio.gather(*(ask(model) for model in mixed))
    for model, answer in zip(mixed, answers, strict=True):
        assert answer == alone[model], f"{model} answered differently in a mixed batch"


async def test_models_list_base_and_adapters(api: LiveServer) -> None:
    client = async_client(api)
    listed = {m.id: m for m in (await client.models.list()).data}
    assert set(listed) == {BASE, *ADAPTERS}
    for name in ADAPTERS:
        assert listed[name].model_extra == {"root": name, "parent": BASE}
    assert (await client.models.retrieve("demo-mlp")).id == "demo-mlp"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("missing")


async def test_request_ids_are_honoured_or_made(api: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=api.base_url) as http:
        given = await http.get("/v1/models", headers={"X-Request-Id": "trace-123"})
        made = await http.get("/v1/models")
    assert given.headers["x-request-id"] == "trace-123"
    assert len(made.headers["x-request-id"]) == 32


async def test_client_disconnect_aborts_the_engine_request(
    api: LiveServer, engine: VllmEngine
) -> None:
    body = {
        "model": "demo-all",
        "messages": messages("text"),
        "max_tokens": 900,
        "ignore_eos": True,
        "stream": True,
    }
    async with (
        httpx.AsyncClient(base_url=api.base_url, timeout=60) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = response.aiter_lines()
        while engine.running_request_count() == 0:
            await anext(lines)
        assert engine.running_request_count() == 1
    for _ in range(100):  # the server notices the closed socket within a few event-loop turns
        if engine.running_request_count() == 0:
            break
        await asyncio.sleep(0.05)
    assert engine.running_request_count() == 0


async def test_non_streaming_disconnect_aborts_too(
    api: LiveServer, engine: VllmEngine, caplog: pytest.LogCaptureFixture
) -> None:
    body = {"model": BASE, "messages": messages("text"), "max_tokens": 900, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=api.base_url, timeout=0.5) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/v1/chat/completions", json=body)
    for _ in range(100):
        if engine.running_request_count() == 0:
            break
        await asyncio.sleep(0.05)
    assert engine.running_request_count() == 0
    # A client going away is routine: an access line (499), not a traceback per disconnect.
    for _ in range(100):
        if any(" 499 " in record.getMessage() for record in caplog.records):
            break
        await asyncio.sleep(0.05)
    assert any(" 499 " in record.getMessage() for record in caplog.records)
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


async def test_image_urls_when_enabled(api: LiveServer) -> None:
    png = base64.b64decode(png_data_url().split(",", 1)[1])
    files = {"/cat.png": png, "/slow": png, "/huge.png": b"\x89PNG" + bytes(2 * 2**20)}
    client = async_client(api)

    async def ask(url: str) -> str:
        content = [{"type": "image_url", "image_url": {"url": url}}, CONTENTS["image"][1]]
        reply = await client.chat.completions.create(
            model="demo-all",
            messages=[{"role": "user", "content": content}],
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
        return reply.choices[0].message.content or ""

    with image_host(files) as host:
        assert await ask(f"{host}/cat.png") == await ask(png_data_url())
        with pytest.raises(openai.APIStatusError) as too_big:
            await ask(f"{host}/huge.png")
        assert too_big.value.status_code == 413
        with pytest.raises(openai.BadRequestError):
            await ask(f"{host}/slow")
        with pytest.raises(openai.BadRequestError):
            await ask(f"{host}/missing.png")
