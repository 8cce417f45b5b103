"""Tool calls and thoughts read from scripted Gemma 4 outputs, with vLLM's parser on the tiny
tokenizer; the request checks (400s); the forced-call grammar under xgrammar; prompt goldens.

No engine here: outputs are scripted token by token, so every case is exact. The same cases run
through the real engine in `test_tools_api.py`.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import jsonschema
import pytest
import xgrammar
from transformers import AutoTokenizer

from server.engine.gemma4_parser import VllmOutputParsers
from server.http.errors import BadRequest
from server.inference.chat_tools import CompletionReader, ReadDelta, ToolPlan, plan_tools
from server.inference.media import MediaLimits
from server.inference.prompt import ChatRenderer
from server.inference.protocol import ChatCompletionRequest
from server.inference.tool_grammar import (
    CHANNEL_END,
    MARKER_TOKENS,
    STRING_DELIM,
    TOOL_CALL_END,
    TOOL_CALL_START,
    ForcedCall,
    call_structural_tag,
)
from server.testbed.default_model import DefaultModel

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "days": {"type": "integer", "minimum": 0},
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
                "zone": {"type": "string", "maxLength": 8},
                "exact": {"type": "boolean"},
                "offsets": {"type": "array", "items": {"type": "number"}, "maxItems": 3},
            },
            "required": ["zone"],
        },
    },
}
TOOLS = [WEATHER, TIME]
Q = STRING_DELIM
PARIS = f"{TOOL_CALL_START}call:get_weather{{city:{Q}Paris{Q},days:3}}{TOOL_CALL_END}"
UTC = f"{TOOL_CALL_START}call:get_time{{exact:true,zone:{Q}UTC{Q}}}{TOOL_CALL_END}"


@pytest.fixture(scope="module")
def tokenizer(tiny: DefaultModel) -> Any:
    return AutoTokenizer.from_pretrained(tiny.model_dir)


@pytest.fixture(scope="module")
def parsers(tokenizer: Any) -> VllmOutputParsers:
    return VllmOutputParsers(tokenizer)


def request(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "Weather?"}], **fields}
    )


def read(
    tokenizer: Any,
    parsers: VllmOutputParsers,
    plan: ToolPlan,
    output: str,
    *,
    step: int | None = 1,
    prompt: str = "<|turn>model\n",
) -> ReadDelta:
    """Feed `output` to a reader `step` tokens at a time (None: all at once), then sum up."""
    ids = tokenizer.encode(output, add_special_tokens=False)
    vocab = tokenizer.get_vocab()
    markers = {t: vocab[t] for t in (TOOL_CALL_START, TOOL_CALL_END, CHANNEL_END, STRING_DELIM)}
    reader = CompletionReader(
        parsers.new(plan.tools, plan.template_kwargs),
        plan,
        markers,
        tokenizer.encode(prompt, add_special_tokens=False),
    )
    size = step or len(ids)
    total = ReadDelta()
    for start in range(0, len(ids), size):
        chunk = ids[start : start + size]
        text = tokenizer.decode(chunk, skip_special_tokens=False)
        total.extend(reader.feed(text, chunk, finished=start + size >= len(ids)))
    return total


def calls(delta: ReadDelta) -> list[tuple[str, dict[str, Any]]]:
    return [(c.name, json.loads(c.arguments)) for c in delta.tool_calls]


def same_in_every_chunking(
    tokenizer: Any, parsers: VllmOutputParsers, plan: ToolPlan, output: str
) -> ReadDelta:
    """Read `output` whole, token by token and 3 tokens at a time; all three must agree."""
    readings = [read(tokenizer, parsers, plan, output, step=s) for s in (None, 1, 3)]
    for other in readings[1:]:
        assert (other.content, other.reasoning, calls(other)) == (
            readings[0].content,
            readings[0].reasoning,
            calls(readings[0]),
        )
        assert [c.index for c in other.tool_calls] == list(range(len(other.tool_calls)))
    return readings[0]


# ---- reading outputs -------------------------------------------------------------------------


def test_one_call_with_arguments_typed_by_the_schema(tokenizer: Any, parsers: Any) -> None:
    plan = plan_tools(request(tools=TOOLS))
    got = same_in_every_chunking(tokenizer, parsers, plan, PARIS)
    assert calls(got) == [("get_weather", {"city": "Paris", "days": 3})]
    assert got.content == "" and got.tool_calls[0].id
    assert plan.finish_reason("stop", called=True) == "tool_calls"


def test_text_then_several_calls_in_one_delta(tokenizer: Any, parsers: Any) -> None:
    plan = plan_tools(request(tools=TOOLS))
    got = read(tokenizer, parsers, plan, "Let me look." + PARIS + UTC, step=None)
    assert got.content.strip() == "Let me look."
    assert calls(got) == [
        ("get_weather", {"city": "Paris", "days": 3}),
        ("get_time", {"exact": True, "zone": "UTC"}),
    ]
    assert len({c.id for c in got.tool_calls}) == 2


def test_calls_split_across_deltas_agree_with_whole(tokenizer: Any, parsers: Any) -> None:
    plan = plan_tools(request(tools=TOOLS))
    got = same_in_every_chunking(tokenizer, parsers, plan, PARIS + UTC)
    assert [name for name, _ in calls(got)] == ["get_weather", "get_time"]


def test_a_call_cut_by_max_tokens_is_text(tokenizer: Any, parsers: Any) -> None:
    plan = plan_tools(request(tools=TOOLS))
    cut = PARIS + f"{TOOL_CALL_START}call:get_time{{zone:{Q}UT"
    got = same_in_every_chunking(tokenizer, parsers, plan, cut)
    assert calls(got) == [("get_weather", {"city": "Paris", "days": 3})]
    assert got.content == f"{TOOL_CALL_START}call:get_time{{zone:{Q}UT"
    assert plan.finish_reason("length", called=True) == "length"


def test_a_call_cut_inside_its_name_is_text(tokenizer: Any, parsers: Any) -> None:
    plan = plan_tools(request(tools=TOOLS, tool_choice="required"))
    got = same_in_every_chunking(tokenizer, parsers, plan, f"{TOOL_CALL_START}call:get_we")
    assert (got.content, got.tool_calls) == (f"{TOOL_CALL_START}call:get_we", [])


def test_a_call_to_an_undeclared_tool_is_text(tokenizer: Any, parsers: Any) -> None:
    plan = plan_tools(request(tools=[WEATHER]))
    other = f"{TOOL_CALL_START}call:delete_all{{force:true}}{TOOL_CALL_END}"
    got = same_in_every_chunking(tokenizer, parsers, plan, other + PARIS)
    assert calls(got) == [("get_weather", {"city": "Paris", "days": 3})]
    assert got.content == other


def test_tool_choice_none_returns_calls_as_text(tokenizer: Any, parsers: Any) -> None:
    plan = plan_tools(request(tools=TOOLS, tool_choice="none"))
    got = same_in_every_chunking(tokenizer, parsers, plan, PARIS)
    assert got.tool_calls == [] and got.content == PARIS
    assert plan.finish_reason("stop", called=False) == "stop"


def test_named_choice_returns_only_that_function(tokenizer: Any, parsers: Any) -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    plan = plan_tools(request(tools=TOOLS, tool_choice=choice))
    got = same_in_every_chunking(tokenizer, parsers, plan, PARIS + UTC)
    assert calls(got) == [("get_time", {"exact": True, "zone": "UTC"})]
    assert plan.finish_reason("stop", called=True) == "stop"  # OpenAI's for a named choice


def test_thought_then_call(tokenizer: Any, parsers: Any) -> None:
    plan = plan_tools(request(tools=TOOLS, chat_template_kwargs={"enable_thinking": True}))
    output = "<|channel>thought\nParis, three days.<channel|>" + PARIS
    got = same_in_every_chunking(tokenizer, parsers, plan, output)
    assert got.reasoning == "Paris, three days."
    assert calls(got) == [("get_weather", {"city": "Paris", "days": 3})]


def test_a_call_after_a_thought_without_its_opening_token(tokenizer: Any, parsers: Any) -> None:
    # vllm #54256: `<channel|>call:...` becomes content in vLLM; here it is a call.
    plan = plan_tools(request(tools=TOOLS, chat_template_kwargs={"enable_thinking": True}))
    output = "<|channel>thought\nhm<channel|>" + PARIS.removeprefix(TOOL_CALL_START)
    got = same_in_every_chunking(tokenizer, parsers, plan, output)
    assert got.reasoning == "hm" and got.content == ""
    assert calls(got) == [("get_weather", {"city": "Paris", "days": 3})]


def test_text_after_a_thought_is_content(tokenizer: Any, parsers: Any) -> None:
    plan = plan_tools(request(tools=TOOLS, reasoning_effort="high"))
    got = same_in_every_chunking(tokenizer, parsers, plan, "<|channel>thought\nhm<channel|>ca")
    assert (got.reasoning, got.content, got.tool_calls) == ("hm", "ca", [])


def test_thoughts_without_tools(tokenizer: Any, parsers: Any) -> None:
    plan = plan_tools(request(reasoning_effort="low"))
    assert plan.thinking and plan.template_kwargs == {
        "reasoning_effort": "low",
        "enable_thinking": True,
    }
    output = "<|channel>thought\nFirst, the sky.<channel|>It is blue."
    got = same_in_every_chunking(tokenizer, parsers, plan, output)
    assert (got.reasoning, got.content) == ("First, the sky.", "It is blue.")
    hidden = plan_tools(request(reasoning_effort="low", include_reasoning=False))
    assert read(tokenizer, parsers, hidden, output).reasoning == ""


def test_a_prompt_ending_in_an_open_thought(tokenizer: Any, parsers: Any) -> None:
    plan = plan_tools(request(tools=TOOLS, chat_template_kwargs={"enable_thinking": True}))
    prompt = "<tool_response|><|channel>thought\n"
    got = read(tokenizer, parsers, plan, "It is sunny.<channel|>Sunny.", prompt=prompt)
    assert (got.reasoning, got.content) == ("It is sunny.", "Sunny.")


# ---- request checks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": []}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}}, None),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name", "parameters": {}}}]},
            "tools[0].function.name",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
            "tools[0].function.parameters",
        ),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "x"}}}
                ]
            },
            "tools[0].function.parameters",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"properties": {"a": {"type": "strin"}}},
                        },
                    }
                ]
            },
            "tools[0].function.parameters",
        ),
        ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"enable_thinking": "yes"}}, "chat_template_kwargs"),
    ],
)
def test_bad_tool_requests_are_400s(fields: dict[str, Any], param: str | None) -> None:
    with pytest.raises(BadRequest) as raised:
        plan_tools(request(**fields))
    assert raised.value.param == (param or "tool_choice")


def test_forced_call_with_an_unusable_schema_is_a_400() -> None:
    bad = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {"properties": {"a": {"type": "array", "minItems": 3, "maxItems": 1}}},
        },
    }
    with pytest.raises(BadRequest) as raised:
        plan_tools(request(tools=[bad], tool_choice="required"))
    assert raised.value.param == "tools"


# ---- the forced-call grammar -----------------------------------------------------------------


def matcher(tokenizer: Any, tools: list[dict[str, Any]], **options: bool) -> Any:
    vocab = tokenizer.get_vocab()
    stops = [vocab["<eos>"], vocab["<turn|>"], vocab["<|tool_response>"]]
    info = xgrammar.TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=len(vocab), stop_token_ids=stops
    )
    call = ForcedCall(
        tools={t["function"]["name"]: t["function"]["parameters"] for t in tools},
        parallel=options.get("parallel", True),
        thinking=options.get("thinking", False),
        in_thought=False,
    )
    tag = call_structural_tag(call, {token: vocab[token] for token in MARKER_TOKENS})
    xgrammar.Grammar.from_structural_tag(tag)  # as vLLM validates it: without a tokenizer
    return xgrammar.GrammarCompiler(info).compile_structural_tag(tag)


def accepts(tokenizer: Any, compiled: Any, text: str) -> bool:
    match = xgrammar.GrammarMatcher(compiled)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return all(match.accept_token(i) for i in ids) and match.accept_token(
        tokenizer.convert_tokens_to_ids("<eos>")
    )


def test_grammar_admits_calls_and_nothing_else(tokenizer: Any) -> None:
    compiled = matcher(tokenizer, TOOLS)
    assert accepts(tokenizer, compiled, PARIS)
    assert accepts(tokenizer, compiled, PARIS + UTC)
    full = f"{TOOL_CALL_START}call:get_weather{{city:{Q}Oslo{Q},days:0,unit:{Q}celsius{Q}}}"
    assert accepts(tokenizer, compiled, full + TOOL_CALL_END)
    offsets = f"{TOOL_CALL_START}call:get_time{{offsets:[1,-2.5],zone:{Q}CET{Q}}}"
    assert accepts(tokenizer, compiled, offsets + TOOL_CALL_END)
    for bad in [
        "Sure!",
        "",
        f"{TOOL_CALL_START}call:get_weather{{days:3}}{TOOL_CALL_END}",  # city is required
        f"{TOOL_CALL_START}call:get_weather{{city:{Q}Paris{Q},days:-1}}{TOOL_CALL_END}",
        f"{TOOL_CALL_START}call:get_weather{{city:{Q}Paris{Q},days:3.5}}{TOOL_CALL_END}",
        f"{TOOL_CALL_START}call:get_weather{{city:{Q}P{Q},days:1,unit:{Q}kelvin{Q}}}{TOOL_CALL_END}",
        f"{TOOL_CALL_START}call:get_weather{{city:{Q}a<|b{Q},days:1}}{TOOL_CALL_END}",
        f"{TOOL_CALL_START}call:delete_all{{}}{TOOL_CALL_END}",
        PARIS + "And more text",
    ]:
        assert not accepts(tokenizer, compiled, bad), bad
    single = matcher(tokenizer, TOOLS, parallel=False)
    assert accepts(tokenizer, single, PARIS) and not accepts(tokenizer, single, PARIS + UTC)


def test_grammar_needs_the_special_tokens_not_their_spelling(tokenizer: Any) -> None:
    compiled = matcher(tokenizer, TOOLS)
    match = xgrammar.GrammarMatcher(compiled)
    assert not match.accept_token(tokenizer.convert_tokens_to_ids("<"))
    assert match.accept_token(tokenizer.convert_tokens_to_ids(TOOL_CALL_START))


def test_random_walks_under_the_grammar_read_as_schema_valid_calls(
    tokenizer: Any, parsers: Any
) -> None:
    """Any token sequence the grammar allows parses as valid calls: a random model's view."""
    compiled = matcher(tokenizer, TOOLS)
    plan = plan_tools(request(tools=TOOLS, tool_choice="required"))
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    rng = random.Random(7)
    walks = 0
    size = len(tokenizer.get_vocab())
    ids = tokenizer.convert_tokens_to_ids
    stops = {ids(t) for t in ("<eos>", "<turn|>", "<|tool_response>")}
    closers = stops | {ids(STRING_DELIM), ids(TOOL_CALL_END)}
    for _ in range(8):
        match = xgrammar.GrammarMatcher(compiled)
        bitmask = xgrammar.allocate_token_bitmask(1, size)
        out: list[int] = []
        for _ in range(400):
            match.fill_next_token_bitmask(bitmask)
            row = bitmask[0].tolist()
            allowed = [i for i in range(size) if (row[i // 32] >> (i % 32)) & 1]
            # Prefer closing tokens now and then, as a model would, so walks end.
            closing = [i for i in allowed if i in closers]
            token = rng.choice(closing if closing and rng.random() < 0.3 else allowed)
            if token in stops:
                break
            assert match.accept_token(token)
            out.append(token)
        else:
            continue
        walks += 1
        got = read(tokenizer, parsers, plan, tokenizer.decode(out, skip_special_tokens=False))
        assert got.tool_calls and got.content == ""
        for name, arguments in calls(got):
            jsonschema.validate(arguments, schemas[name])
    assert walks >= 4  # most walks end within 400 tokens


# ---- prompts: the checkpoint's own template --------------------------------------------------


@pytest.fixture(scope="module")
def renderer(tiny: DefaultModel) -> ChatRenderer:
    limits = MediaLimits(
        max_image_bytes=2**20,
        max_image_pixels=2**20,
        max_audio_bytes=2**20,
        max_audio_seconds=5,
        allow_remote_images=False,
        remote_timeout_seconds=1,
    )
    return ChatRenderer(tiny.model_dir, limits, 1, 1)


def render(renderer: ChatRenderer, **fields: Any) -> str:
    req = ChatCompletionRequest.model_validate({"model": "m", **fields})
    plan = plan_tools(req)
    return asyncio.run(renderer.render(req.messages, plan.tools, plan.template_kwargs)).text


DECLARATION = (
    '<|tool>declaration:get_weather{description:<|"|>Weather in a city<|"|>,'
    'parameters:{properties:{city:{type:<|"|>STRING<|"|>},days:{type:<|"|>INTEGER<|"|>},'
    'unit:{enum:[<|"|>celsius<|"|>,<|"|>fahrenheit<|"|>],type:<|"|>STRING<|"|>}},'
    'required:[<|"|>city<|"|>,<|"|>days<|"|>],type:<|"|>OBJECT<|"|>}}<tool|>'
)
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "reasoning_content": "I should look it up.",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"days": 2, "city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]


def test_golden_tool_declarations(renderer: ChatRenderer) -> None:
    text = render(renderer, messages=HISTORY[:2], tools=[WEATHER])
    assert text == (
        f"<bos><|turn>system\nBe brief.{DECLARATION}<turn|>\n"
        "<|turn>user\nWeather in Paris?<turn|>\n<|turn>model\n"
    )


def test_golden_call_history_and_result(renderer: ChatRenderer) -> None:
    # Arguments arrive as JSON text and reach the template as a mapping (keys sorted by it);
    # the thought of a call after the last user turn is kept; the result joins the model's
    # turn, and no new model turn is opened after it.
    text = render(renderer, messages=HISTORY, tools=[WEATHER])
    assert text == (
        f"<bos><|turn>system\nBe brief.{DECLARATION}<turn|>\n"
        "<|turn>user\nWeather in Paris?<turn|>\n<|turn>model\n"
        "<|channel>thought\nI should look it up.\n<channel|>"
        '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:2}<tool_call|>'
        '<|tool_response>response:get_weather{value:<|"|>sunny<|"|>}<tool_response|>'
    )


def test_golden_thinking_on_keeps_the_thought_of_a_call_and_opens_one(
    renderer: ChatRenderer,
) -> None:
    text = render(
        renderer, messages=HISTORY, tools=[WEATHER], chat_template_kwargs={"enable_thinking": True}
    )
    assert text == (
        f"<bos><|turn>system\n<|think|>\nBe brief.{DECLARATION}<turn|>\n"
        "<|turn>user\nWeather in Paris?<turn|>\n<|turn>model\n"
        "<|channel>thought\nI should look it up.\n<channel|>"
        '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:2}<tool_call|>'
        '<|tool_response>response:get_weather{value:<|"|>sunny<|"|>}<tool_response|>'
        "<|channel>thought\n"
    )


def test_golden_old_thoughts_are_dropped_after_a_new_user_turn(renderer: ChatRenderer) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "reasoning": "greet back"},
        {"role": "user", "content": "Bye"},
    ]
    text = render(renderer, messages=messages, reasoning_effort="none")
    assert text == (
        "<bos><|turn>user\nHi<turn|>\n<|turn>model\nHello<turn|>\n"
        "<|turn>user\nBye<turn|>\n<|turn>model\n"
    )


def test_history_arguments_must_be_a_json_object(renderer: ChatRenderer) -> None:
    bad = [dict(HISTORY[2])]
    bad[0]["tool_calls"] = [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "[1]"}}
    ]
    with pytest.raises(BadRequest) as raised:
        render(renderer, messages=[HISTORY[1], *bad], tools=[WEATHER])
    assert raised.value.param == "messages[1].tool_calls[0].function.arguments"
