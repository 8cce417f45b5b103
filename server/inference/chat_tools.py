"""Tools and thoughts in chat completions: what a request asks for, and what a completion holds.

`plan_tools` checks a request's `tools`, `tool_choice`, `parallel_tool_calls`,
`chat_template_kwargs` and `reasoning_effort` (400s naming the field) and decides what the
template renders, what decoding is forced to, and which calls may be returned.
`CompletionReader` turns one completion's output, as it streams, into content, thoughts and
whole tool calls, using vLLM's Gemma 4 parser (`server.engine.gemma4_parser`) for the parsing.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from server.engine.protocol import OutputParser
from server.http.errors import BadRequest
from server.inference.protocol import ChatCompletionRequest, NamedToolChoice
from server.inference.tool_grammar import (
    CHANNEL_END,
    TOOL_CALL_END,
    TOOL_CALL_START,
    ForcedCall,
    UnsupportedSchema,
    call_structural_tag,
    check_tool_name,
)

logger = logging.getLogger(__name__)

Mode = Literal["none", "auto", "required", "named"]
# Template arguments the service sets itself; a request cannot override them.
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {"messages", "conversation", "tools", "documents", "add_generation_prompt", "tokenize"}
)
_JSON_TYPES = {"string", "integer", "number", "boolean", "null", "object", "array"}
# The template leaves a thought open after a tool result when thinking is on.
_OPEN_THOUGHT = re.compile(r"<\|channel>thought\n$")


@dataclass(frozen=True)
class ToolPlan:
    """What one chat request asks of tools and thinking, checked."""

    tools: list[dict[str, Any]] | None = None  # OpenAI tool definitions, for template and parser
    mode: Mode = "none"
    named: str | None = None
    parallel: bool = True
    thinking: bool = False
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    include_reasoning: bool = True

    @property
    def parses_output(self) -> bool:
        """Whether the output must be parsed (tool calls or thoughts may be in it)."""
        return self.tools is not None or self.thinking

    @property
    def forces_call(self) -> bool:
        return self.mode in ("required", "named")

    def allows(self, name: str) -> bool:
        """Whether a call to `name` may be returned as a call."""
        if self.mode == "none" or self.tools is None:
            return False
        if self.mode == "named":
            return name == self.named
        return any(tool["function"]["name"] == name for tool in self.tools)

    def parameters(self) -> dict[str, dict[str, Any]]:
        """Function name -> parameters schema, for the functions a forced call may name."""
        assert self.tools is not None
        return {
            tool["function"]["name"]: tool["function"].get("parameters") or {}
            for tool in self.tools
            if self.allows(tool["function"]["name"])
        }

    def finish_reason(self, engine_reason: str | None, called: bool) -> str | None:
        """OpenAI's finish_reason: `tool_calls` when calls came back (`stop` for a named one)."""
        if engine_reason is None or engine_reason == "length" or not called:
            return engine_reason
        return "stop" if self.mode == "named" else "tool_calls"


def _check_schema(schema: Any, where: str) -> None:
    """Reject what is not a JSON schema of an object (the template and grammar need one)."""
    if not isinstance(schema, dict):
        raise BadRequest(f"{where} must be a JSON schema object", param=where)
    kind = schema.get("type", "object")
    if kind != "object":
        raise BadRequest(f"{where}.type must be 'object'", param=where)
    properties = schema.get("properties", {})
    if not isinstance(properties, dict) or not all(
        isinstance(p, dict) for p in properties.values()
    ):
        raise BadRequest(f"{where}.properties must map names to JSON schemas", param=where)
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise BadRequest(f"{where}.required must be a list of property names", param=where)
    for name, sub in properties.items():
        kinds = sub.get("type")
        listed = kinds if isinstance(kinds, list) else [kinds] if kinds is not None else []
        if not all(isinstance(k, str) and k in _JSON_TYPES for k in listed):
            raise BadRequest(
                f"{where}.properties.{name}.type must be JSON schema type(s)", param=where
            )


