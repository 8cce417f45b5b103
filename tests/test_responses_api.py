"""The Responses API (`/v1/responses`) through the official `openai` client, on the real engine.

Base model and adapters: the trained `demo-pirate` answers with its pirate sentence and the
trained `demo-tools` calls `get_weather` and then uses the result, so routing and tool history
are observable. Images, audio and tools go through the chat completions core: the same request
as chat answers the same tokens.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import openai
import pytest
import pytest_asyncio

from server.engine.vllm_engine import VllmEngine
from server.testbed.default_model import DefaultModel
from server.testbed.demo_training import PIRATE_REPLY, WEATHER_TOOLS
from tests.conftest import engine_settings
from tests.live_server import LiveServer, live_server
from tests.test_api_openai import BALL_SCHEMA, CONTENTS, png_data_url, wav_base64

BASE = "tiny-gemma4"
QUESTION = "What is the weather in Paris?"
# Responses' flat function tools, the same as the chat tools demo-tools was trained with.
TOOLS: list[Any] = [{"type": "function", **tool["function"]} for tool in WEATHER_TOOLS]
SCHEMAS = {tool["name"]: tool["parameters"] for tool in TOOLS}
GREEDY: dict[str, Any] = {"temperature": 0, "max_output_tokens": 40}
# For forced calls: short strings, so that a random model's call ends within the token budget.
FORCED_TOOLS: list[Any] = [
    {
        **tool,
        "parameters": {
            **tool["parameters"],
            "properties": {"city": {"type": "string", "maxLength": 10}},
        },
    }
    for tool in TOOLS
]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def api(
    engine: VllmEngine, tiny: DefaultModel, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LiveServer]:
    settings = engine_settings(
        cache_dir=tiny.model_dir.parent,
        state_dir=tmp_path_factory.mktemp("responses-state"),
        responses_store_size=4,
    )
    async with live_server(settings, engine, first_adapter_id=30_000) as server:
        yield server


def client(api: LiveServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=api.v1, api_key="unused", max_retries=0)


async def streamed(api: LiveServer, **fields: Any) -> tuple[list[Any], Any]:
    """Every event of `responses.stream`, and the final response: the one the helper
    assembles when completed, else the one `response.incomplete` carries."""
    async with client(api).responses.stream(**fields) as stream:
        events = [event async for event in stream]
        if events[-1].type == "response.completed":
            return events, await stream.get_final_response()
        assert events[-1].type == "response.incomplete"
        return events, events[-1].response


def calls(response: Any) -> list[tuple[str, dict[str, Any]]]:
    """The response's function calls, each schema-valid."""
    out = []
    for item in response.output:
        if item.type == "function_call":
            assert item.call_id and item.id and item.status == "completed"
            arguments = json.loads(item.arguments)
            jsonschema.validate(arguments, SCHEMAS[item.name])
            out.append((item.name, arguments))
    return out


async def test_adapters_answer_in_their_own_style(api: LiveServer) -> None:
    pirate = await client(api).responses.create(model="demo-pirate", input=QUESTION, **GREEDY)
    assert pirate.status == "completed" and pirate.object == "response"
    assert pirate.output_text == PIRATE_REPLY
    (message,) = pirate.output
    assert message.type == "message" and message.role == "assistant"
    assert pirate.usage is not None and pirate.usage.output_tokens > 0
    assert pirate.usage.total_tokens == pirate.usage.input_tokens + pirate.usage.output_tokens
    assert pirate.model == "demo-pirate"
    base = await client(api).responses.create(model=BASE, input=QUESTION, **GREEDY)
    assert base.output_text != PIRATE_REPLY and base.model == BASE
    # The same request as chat completions: the same prompt, the same greedy tokens.
    chat = await client(api).chat.completions.create(
        model="demo-pirate",
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=40,
    )
    assert chat.choices[0].message.content == pirate.output_text
    assert chat.usage is not None and chat.usage.prompt_tokens == pirate.usage.input_tokens


