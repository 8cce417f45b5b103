"""The Responses service on scripted Gemma 4 outputs: thoughts, text and calls become items and
events; input items become chat turns; the store is bounded. The real renderer, tokenizer and
vLLM's Gemma 4 parser, with a scripted engine (the tiny random model rarely writes a thought or
an unforced call, so exact cases need a script; `test_responses_api.py` runs the real engine).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from openai.types.responses import Response
from pydantic import ValidationError

from server.admin.adapter_service import AdapterLease
from server.engine.gemma4_parser import VllmOutputParsers
from server.engine.protocol import (
    AdapterRef,
    CompletionDelta,
    EngineError,
    GenerationChunk,
    Prompt,
    Sampling,
)
from server.http.errors import BadRequest
from server.inference.chat_serving import ChatService
from server.inference.media import MediaLimits
from server.inference.prompt import ChatRenderer
from server.metrics import ServiceMetrics
from server.responses.conversation import Conversation, append_input
from server.responses.protocol import ResponsesRequest
from server.responses.serving import ResponsesService
from server.responses.store import ResponseStore, StoredResponse
from server.testbed.default_model import DefaultModel

THOUGHT_AND_ANSWER = "<|channel>thought\nTwo and two.<channel|>It is 4."
CALL = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
TOOL = {
    "type": "function",
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


class ScriptedEngine:
    """Writes a fixed output one token per chunk (and fails after `fail_after` chunks)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.output = ""
        self.fail_after: int | None = None
        self.max_tokens: int | None = None
        self.prompts: list[str] = []

    async def generate(
        self, request_id: str, prompt: Prompt, sampling: Sampling, adapter: AdapterRef | None
    ) -> AsyncIterator[GenerationChunk]:
        self.prompts.append(prompt.text)
        ids = self.tokenizer.encode(self.output, add_special_tokens=False)
        limit = sampling.max_tokens or len(ids)
        for i, token in enumerate(ids[:limit]):
            if self.fail_after is not None and i == self.fail_after:
                raise EngineError("the engine broke")
            last = i == min(limit, len(ids)) - 1
            reason = ("length" if limit < len(ids) else "stop") if last else None
            text = self.tokenizer.decode([token], skip_special_tokens=sampling.skip_special_tokens)
            yield GenerationChunk(
                request_id, 7, [CompletionDelta(0, text, [token], None, reason)], last
            )

    async def abort(self, request_id: str) -> None:
        pass


@pytest.fixture(scope="module")
def parts(tiny: DefaultModel) -> tuple[ChatRenderer, VllmOutputParsers]:
    limits = MediaLimits(2**20, 2**20, 2**20, 5.0, False, 1.0)
    renderer = ChatRenderer(tiny.model_dir, limits, 4, 1)
    return renderer, VllmOutputParsers(renderer.tokenizer)


def service(
    parts: tuple[ChatRenderer, VllmOutputParsers], store_size: int = 8
) -> tuple[ResponsesService, ScriptedEngine]:
    renderer, parsers = parts
    engine = ScriptedEngine(renderer.tokenizer)

    async def base_model(model: str) -> AdapterLease:
        return AdapterLease(None, Counter())

    chat = ChatService(
        engine,  # type: ignore[arg-type]
        renderer,
        base_model,
        ServiceMetrics(10),
        parsers,
    )
    return ResponsesService(chat, ResponseStore(store_size)), engine


async def events_of(responses: ResponsesService, request: ResponsesRequest) -> list[Any]:
    out = []
    async for sse in await responses.stream(request, "r1"):
        kind, data = sse.strip().split("\n")
        assert kind == f"event: {json.loads(data[6:])['type']}"
        out.append(json.loads(data[6:]))
    return out


