"""SSE events of one chat stream, from JSON text built once per request.

Every event of a stream repeats the same envelope (id, created, model, object, usage); only the
choices change. Building a `ChatCompletionChunk` per token and serialising it through pydantic
cost more CPU than anything else the service does per token, so the envelope is rendered once
and a plain content delta, the common case, costs one JSON string escape. The bytes are exactly
what `ChatCompletionChunk(...).model_dump_json(exclude_unset=True)` writes for the same chunk
(`tests/test_chat_chunks.py` compares them); choices with more in them (tool calls, thoughts,
log-probs) are still serialised by their `openai` type.
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring  # the C escaper, without ASCII escaping

from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.completion_usage import CompletionUsage

_FINISH_JSON = {None: "null", "stop": '"stop"', "length": '"length"', "tool_calls": '"tool_calls"'}


def _json_string(text: str) -> str:
    # pydantic writes non-ASCII text as UTF-8 and escapes what JSON requires, as this does.
    return str(encode_basestring(text))


class ChatChunkEncoder:
    """Encodes the `data:` events of one chat completion stream."""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        self._head = f'data: {{"id":{_json_string(completion_id)},"choices":['
        envelope = f'],"created":{int(created)},"model":{_json_string(model)}'
        envelope += ',"object":"chat.completion.chunk"'
        self._include_usage = include_usage
        self._envelope = envelope
        self._tail = envelope + (',"usage":null}\n\n' if include_usage else "}\n\n")

    def content(self, index: int, text: str | None, finish_reason: str | None) -> str:
        """The JSON of a choice whose delta holds only content (or nothing, at the end)."""
        delta = '{"content":' + _json_string(text) + "}" if text else "{}"
        finish = _FINISH_JSON.get(finish_reason)
        if finish is None:
            finish = json.dumps(finish_reason)
        return f'{{"delta":{delta},"index":{index},"finish_reason":{finish},"logprobs":null}}'

    @staticmethod
    def choice(choice: ChunkChoice) -> str:
        """The JSON of any choice, through its `openai` type (tool calls, thoughts, log-probs)."""
        return choice.model_dump_json(exclude_unset=True)

    def event(self, choices: list[str]) -> str:
        """One chunk event holding the given choice JSONs (`usage` null when it is included)."""
        return self._head + ",".join(choices) + self._tail

    def usage_event(self, usage: CompletionUsage) -> str:
        """The last chunk of a stream that asked for usage: no choices, the token counts."""
        body = usage.model_dump_json(exclude_unset=True)
        return f'{self._head}{self._envelope},"usage":{body}}}\n\n'
