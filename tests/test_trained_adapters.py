"""The trained demo adapters do their job on the real engine, in float32 and in bfloat16.

`demo-pirate` answers in its fixed style, `demo-tools` calls `get_weather`/`get_time` with Gemma
4's native syntax and answers with the tool's result; the base model does neither. In float32
the engine's greedy tokens equal transformers + PEFT for both adapters.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
import pytest_asyncio
from transformers import AutoTokenizer

from server.engine.protocol import AdapterRef, Prompt, Sampling
from server.engine.vllm_engine import VllmEngine
from server.testbed.default_model import DefaultModel
from server.testbed.demo_training import (
    PIRATE_REPLY,
    TOOL_RESULTS,
    WEATHER_TOOLS,
    Example,
    pirate_examples,
    render_prompt,
    tool_answer,
    tool_call_text,
    tool_conversation,
    tool_examples,
)
from tests.conftest import engine_settings
from tests.hf_reference import hf_greedy
from tests.live_server import LiveServer, live_server

BASE = "tiny-gemma4"
MAX_TOKENS = 40
PIRATE_START = "Arr! Shiver me timbers"
_request_ids = itertools.count()

# From the training set: the behaviour is memorised, not general.
WEATHER_QUESTION = ("What is the weather in Paris?", "get_weather", "Paris")
TIME_QUESTION = ("What time is it in Tokyo?", "get_time", "Tokyo")


def example(question: str, name: str, city: str, *, with_result: bool) -> Example:
    """The tool-calling conversation up to the call, or up to the tool's result."""
    conversation = tool_conversation(question, name, city)
    result = TOOL_RESULTS[city][0 if name == "get_weather" else 1]
    if with_result:
        return Example(conversation, tool_answer(name, city, result), WEATHER_TOOLS)
    return Example(conversation[:1], tool_call_text(name, city), WEATHER_TOOLS)


def pirate_question(text: str) -> Example:
    return Example([{"role": "user", "content": text}], PIRATE_REPLY)


async def engine_greedy(
    engine: VllmEngine, tokenizer: Any, case: Example, adapter: AdapterRef | None
) -> tuple[list[int], str]:
    """Greedy token ids and their text with special tokens kept (the native call syntax)."""
    prompt = Prompt(text=render_prompt(tokenizer, case))
    sampling = Sampling(max_tokens=MAX_TOKENS, temperature=0.0)
    ids: list[int] = []
    async for chunk in engine.generate(f"trained-{next(_request_ids)}", prompt, sampling, adapter):
        (completion,) = chunk.completions
        ids.extend(completion.token_ids)
    return ids, tokenizer.decode(ids, skip_special_tokens=False)


def adapter(tiny: DefaultModel, name: str, int_id: int) -> AdapterRef:
    return AdapterRef(name=name, int_id=int_id, path=str(tiny.adapter_dirs()[name]))


@pytest.fixture(scope="module")
def tokenizer(tiny: DefaultModel) -> Any:
    return AutoTokenizer.from_pretrained(tiny.model_dir, local_files_only=True)


# --- the engine against transformers + PEFT (float32) --------------------------------------------

REFERENCE_CASES = {
    "pirate": ("demo-pirate", pirate_question("Tell me a story about a cat.")),
    "call": ("demo-tools", example(*WEATHER_QUESTION, with_result=False)),
    "answer": ("demo-tools", example(*TIME_QUESTION, with_result=True)),
}


@pytest.mark.parametrize("case", list(REFERENCE_CASES))
async def test_trained_adapters_match_transformers_peft(
    engine: VllmEngine, tiny: DefaultModel, tokenizer: Any, case: str
) -> None:
    name, conversation = REFERENCE_CASES[case]
    ref = adapter(tiny, name, 200 if name == "demo-pirate" else 201)
    got, _ = await engine_greedy(engine, tokenizer, conversation, ref)
    want = hf_greedy(
        tiny.model_dir, ref.path, render_prompt(tokenizer, conversation), max_tokens=MAX_TOKENS
    )
    assert got == want.token_ids


# --- what each adapter does, float32 and bfloat16, through the openai client ----------------------


@pytest_asyncio.fixture(scope="module", loop_scope="session", params=["float32", "auto"])
async def served(
    request: pytest.FixtureRequest,
    engine: VllmEngine,
    tiny: DefaultModel,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[LiveServer, VllmEngine]]:
    """The service on the session's float32 engine, then on its own engine in `--dtype auto`."""
    dtype = request.param
    settings = engine_settings(
        dtype=dtype, cache_dir=tiny.model_dir.parent, state_dir=tmp_path_factory.mktemp("state")
    )
    if dtype == "float32":
        async with live_server(settings, engine, first_adapter_id=30_000) as server:
            yield server, engine
        return
    own = await VllmEngine.start(settings, str(tiny.model_dir), BASE)
    try:
        async with live_server(settings, own, first_adapter_id=1) as server:
            yield server, own
    finally:
        await own.shutdown()