async def test_thoughts_become_reasoning_items(parts: Any) -> None:
    responses, engine = service(parts)
    engine.output = THOUGHT_AND_ANSWER
    request = ResponsesRequest(model="m", input="2+2?", reasoning={"effort": "high"})
    whole = await responses.complete(request, "r0")
    assert [item.type for item in whole.output] == ["reasoning", "message"]
    reasoning = whole.output[0]
    assert reasoning.type == "reasoning" and reasoning.content is not None
    assert reasoning.content[0].text == "Two and two."
    assert whole.output_text == "It is 4."
    assert whole.usage is not None
    thought_ids = parts[0].tokenizer.encode(
        "<|channel>thought\nTwo and two.<channel|>", add_special_tokens=False
    )
    assert whole.usage.output_tokens_details.reasoning_tokens == len(thought_ids)
    assert "<|think|>" in engine.prompts[0]  # reasoning.effort turned thinking on
    events = await events_of(responses, request)
    kinds = [event["type"] for event in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.reasoning_text.delta"] * kinds.count("response.reasoning_text.delta"),
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * kinds.count("response.output_text.delta"),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = Response.model_validate(events[-1]["response"])
    assert [item.model_dump(exclude={"id"}) for item in final.output] == [
        item.model_dump(exclude={"id"}) for item in whole.output
    ]


async def test_calls_become_function_call_items(parts: Any) -> None:
    responses, engine = service(parts)
    engine.output = "Let me look." + CALL
    request = ResponsesRequest.model_validate(
        {"model": "m", "input": "Weather in Paris?", "tools": [TOOL]}
    )
    whole = await responses.complete(request, "r0")
    assert [item.type for item in whole.output] == ["message", "function_call"]
    call = whole.output[1]
    assert call.type == "function_call"
    assert (call.name, call.arguments, call.status) == (
        "get_weather",
        '{"city": "Paris"}',
        "completed",
    )
    events = await events_of(responses, request)
    arguments = [e for e in events if e["type"].startswith("response.function_call_arguments")]
    assert [e["type"] for e in arguments] == [
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
    ]
    assert arguments[0]["delta"] == arguments[1]["arguments"] == call.arguments


async def test_history_from_the_store_renders_like_the_same_input(parts: Any) -> None:
    responses, engine = service(parts)
    engine.output = CALL
    tools: Any = [TOOL]
    first = await responses.complete(
        ResponsesRequest.model_validate({"model": "m", "input": "Paris?", "tools": tools}), "r0"
    )
    result = {"type": "function_call_output", "call_id": first.output[0].call_id, "output": "sun"}  # type: ignore[union-attr]
    engine.output = "Sunny."
    chained = ResponsesRequest.model_validate(
        {"model": "m", "input": [result], "tools": tools, "previous_response_id": first.id}
    )
    await responses.complete(chained, "r1")
    by_hand = ResponsesRequest.model_validate(
        {
            "model": "m",
            "tools": tools,
            "input": [
                {"role": "user", "content": "Paris?"},
                *[item.model_dump() for item in first.output],
                result,
            ],
        }
    )
    await responses.complete(by_hand, "r2")
    assert engine.prompts[1] == engine.prompts[2]
    assert '<|tool_response>response:get_weather{value:<|"|>sun<|"|>}' in engine.prompts[1]


async def test_a_failure_after_the_first_byte_is_an_error_event(parts: Any) -> None:
    responses, engine = service(parts)
    engine.output = "It is a long answer."
    engine.fail_after = 2
    events = await events_of(responses, ResponsesRequest(model="m", input="Hi"))
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-1]["response"]["status"] == "failed"
    assert events[-1]["response"]["error"]["code"] == "server_error"
    assert "/" not in events[-2]["message"]


async def test_cut_output_is_incomplete(parts: Any) -> None:
    responses, engine = service(parts)
    engine.output = "It is a long answer."
    whole = await responses.complete(
        ResponsesRequest(model="m", input="Hi", max_output_tokens=2), "r0"
    )
    assert whole.status == "incomplete"
    assert whole.incomplete_details is not None
    assert whole.incomplete_details.reason == "max_output_tokens"