def _thinking(request: ChatCompletionRequest) -> tuple[bool, dict[str, Any]]:
    kwargs = dict(request.chat_template_kwargs or {})
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS & kwargs.keys())
    if reserved:
        raise BadRequest(
            f"chat_template_kwargs may not set {', '.join(reserved)}", param="chat_template_kwargs"
        )
    # As vLLM: a reasoning effort other than "none" turns Gemma 4's thinking on, unless
    # chat_template_kwargs says otherwise; the template sees the effort too.
    if request.reasoning_effort is not None:
        kwargs["reasoning_effort"] = request.reasoning_effort
        kwargs.setdefault("enable_thinking", request.reasoning_effort != "none")
    thinking = kwargs.get("enable_thinking", False)
    if not isinstance(thinking, bool):
        raise BadRequest(
            "chat_template_kwargs.enable_thinking must be true or false",
            param="chat_template_kwargs",
        )
    return thinking, kwargs


def plan_tools(request: ChatCompletionRequest) -> ToolPlan:
    """Check the request's tool and reasoning fields; BadRequest names the faulty one."""
    thinking, template_kwargs = _thinking(request)
    choice = request.tool_choice
    if request.tools is None:
        if choice is not None:
            raise BadRequest(
                "tool_choice is only allowed when tools are given", param="tool_choice"
            )
        return ToolPlan(
            thinking=thinking,
            template_kwargs=template_kwargs,
            include_reasoning=request.include_reasoning,
        )
    if not request.tools:
        raise BadRequest("tools must not be empty; leave it out to offer no tools", param="tools")
    names: set[str] = set()
    tools = []
    for i, tool in enumerate(request.tools):
        name = tool.function.name
        if not check_tool_name(name):
            raise BadRequest(
                f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-'",
                param=f"tools[{i}].function.name",
            )
        if name in names:
            raise BadRequest(
                f"tools[{i}].function.name {name!r} is declared twice",
                param=f"tools[{i}].function.name",
            )
        names.add(name)
        if tool.function.parameters is not None:
            _check_schema(tool.function.parameters, f"tools[{i}].function.parameters")
        tools.append(tool.model_dump(exclude_none=True))
    mode: Mode
    named = None
    if isinstance(choice, NamedToolChoice):
        named = choice.function.name
        if named not in names:
            raise BadRequest(
                f"tool_choice names {named!r}, which is not among the tools",
                param="tool_choice",
            )
        mode = "named"
    else:
        mode = choice or "auto"
    plan = ToolPlan(
        tools=tools,
        mode=mode,
        named=named,
        parallel=request.parallel_tool_calls and mode != "named",
        thinking=thinking,
        template_kwargs=template_kwargs,
        include_reasoning=request.include_reasoning,
    )
    if plan.forces_call:
        try:  # builds the grammar once, so schema faults are 400s before the engine sees them
            forced_call_tag(plan, "", defaultdict(int))
        except UnsupportedSchema as exc:
            raise BadRequest(f"tools: {exc}", param="tools") from exc
    return plan


def forced_call_tag(plan: ToolPlan, prompt_text: str, token_ids: Mapping[str, int]) -> str | None:
    """The structural tag forcing a call, for `required` and named choices (else None)."""
    if not plan.forces_call:
        return None
    return call_structural_tag(
        ForcedCall(
            tools=plan.parameters(),
            parallel=plan.parallel,
            thinking=plan.thinking,
            in_thought=plan.thinking and bool(_OPEN_THOUGHT.search(prompt_text)),
        ),
        token_ids,
    )


@dataclass(frozen=True)
class ToolCallOut:
    """One whole tool call, ready for the answer."""

    index: int
    id: str
    name: str
    arguments: str  # JSON text