@pytest.mark.parametrize("model", [BASE, "demo-pirate", "demo-mlp"])
async def test_stream_equals_create(api: LiveServer, model: str) -> None:
    instructions = "You are a helpful assistant."  # as demo-pirate was trained, in part
    fields = {"model": model, "input": QUESTION, "instructions": instructions, **GREEDY}
    whole = await client(api).responses.create(**fields)
    events, final = await streamed(api, **fields)
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed" if whole.status == "completed" else "response.incomplete",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == whole.output_text != ""
    assert final.status == whole.status
    assert final.usage == whole.usage
    if model == "demo-pirate":
        assert whole.status == "completed" and whole.output_text == PIRATE_REPLY
    assert final.instructions == instructions


async def test_max_output_tokens_makes_it_incomplete(api: LiveServer) -> None:
    fields = {"model": "demo-pirate", "input": QUESTION, "max_output_tokens": 3, "temperature": 0}
    whole = await client(api).responses.create(**fields)
    assert whole.status == "incomplete"
    assert whole.incomplete_details is not None
    assert whole.incomplete_details.reason == "max_output_tokens"
    assert whole.usage is not None and whole.usage.output_tokens == 3
    assert whole.output[0].type == "message" and whole.output[0].status == "incomplete"
    # Streamed, it ends with `response.incomplete` (as OpenAI's does), not `response.completed`.
    async with client(api).responses.stream(**fields) as stream:
        events = [event async for event in stream]
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.status == "incomplete"
    assert events[-1].response.output_text == whole.output_text


@pytest.mark.parametrize("kind", ["image", "audio"])
async def test_images_and_audio_go_through_the_chat_core(api: LiveServer, kind: str) -> None:
    media = (
        {"type": "input_image", "image_url": png_data_url(), "detail": "auto"}
        if kind == "image"
        else {"type": "input_audio", "input_audio": {"data": wav_base64(), "format": "wav"}}
    )
    text = CONTENTS[kind][1]["text"]
    item = {"role": "user", "content": [media, {"type": "input_text", "text": text}]}
    response = await client(api).responses.create(model="demo-attn", input=[item], **GREEDY)
    chat = await client(api).chat.completions.create(
        model="demo-attn",
        messages=[{"role": "user", "content": CONTENTS[kind]}],  # type: ignore[misc]
        temperature=0,
        max_tokens=40,
    )
    assert response.usage is not None and chat.usage is not None
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    plain = await client(api).responses.create(model="demo-attn", input=text, max_output_tokens=1)
    assert plain.usage is not None and plain.usage.input_tokens < response.usage.input_tokens
    assert response.output_text == chat.choices[0].message.content


async def test_remote_images_are_refused_by_default(api: LiveServer) -> None:
    item = {
        "role": "user",
        "content": [{"type": "input_image", "image_url": "http://127.0.0.1:9/cat.png"}],
    }
    with pytest.raises(openai.BadRequestError) as raised:
        await client(api).responses.create(model=BASE, input=[item], max_output_tokens=4)
    body: Any = raised.value.body
    assert body["param"] == "input[0].content[0]"


@pytest.mark.parametrize("model", [BASE, "demo-all"])
async def test_required_and_named_tool_choices_always_call(api: LiveServer, model: str) -> None:
    for choice, allowed in (
        ("required", {"get_weather", "get_time"}),
        ({"type": "function", "name": "get_time"}, {"get_time"}),
    ):
        response = await client(api).responses.create(
            model=model,
            input=QUESTION,
            tools=FORCED_TOOLS,
            tool_choice=choice,  # type: ignore[arg-type]
            parallel_tool_calls=False,
            max_output_tokens=80,
        )
        found = calls(response)
        assert len(found) == 1 and found[0][0] in allowed, response.output
        assert response.status == "completed"


async def test_streamed_calls_equal_the_whole_answer(api: LiveServer) -> None:
    fields = {
        "model": BASE,
        "input": QUESTION,
        "tools": FORCED_TOOLS,
        "tool_choice": "required",
        "temperature": 0,
        "max_output_tokens": 80,
    }
    whole = await client(api).responses.create(**fields)
    events, final = await streamed(api, **fields)
    assert calls(final) == calls(whole) != []
    kinds = [event.type for event in events]
    assert "response.function_call_arguments.delta" in kinds
    assert "response.function_call_arguments.done" in kinds
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [json.loads(e.arguments) for e in done] == [args for _, args in calls(whole)]


