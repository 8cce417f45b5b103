"""Tools and reasoning through the official `openai` client, on the real engine and real HTTP.

The tiny model is random: left alone it never calls a tool. With `tool_choice` `required` or
named, decoding is constrained to Gemma 4's call syntax and each tool's schema, so it must
return a schema-valid call to an allowed function, on the base model and on every adapter.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import openai
import pytest
import pytest_asyncio

from server.engine.vllm_engine import VllmEngine
from server.testbed.default_model import DefaultModel
from tests.conftest import engine_settings
from tests.live_server import LiveServer, live_server

BASE = "tiny-gemma4"
MODELS = [BASE, "demo-all", "demo-attn", "demo-mlp"]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city for some days",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "days": {"type": "integer", "minimum": 1},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "days"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Time in a zone",
        "parameters": {
            "type": "object",
            "properties": {
                "zone": {"type": "string", "enum": ["UTC", "CET", "JST"]},
                "exact": {"type": "boolean"},
            },
            "required": ["zone", "exact"],
        },
    },
}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
BAD_SCHEMA = {"type": "object", "properties": 1}
MAX_TOKENS = 160


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def api(
    engine: VllmEngine, tiny: DefaultModel, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LiveServer]:
    settings = engine_settings(
        cache_dir=tiny.model_dir.parent, state_dir=tmp_path_factory.mktemp("tools-state")
    )
    async with live_server(settings, engine, first_adapter_id=20_000) as server:
        yield server


def client(api: LiveServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=api.v1, api_key="unused", max_retries=0)


def check_calls(message: Any, allowed: set[str]) -> list[tuple[str, dict[str, Any]]]:
    """The message's calls, each to an allowed function with schema-valid arguments."""
    assert message.tool_calls, f"no call: {message.content!r}"
    out = []
    for call in message.tool_calls:
        assert call.type == "function" and call.id
        assert call.function.name in allowed
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        out.append((call.function.name, arguments))
    return out


