"""SSE events of one chat or completion stream, from JSON text built once per request.

Every event of a stream repeats the same envelope (id, created, model, object, usage); only the
choices change. Building a chunk object per token and serialising it through pydantic cost more
CPU than anything else the service does per token, so the envelope is rendered once and a plain
text delta, the common case, costs one JSON string escape. The bytes are exactly what the
`openai` type's `model_dump_json(exclude_unset=True)` writes for the same chunk
(`tests/test_stream_chunks.py` compares them); chat choices with more in them (tool calls,
thoughts, log-probs) and completion log-probs are still serialised by their `openai` type.
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring  # the C escaper, without ASCII escaping

from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.completion_choice import Logprobs
from openai.types.completion_usage import CompletionUsage

_FINISH_JSON = {None: "null", "stop": '"stop"', "length": '"length"', "tool_calls": '"tool_calls"'}


def _json_string(text: str) -> str:
    # pydantic writes non-ASCII text as UTF-8 and escapes what JSON requires, as this does.
    return str(encode_basestring(text))


def _finish_json(reason: str | None) -> str:
    finish = _FINISH_JSON.get(reason)
    return json.dumps(reason) if finish is None else finish


class ChunkEnvelope:
    """The parts of a stream's chunk events that stay the same from one event to the next."""

    def __init__(
        self, completion_id: str, created: int, model: str, object_name: str, usage_null: bool
    ) -> None:
        self._head = f'data: {{"id":{_json_string(completion_id)},"choices":['
        envelope = f'],"created":{int(created)},"model":{_json_string(model)}'
        self._envelope = f'{envelope},"object":{_json_string(object_name)}'
        self._tail = self._envelope + (',"usage":null}\n\n' if usage_null else "}\n\n")

    def event(self, choices: list[str]) -> str:
        """One chunk event holding the given choice JSONs."""
        return self._head + ",".join(choices) + self._tail

    def usage_event(self, usage: CompletionUsage) -> str:
        """The last chunk of a stream that asked for usage: no choices, the token counts."""
        body = usage.model_dump_json(exclude_unset=True)
        return f'{self._head}{self._envelope},"usage":{body}}}\n\n'


class ChatChunkEncoder(ChunkEnvelope):
    """Encodes the `data:` events of one chat completion stream (`chat.completion.chunk`)."""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        # A stream that asked for usage carries `usage: null` on every chunk but the last.
        super().__init__(completion_id, created, model, "chat.completion.chunk", include_usage)

    @staticmethod
    def content(index: int, text: str | None, finish_reason: str | None) -> str:
        """The JSON of a choice whose delta holds only content (or nothing, at the end)."""
        delta = '{"content":' + _json_string(text) + "}" if text else "{}"
        finish = _finish_json(finish_reason)
        return f'{{"delta":{delta},"index":{index},"finish_reason":{finish},"logprobs":null}}'

    @staticmethod
    def choice(choice: ChunkChoice) -> str:
        """The JSON of any choice, through its `openai` type (tool calls, thoughts, log-probs)."""
        return choice.model_dump_json(exclude_unset=True)


class CompletionChunkEncoder(ChunkEnvelope):
    """Encodes the `data:` events of one completion stream (legacy `text_completion` chunks)."""

    def __init__(self, completion_id: str, created: int, model: str) -> None:
        # Completion chunks leave `usage` out until the last one (the service always did).
        super().__init__(completion_id, created, model, "text_completion", usage_null=False)

    @staticmethod
    def text(index: int, text: str, finish_reason: str | None, logprobs: Logprobs | None) -> str:
        """The JSON of a completion choice (`CompletionChoice`'s field order: alphabetical)."""
        finish = _finish_json(finish_reason)
        steps = "null" if logprobs is None else logprobs.model_dump_json(exclude_unset=True)
        return (
            f'{{"finish_reason":{finish},"index":{index},"logprobs":{steps},'
            f'"text":{_json_string(text)}}}'
        )