async def test_demo_tools_calls_then_answers_with_the_result(api: LiveServer) -> None:
    """`tool_choice` auto: the trained adapter calls; its result comes back as
    `function_call_output`, by `previous_response_id` or with the whole history as input."""
    common: dict[str, Any] = {"model": "demo-tools", "tools": TOOLS, **GREEDY}
    first = await client(api).responses.create(input=QUESTION, **common)
    assert calls(first) == [("get_weather", {"city": "Paris"})]
    (call,) = [item for item in first.output if item.type == "function_call"]
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}
    chained = await client(api).responses.create(
        input=[result], previous_response_id=first.id, **common
    )
    assert chained.output_text == "The weather in Paris is sunny, 21 C."
    assert chained.previous_response_id == first.id
    history: list[Any] = [
        {"role": "user", "content": QUESTION},
        *[item.model_dump(exclude_none=True) for item in first.output],
        result,
    ]
    by_hand = await client(api).responses.create(input=history, store=False, **common)
    assert by_hand.output_text == chained.output_text
    # Streamed, the call arrives as function call events.
    events, final = await streamed(api, input=QUESTION, **common)
    assert calls(final) == calls(first)
    assert any(e.type == "response.function_call_arguments.done" for e in events)


async def test_stored_responses_can_be_read_deleted_and_are_bounded(api: LiveServer) -> None:
    first = await client(api).responses.create(model="demo-pirate", input="Hi", **GREEDY)
    again = await client(api).responses.retrieve(first.id)
    assert again.id == first.id and again.output_text == first.output_text
    await client(api).responses.delete(first.id)
    with pytest.raises(openai.NotFoundError) as raised:
        await client(api).responses.retrieve(first.id)
    body: Any = raised.value.body
    assert body["param"] == "response_id"
    with pytest.raises(openai.NotFoundError) as raised:
        await client(api).responses.create(
            model=BASE, input="Hi", previous_response_id=first.id, max_output_tokens=2
        )
    body = raised.value.body
    assert body["param"] == "previous_response_id" and body["code"] == 404
    not_kept = await client(api).responses.create(
        model=BASE, input="Hi", store=False, max_output_tokens=2
    )
    with pytest.raises(openai.NotFoundError):
        await client(api).responses.retrieve(not_kept.id)
    # The store holds 4 (the fixture's setting): a fifth response evicts the oldest.
    kept = [
        (await client(api).responses.create(model=BASE, input="Hi", max_output_tokens=2)).id
        for _ in range(5)
    ]
    with pytest.raises(openai.NotFoundError):
        await client(api).responses.retrieve(kept[0])
    assert (await client(api).responses.retrieve(kept[-1])).id == kept[-1]


async def test_json_schema_text_format(api: LiveServer) -> None:
    schema = BALL_SCHEMA
    story = CONTENTS["text"][0]["text"]
    response = await client(api).responses.create(
        model="demo-all",
        input=story,
        temperature=0,
        max_output_tokens=60,
        text={"format": {"type": "json_schema", "name": "ball", "schema": schema}},
    )
    jsonschema.validate(json.loads(response.output_text), schema)
    assert response.text is not None and response.text.format is not None
    assert response.text.format.type == "json_schema"
    # The same structured outputs as chat's response_format: the same greedy answer.
    chat = await client(api).chat.completions.create(
        model="demo-all",
        messages=[{"role": "user", "content": story}],
        temperature=0,
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "b", "schema": schema}},
    )
    assert chat.choices[0].message.content == response.output_text
    objected = await client(api).responses.create(
        model="demo-mlp",
        input=story,
        temperature=0,
        max_output_tokens=100,
        text={"format": {"type": "json_object"}},
    )
    # A random model may not close its object within the budget; what it wrote is JSON so far.
    assert objected.output_text.startswith("{")
    if objected.status == "completed":
        assert isinstance(json.loads(objected.output_text), dict)