async def vllm_responses_prompt(model_dir: str, body: dict[str, Any], content_format: str) -> Any:
    """The prompt `vllm serve` renders for a Responses request (vLLM's own renderer, no engine)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest as VllmRequest
    from vllm.renderers import renderer_from_config
    from vllm.renderers.online_renderer import OnlineRenderer

    config = EngineArgs(model=model_dir, max_model_len=1024).create_engine_config()
    online = OnlineRenderer(
        config.model_config,
        renderer_from_config(config),
        request_logger=None,
        chat_template=None,
        chat_template_content_format=content_format,  # type: ignore[arg-type]
    )
    rendered = await online.render_responses(VllmRequest.model_validate(body))
    return rendered.engine_input  # type: ignore[union-attr]


async def test_instructions_render_as_the_template_renders_a_string_system_prompt(
    parts: Any, tiny: DefaultModel
) -> None:
    """`instructions` is a system turn with string content: the model's reference rendering.

    `vllm serve` 0.32 renders one token more: it detects Gemma 4's template as taking content
    parts ("openai" format), wraps the string in one text part, and the template ends every
    system part with a space (`item['text'] | trim + ' '`), so `...assistant. <turn|>`.
    transformers' `apply_chat_template` and vLLM told `--chat-template-content-format string`
    render the string without it, as this service does.
    """
    body = {
        "model": "m",
        "instructions": "You are a helpful assistant.",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
    }
    responses, engine = service(parts)
    engine.output = "Arr."
    await responses.complete(ResponsesRequest.model_validate(body), "r0")
    tokenizer = parts[0].tokenizer
    reference = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": body["instructions"]},
            {"role": "user", "content": "Hi"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert engine.prompts[0] == reference
    ours = tokenizer.encode(engine.prompts[0])
    model_dir = str(tiny.model_dir)
    as_string = await vllm_responses_prompt(model_dir, body, "string")
    served = await vllm_responses_prompt(model_dir, body, "auto")  # `vllm serve`'s default
    assert as_string["prompt_token_ids"] == ours
    assert len(served["prompt_token_ids"]) == len(ours) + 1 == 40
    assert served["prompt"] == engine.prompts[0].replace("assistant.<turn|>", "assistant. <turn|>")


def test_consecutive_assistant_items_make_one_turn() -> None:
    request = ResponsesRequest.model_validate(
        {
            "model": "m",
            "input": [
                {"role": "user", "content": "Hi"},
                {"type": "reasoning", "summary": [], "content": [{"text": "Think."}]},
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "Calling."}],
                },
                {"type": "function_call", "call_id": "a", "name": "f", "arguments": "{}"},
                {"type": "function_call", "call_id": "b", "name": "g", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "a", "output": "1"},
                {
                    "type": "function_call_output",
                    "call_id": "b",
                    "output": [{"type": "input_text", "text": "2"}],
                },
            ],
        }
    )
    conversation = Conversation()
    append_input(conversation, request.input)
    roles = [m.role for m in conversation.messages]
    assert roles == ["user", "assistant", "tool", "tool"]
    turn = conversation.messages[1]
    assert isinstance(turn.content, list)
    assert [getattr(part, "text", None) for part in turn.content] == ["Calling."]
    assert turn.reasoning == "Think."
    assert [c.id for c in turn.tool_calls or []] == ["a", "b"]
    assert conversation.messages[3].content == "2"
    renamed = conversation.rename(
        BadRequest("messages[2].content[0] is bad", param="messages[2].content[0]")
    )
    assert renamed.param == "input[5].content[0]"
    assert conversation.rename(BadRequest("x", param="response_format")).param == "text.format"
    tools = conversation.rename(
        BadRequest("tools[1].function.parameters must be", param="tools[1].function.parameters")
    )
    assert (tools.param, tools.message) == ("tools[1].parameters", "tools[1].parameters must be")


def test_the_store_drops_the_least_recently_used() -> None:
    store = ResponseStore(2)

    def stored(name: str) -> StoredResponse:
        response = Response.model_construct(id=name)
        return StoredResponse(response, [])

    for name in ("a", "b"):
        store.put(stored(name))
    assert store.get("a") is not None  # a is now the most recently used
    store.put(stored("c"))
    assert store.get("b") is None and store.get("a") is not None and len(store) == 2
    assert store.delete("a") and not store.delete("a")
    off = ResponseStore(0)
    off.put(stored("a"))
    assert len(off) == 0


@pytest.mark.parametrize(
    "body",
    [
        {"tool_choice": {"type": {}}},
        {"tools": [1]},
        {"input": ["text"]},
        {"input": [{"type": [1]}]},
        {"input": [{"role": "user", "content": [3]}]},
    ],
)
def test_malformed_items_are_validation_errors(body: dict[str, Any]) -> None:
    """Found by the fuzzer: a `type` that is not a string once raised a TypeError (a 500)."""
    with pytest.raises(ValidationError):
        ResponsesRequest.model_validate({"model": "m", "input": "Hi", **body})
