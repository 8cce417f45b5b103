"""Responses `input` items as the chat messages chat completions render, and back.

The Responses API and chat completions share everything below the HTTP layer: a request's
`instructions`, earlier turns and `input` become `ChatMessage`s, which the chat service renders
with the model's template, runs and parses. Errors the chat layer raises name chat fields
(`messages[3].content[0]`, `tools[0].function.parameters`, `response_format`);
`Conversation.rename` turns them into the Responses fields the client sent.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from server.http.errors import BadRequest
from server.inference.chat_tools import ToolCallOut
from server.inference.protocol import (
    AudioPart,
    ChatMessage,
    FunctionCallIn,
    ImagePart,
    ImageURL,
    TextPart,
    ToolCallIn,
)
from server.inference.protocol import ContentPart as ChatPart
from server.inference.protocol import InputAudio as ChatInputAudio
from server.responses.protocol import (
    ContentPart,
    FunctionCallInput,
    FunctionCallOutputIn,
    InputAudioPart,
    InputImagePart,
    InputItem,
    InputTextPart,
    MessageIn,
    OutputTextPart,
    ReasoningIn,
    Unserved,
)

_MESSAGE_PARAM = re.compile(r"messages\[(\d+)\]")
# Chat field names (in params and messages) -> the Responses fields a client sent.
_RENAMES = (
    (re.compile(r"tools\[(\d+)\]\.function\."), r"tools[\1]."),
    (re.compile(r"\bresponse_format\b"), "text.format"),
    (re.compile(r"\bmax_completion_tokens\b|\bmax_tokens\b"), "max_output_tokens"),
    (re.compile(r"\breasoning_effort\b"), "reasoning.effort"),
)


@dataclass
class Conversation:
    """Chat messages, with the Responses field each one came from (for error messages)."""

    messages: list[ChatMessage] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)

    def add(self, message: ChatMessage, origin: str) -> None:
        self.messages.append(message)
        self.origins.append(origin)

    def rename(self, error: BadRequest) -> BadRequest:
        """The error with chat field names replaced by the Responses fields they came from."""

        def fields(text: str) -> str:
            text = _MESSAGE_PARAM.sub(lambda m: self._origin(int(m.group(1))), text)
            for pattern, replacement in _RENAMES:
                text = pattern.sub(replacement, text)
            return re.sub(r"\bmessages\b", "input", text)

        renamed = BadRequest(fields(error.message), param=fields(error.param or "") or None)
        renamed.__cause__ = error
        return renamed

    def _origin(self, index: int) -> str:
        return self.origins[index] if index < len(self.origins) else "input"


def _parts(content: str | list[ContentPart], where: str) -> str | list[ChatPart]:
    """Responses content parts as chat content parts (text, image, audio)."""
    if isinstance(content, str):
        return content
    parts: list[ChatPart] = []
    for j, part in enumerate(content):
        param = f"{where}.content[{j}]"
        if isinstance(part, (InputTextPart, OutputTextPart)):
            parts.append(TextPart(type="text", text=part.text))
        elif isinstance(part, InputImagePart):
            if part.image_url is None:
                raise BadRequest(
                    f"{param}: only image_url (a data URL) is supported, not file_id",
                    param=param,
                )
            detail = part.detail if part.detail in ("auto", "low", "high") else None
            parts.append(
                ImagePart(type="image_url", image_url=ImageURL(url=part.image_url, detail=detail))
            )
        elif isinstance(part, InputAudioPart):
            audio = ChatInputAudio(data=part.input_audio.data, format=part.input_audio.format)
            parts.append(AudioPart(type="input_audio", input_audio=audio))
        else:
            raise BadRequest(f"{param}: {part.type} parts are not supported", param=param)
    return parts


def _arguments(item: FunctionCallInput, where: str) -> str:
    try:
        decoded = json.loads(item.arguments or "{}")
    except ValueError as exc:
        raise BadRequest(
            f"{where}.arguments is not valid JSON", param=f"{where}.arguments"
        ) from exc
    if not isinstance(decoded, dict):
        raise BadRequest(f"{where}.arguments must be a JSON object", param=f"{where}.arguments")
    return item.arguments or "{}"


def _output_text(item: FunctionCallOutputIn, where: str) -> str:
    if isinstance(item.output, str):
        return item.output
    texts = []
    for j, part in enumerate(item.output):
        if not isinstance(part, (InputTextPart, OutputTextPart)):
            param = f"{where}.output[{j}]"
            raise BadRequest(f"{param}: a tool result may only hold text", param=param)
        texts.append(part.text)
    return "".join(texts)


def append_input(conversation: Conversation, items: str | list[InputItem]) -> None:
    """Add a request's `input` to the conversation.

    Consecutive assistant items (a thought, a message, calls) make one assistant turn, as the
    chat template expects: a thought goes with the turn that follows it, calls with the
    assistant message before them.
    """
    if isinstance(items, str):
        conversation.add(ChatMessage(role="user", content=items), "input")
        return
    thought: str | None = None
    open_turn: ChatMessage | None = None  # the assistant turn calls may still join
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if isinstance(item, MessageIn):
            message = ChatMessage(role=item.role, content=_parts(item.content, where))
            if item.role == "assistant":
                message.reasoning, thought = thought, None
                open_turn = message
            else:
                open_turn = None
            conversation.add(message, where)
        elif isinstance(item, ReasoningIn):
            # A thought sent back whole (`content`), or only its summary.
            thought = "".join(part.text for part in item.content or item.summary)
        elif isinstance(item, FunctionCallInput):
            arguments = FunctionCallIn(name=item.name, arguments=_arguments(item, where))
            call = ToolCallIn(id=item.call_id, function=arguments)
            if open_turn is None:
                open_turn = ChatMessage(role="assistant", content=None, reasoning=thought)
                thought = None
                conversation.add(open_turn, where)
            open_turn.tool_calls = [*(open_turn.tool_calls or []), call]
        elif isinstance(item, FunctionCallOutputIn):
            result = ChatMessage(
                role="tool", tool_call_id=item.call_id, content=_output_text(item, where)
            )
            conversation.add(result, where)
            open_turn = None
        else:
            assert isinstance(item, Unserved)
            raise BadRequest(
                f"{where}.type {item.type!r} is not supported (messages, function_call, "
                "function_call_output and reasoning items are)",
                param=f"{where}.type",
            )


def answer_turn(reasoning: str, content: str, calls: list[ToolCallOut]) -> ChatMessage:
    """What a response said, as the assistant turn a later request's history holds."""
    return ChatMessage(
        role="assistant",
        content=content or None,
        reasoning=reasoning or None,
        tool_calls=[
            ToolCallIn(
                id=call.id, function=FunctionCallIn(name=call.name, arguments=call.arguments)
            )
            for call in calls
        ]
        or None,
    )