@dataclass
class ReadDelta:
    """What a stretch of one completion adds to the answer."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallOut] = field(default_factory=list)

    def extend(self, more: ReadDelta) -> None:
        """Append a later stretch (a non-streamed answer is the sum of its stretches)."""
        self.content += more.content
        self.reasoning += more.reasoning
        self.tool_calls.extend(more.tool_calls)


@dataclass
class _PendingCall:
    id: str = ""
    name: str = ""
    arguments: str = ""


class CompletionReader:
    """Reads one completion as it streams: content, thoughts, and calls once they are whole.

    vLLM's parser streams a call's name and arguments as they come; a call is held back until
    its `<tool_call|>` arrives, so a call cut off by `max_tokens`, a call to a tool that is not
    offered (or with `tool_choice` `none`) is never sent as a call: its text goes to content
    instead. Streamed and non-streamed answers are built by this same reader, so they agree.
    """

    def __init__(
        self, parser: OutputParser, plan: ToolPlan, token_ids: dict[str, int], prompt: list[int]
    ) -> None:
        self._parser = parser
        self._plan = plan
        self._prompt = prompt
        self._start_id = token_ids[TOOL_CALL_START]
        self._end_id = token_ids[TOOL_CALL_END]
        self._channel_end_id = token_ids[CHANNEL_END]
        self._raw = ""  # the output as fed to the parser, special tokens included
        self._closed = 0  # calls whose <tool_call|> has been fed
        self._pending: dict[int, _PendingCall] = {}
        self._released = 0  # calls settled (returned as calls or as content), in order
        self._next_index = 0  # index of the next call returned
        # Output right after <channel|>, held until it shows whether "call:" follows.
        self._holding = False
        self._held_text = ""
        self._held_ids: list[int] = []

    @property
    def called(self) -> bool:
        return self._next_index > 0

    def feed(self, text: str, token_ids: list[int], finished: bool) -> ReadDelta:
        """The answer's share of the next stretch of output (`finished` on the last one)."""
        text, token_ids = self._repair_bare_call(text, token_ids, finished)
        out = ReadDelta()
        if not text and not token_ids and not finished:
            return out
        self._raw += text
        self._closed += token_ids.count(self._end_id)
        parsed = self._parser.feed(text, token_ids, self._prompt, finished)
        out.content += parsed.content or ""
        if self._plan.include_reasoning:
            out.reasoning += parsed.reasoning or ""
        for fragment in parsed.tool_calls:
            call = self._pending.setdefault(fragment.index, _PendingCall())
            call.id = call.id or fragment.id or ""
            call.name += fragment.name or ""
            call.arguments += fragment.arguments or ""
        self._release(out, finished)
        return out

    def _release(self, out: ReadDelta, finished: bool) -> None:
        segments = _call_segments(self._raw)
        while self._released in self._pending:
            call = self._pending[self._released]
            whole = self._released < self._closed
            if not whole and not finished:
                return
            if whole and self._plan.allows(call.name) and _is_json_object(call.arguments):
                out.tool_calls.append(
                    ToolCallOut(self._next_index, call.id, call.name, call.arguments)
                )
                self._next_index += 1
            else:
                # Cut off, not offered, or unparsable: the model's text, not a call.
                logger.info("tool call to %r returned as text (whole: %s)", call.name, whole)
                if self._released < len(segments):
                    out.content += segments[self._released]
            self._released += 1
        if finished:  # calls cut off before the parser saw their name: text too
            for segment in segments[self._released :]:
                out.content += segment
            self._released = max(self._released, len(segments))

    def _repair_bare_call(
        self, text: str, token_ids: list[int], finished: bool
    ) -> tuple[str, list[int]]:
        """Insert the `<|tool_call>` a model left out after its thought (`<channel|>call:`).

        vLLM's parser would return such a call as content (vllm #54256); text after
        `<channel|>` is held until it shows whether a call follows.
        """
        if self._plan.tools is None:
            return text, token_ids
        if self._holding:
            prefix, prefix_ids = "", []
            after, after_ids = self._held_text + text, self._held_ids + token_ids
            self._holding, self._held_text, self._held_ids = False, "", []
        else:
            marker = text.rfind(CHANNEL_END)
            if marker < 0 or self._channel_end_id not in token_ids:
                return text, token_ids
            cut = len(token_ids) - token_ids[::-1].index(self._channel_end_id)
            prefix, prefix_ids = text[: marker + len(CHANNEL_END)], token_ids[:cut]
            after, after_ids = text[marker + len(CHANNEL_END) :], token_ids[cut:]
        if after.startswith("call:"):
            return prefix + TOOL_CALL_START + after, [*prefix_ids, self._start_id, *after_ids]
        if "call:".startswith(after) and not finished:
            self._holding, self._held_text, self._held_ids = True, after, after_ids
            return prefix, prefix_ids
        return prefix + after, prefix_ids + after_ids


def _call_segments(raw: str) -> list[str]:
    """The text of each call in the output, in order (the last one possibly unfinished)."""
    segments = []
    start = raw.find(TOOL_CALL_START)
    while start >= 0:
        end = raw.find(TOOL_CALL_END, start)
        if end < 0:
            segments.append(raw[start:])
            break
        segments.append(raw[start : end + len(TOOL_CALL_END)])
        start = raw.find(TOOL_CALL_START, end)
    return segments


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False