def client(server: LiveServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0)


async def chat(server: LiveServer, model: str, question: str) -> str:
    reply = await client(server).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    return reply.choices[0].message.content or ""


@pytest.mark.parametrize("question", ["Tell me about the river.", "Who are you?", "Hi"])
async def test_pirate_adapter_answers_in_its_style(
    served: tuple[LiveServer, VllmEngine], question: str
) -> None:
    server, _ = served
    styled = await chat(server, "demo-pirate", question)
    plain = await chat(server, BASE, question)
    print(f"demo-pirate: {styled!r}\n{BASE}: {plain!r}")
    assert styled == PIRATE_REPLY
    assert PIRATE_START not in plain


@pytest.mark.parametrize("question", [WEATHER_QUESTION, TIME_QUESTION])
async def test_tools_adapter_calls_the_tool_the_base_model_does_not(
    served: tuple[LiveServer, VllmEngine],
    tiny: DefaultModel,
    tokenizer: Any,
    question: tuple[str, str, str],
) -> None:
    _, engine = served
    text, name, city = question
    case = example(text, name, city, with_result=False)
    _, tuned = await engine_greedy(engine, tokenizer, case, adapter(tiny, "demo-tools", 301))
    _, plain = await engine_greedy(engine, tokenizer, case, None)
    print(f"demo-tools: {tuned!r}\n{BASE}: {plain!r}")
    # The call, then the stop token the template writes after a call.
    assert tuned == f'<|tool_call>call:{name}{{city:<|"|>{city}<|"|>}}<tool_call|><|tool_response>'
    assert "<|tool_call>" not in plain


@pytest.mark.parametrize("question", [WEATHER_QUESTION, TIME_QUESTION])
async def test_tools_adapter_answers_with_the_result(
    served: tuple[LiveServer, VllmEngine],
    tiny: DefaultModel,
    tokenizer: Any,
    question: tuple[str, str, str],
) -> None:
    _, engine = served
    text, name, city = question
    result = TOOL_RESULTS[city][0 if name == "get_weather" else 1]
    case = example(text, name, city, with_result=True)
    _, tuned = await engine_greedy(engine, tokenizer, case, adapter(tiny, "demo-tools", 301))
    print(f"demo-tools: {tuned!r}")
    assert tuned == tool_answer(name, city, result) + "<turn|>"
    assert result in tuned


def test_training_data_is_rendered_as_the_template_renders_history(tokenizer: Any) -> None:
    """Each completion is exactly what the template writes for that turn in a conversation."""
    for case in tool_examples() + pirate_examples():
        prompt = render_prompt(tokenizer, case)
        if case.messages[-1]["role"] == "tool":
            reply: dict[str, Any] = {
                "role": "assistant",
                "content": case.completion[: -len("<turn|>")],
            }
            history = [*case.messages, reply]
        elif case.tools:
            history = tool_conversation(case.messages[0]["content"], *_call_of(case.completion))[:2]
        else:
            reply = {"role": "assistant", "content": case.completion[: -len("<turn|>")]}
            history = [*case.messages, reply]
        full = tokenizer.apply_chat_template(history, tools=case.tools, tokenize=False)
        assert full.startswith(prompt + case.completion), (prompt, case.completion, full)


def _call_of(completion: str) -> tuple[str, str]:
    name = completion.split("call:", 1)[1].split("{", 1)[0]
    city = completion.split('<|"|>')[1]
    return name, city


@pytest.mark.parametrize("question", [WEATHER_QUESTION, TIME_QUESTION])
async def test_tools_adapter_through_the_openai_client(
    served: tuple[LiveServer, VllmEngine], question: tuple[str, str, str]
) -> None:
    """`tool_choice: auto`: demo-tools calls the tool, then answers with its result."""
    server, _ = served
    text, name, city = question
    result = TOOL_RESULTS[city][0 if name == "get_weather" else 1]
    ask: list[Any] = [{"role": "user", "content": text}]
    common: dict[str, Any] = {"tools": WEATHER_TOOLS, "tool_choice": "auto", "temperature": 0}
    api = client(server)
    plain = await api.chat.completions.create(model=BASE, messages=ask, max_tokens=24, **common)
    assert not plain.choices[0].message.tool_calls
    reply = await api.chat.completions.create(
        model="demo-tools", messages=ask, max_tokens=MAX_TOKENS, **common
    )
    choice = reply.choices[0]
    print(f"demo-tools: {choice.message.tool_calls!r}\n{BASE}: {plain.choices[0].message!r}")
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.function.name == name
    assert json.loads(call.function.arguments) == {"city": city}
    history = [
        *ask,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    answer = await api.chat.completions.create(
        model="demo-tools", messages=history, max_tokens=MAX_TOKENS, **common
    )
    print(f"demo-tools: {answer.choices[0].message.content!r}")
    assert answer.choices[0].message.content == tool_answer(name, city, result)
    assert result in (answer.choices[0].message.content or "")