async def test_reasoning_effort_turns_thinking_on(api: LiveServer) -> None:
    plain = await client(api).responses.create(model=BASE, input=QUESTION, max_output_tokens=1)
    thinking = await client(api).responses.create(
        model=BASE, input=QUESTION, max_output_tokens=1, reasoning={"effort": "high"}
    )
    off = await client(api).responses.create(
        model=BASE, input=QUESTION, max_output_tokens=1, reasoning={"effort": "none"}
    )
    assert plain.usage and thinking.usage and off.usage
    # <|think|> opens the system turn when thinking is on, as with chat's reasoning_effort.
    chat = await client(api).chat.completions.create(
        model=BASE,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=1,
        reasoning_effort="high",
    )
    assert chat.usage is not None
    assert thinking.usage.input_tokens == chat.usage.prompt_tokens > plain.usage.input_tokens
    assert off.usage.input_tokens == plain.usage.input_tokens
    assert thinking.reasoning is not None and thinking.reasoning.effort == "high"


async def test_streamed_thoughts_equal_the_whole_answer(api: LiveServer) -> None:
    """Whatever the random model writes with thinking on, stream and whole agree."""
    fields = {
        "model": "demo-attn",
        "input": QUESTION,
        "reasoning": {"effort": "high"},
        "temperature": 0,
        "max_output_tokens": 24,
    }
    whole = await client(api).responses.create(**fields)
    events, _ = await streamed(api, **fields)
    final = events[-1].response
    assert [item.type for item in final.output] == [item.type for item in whole.output]
    assert final.output_text == whole.output_text
    assert final.usage == whole.usage


@pytest.mark.parametrize(
    ("fields", "status", "param"),
    [
        ({"model": "nope"}, 404, "model"),
        ({"tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
        ({"background": True}, 400, "background"),
        ({"truncation": "auto"}, 400, "truncation"),
        ({"tool_choice": "auto"}, 400, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, 400, "tool_choice"),
        (
            {"tools": [{"type": "function", "name": "f", "parameters": {"properties": 1}}]},
            400,
            "tools[0].parameters",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            400,
            "input[0].content[0]",
        ),
        ({"input": [{"type": "item_reference", "id": "x"}]}, 400, "input[0].type"),
        (
            {
                "input": [
                    {"role": "user", "content": "Hi"},
                    {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"},
                ]
            },
            400,
            "input[1].arguments",
        ),
        ({"input": []}, 400, "input"),
        ({"previous_response_id": "resp_unknown"}, 404, "previous_response_id"),
        ({"max_output_tokens": 0}, 400, "max_output_tokens"),
    ],
)
async def test_bad_requests_name_the_field(
    api: LiveServer, fields: dict[str, Any], status: int, param: str
) -> None:
    body = {"model": BASE, "input": "Hi", "max_output_tokens": 4, **fields}
    with pytest.raises(openai.APIStatusError) as raised:
        await client(api).responses.create(**body)
    assert raised.value.status_code == status
    error: Any = raised.value.body
    assert error["param"] == param, error
    assert error["message"] and error["code"] == status


async def test_a_bad_request_while_streaming_is_an_http_error(api: LiveServer) -> None:
    """Errors known before the first byte are statuses, not events."""
    with pytest.raises(openai.NotFoundError):
        async with client(api).responses.stream(model="nope", input="Hi") as stream:
            async for _ in stream:
                pass


async def test_in_the_default_dtype(
    default_dtype_engine: VllmEngine, tiny: DefaultModel, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """As users run it (`--dtype auto`, bfloat16 on CPU): the adapter's answer, streamed too."""
    settings = engine_settings(
        dtype="auto",
        cache_dir=tiny.model_dir.parent,
        state_dir=tmp_path_factory.mktemp("responses-bf16-state"),
    )
    async with live_server(settings, default_dtype_engine, first_adapter_id=31_000) as server:
        fields = {"model": "demo-pirate", "input": QUESTION, **GREEDY}
        whole = await client(server).responses.create(**fields)
        assert whole.output_text == PIRATE_REPLY
        _, final = await streamed(server, **fields)
        assert final.output_text == whole.output_text
        called = await client(server).responses.create(
            model="demo-tools", input=QUESTION, tools=TOOLS, **GREEDY
        )
        assert calls(called) == [("get_weather", {"city": "Paris"})]