@pytest.mark.parametrize("model", MODELS)
async def test_required_and_named_choices_always_call(api: LiveServer, model: str) -> None:
    cases: list[tuple[Any, set[str], str]] = [
        ("required", {"get_weather", "get_time"}, "tool_calls"),
        ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}, "stop"),
        ({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"}, "stop"),
    ]
    for seed in (1, 2):
        for choice, allowed, finish in cases:
            reply = await client(api).chat.completions.create(
                model=model,
                messages=MESSAGES,  # type: ignore[arg-type]
                tools=TOOLS,  # type: ignore[arg-type]
                tool_choice=choice,
                parallel_tool_calls=choice != "required",
                max_tokens=MAX_TOKENS,
                seed=seed,
            )
            (answer,) = reply.choices
            assert answer.finish_reason == finish, answer.message
            calls = check_calls(answer.message, allowed)
            if isinstance(choice, dict):
                assert len(calls) == 1
            for name, arguments in calls:
                if name == "get_weather":
                    assert isinstance(arguments["days"], int)  # typed by the schema
                else:
                    assert isinstance(arguments["exact"], bool)


@pytest.mark.parametrize("model", [BASE, "demo-all"])
async def test_streamed_calls_accumulate_to_the_whole_answer(api: LiveServer, model: str) -> None:
    fields: dict[str, Any] = {
        "model": model,
        "messages": MESSAGES,
        "tools": TOOLS,
        "tool_choice": "required",
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    whole = await client(api).chat.completions.create(**fields)
    async with client(api).chat.completions.stream(**fields) as stream:
        async for _ in stream:
            pass
        streamed = await stream.get_final_completion()
    (a,), (b,) = whole.choices, streamed.choices
    assert a.finish_reason == b.finish_reason == "tool_calls"
    assert check_calls(a.message, {"get_weather", "get_time"}) == check_calls(
        b.message, {"get_weather", "get_time"}
    )
    assert [c.id for c in b.message.tool_calls or []] != []
    assert (a.message.content or "") == (b.message.content or "")


async def test_a_forced_call_cut_by_max_tokens_is_not_a_call(api: LiveServer) -> None:
    reply = await client(api).chat.completions.create(
        model=BASE,
        messages=MESSAGES,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=4,
    )
    (answer,) = reply.choices
    assert answer.finish_reason == "length"
    assert not answer.message.tool_calls
    # The forced call's text, cut after 4 tokens (how the text splits into tokens varies).
    content, forced = answer.message.content or "", "<|tool_call>call:get_weather{"
    assert content.startswith("<|tool_call>")
    assert forced.startswith(content) or content.startswith(forced)


async def test_tool_call_history_and_results_are_accepted(api: LiveServer) -> None:
    history = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "Look it up.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris","days":1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    for effort in (None, "high"):
        extra = {"reasoning_effort": effort} if effort else {}
        reply = await client(api).chat.completions.create(
            model="demo-mlp",
            messages=history,  # type: ignore[arg-type]
            tools=TOOLS,  # type: ignore[arg-type]
            max_tokens=8,
            **extra,  # type: ignore[arg-type]
        )
        assert reply.choices[0].finish_reason in {"stop", "length", "tool_calls"}
        assert reply.usage is not None and reply.usage.completion_tokens > 0


async def test_reasoning_effort_and_thinking_reach_the_template(api: LiveServer) -> None:
    async def prompt_tokens(**extra: Any) -> int:
        reply = await client(api).chat.completions.create(
            model=BASE, messages=MESSAGES, max_tokens=1, **extra
        )
        assert reply.usage is not None
        return reply.usage.prompt_tokens

    plain = await prompt_tokens()
    # A system turn holding <|think|> opens the prompt when thinking is on.
    thinking = await prompt_tokens(reasoning_effort="high")
    assert thinking > plain
    assert await prompt_tokens(extra_body={"chat_template_kwargs": {"enable_thinking": True}}) == (
        thinking
    )
    assert await prompt_tokens(reasoning_effort="none") == plain


async def test_thoughts_stream_as_reasoning_deltas(api: LiveServer) -> None:
    """Whatever the random model writes, the streamed pieces add up to the whole answer."""
    fields: dict[str, Any] = {
        "model": "demo-attn",
        "messages": MESSAGES,
        "max_tokens": 24,
        "temperature": 0,
        "reasoning_effort": "high",
    }
    whole = (await client(api).chat.completions.create(**fields)).choices[0].message
    reasoning = content = ""
    async for chunk in await client(api).chat.completions.create(stream=True, **fields):
        delta: Any = chunk.choices[0].delta if chunk.choices else None
        if delta is not None:
            assert getattr(delta, "reasoning", None) == getattr(delta, "reasoning_content", None)
            reasoning += getattr(delta, "reasoning", None) or ""
            content += delta.content or ""
    assert reasoning == (getattr(whole, "reasoning", None) or "")
    assert content == (whole.content or "")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": []}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, None),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "properties": 1},
                        },
                    }
                ]
            },
            "tools[0].function.parameters",
        ),
    ],
)
async def test_bad_tool_requests_are_400s(
    api: LiveServer, fields: dict[str, Any], param: str | None
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await client(api).chat.completions.create(
            model=BASE,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=4,
            **fields,
        )
    assert raised.value.status_code == 400
    body: Any = raised.value.body
    assert body["param"] == (param or "tool_choice")
    assert body["message"]


async def test_tools_on_completions_are_a_400(api: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await client(api).completions.create(
            model=BASE, prompt="Hi", max_tokens=4, extra_body={"tools": [WEATHER]}
        )
    body: Any = raised.value.body
    assert body["param"] == "tools" and "chat completions" in body["message"]


async def test_many_forced_requests_at_once(api: LiveServer) -> None:
    async def one(model: str) -> None:
        reply = await client(api).chat.completions.create(
            model=model,
            messages=MESSAGES,  # type: ignore[arg-type]
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=MAX_TOKENS,
        )
        check_calls(reply.choices[0].message, {"get_weather", "get_time"})

    await asyncio.gather(*(one(model) for model in MODELS * 2))
