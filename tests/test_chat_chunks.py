"""Stream events built from per-request templates are byte for byte what pydantic writes."""

from __future__ import annotations

import pytest
from openai.types.chat import ChatCompletionChunk
from openai.types.chat.chat_completion_chunk import Choice, ChoiceDelta, ChoiceLogprobs
from openai.types.chat.chat_completion_token_logprob import ChatCompletionTokenLogprob
from openai.types.completion_usage import CompletionUsage

from server.inference.chat_chunks import ChatChunkEncoder

# Text a detokeniser can produce: quotes, backslashes, every control character, non-ASCII,
# astral characters, the JavaScript line separators and DEL.
TEXTS = [
    "Hello",
    " world",
    'say "hi"',
    "back\\slash",
    "".join(chr(c) for c in range(32)),
    "café ünïcödé",
    "emoji 😀🌊",
    "\u2028\u2029\x7f",
    "</script>",
    "\ufffd",
]
FINISH = [None, "stop", "length", "tool_calls"]


def pydantic_event(chunk: ChatCompletionChunk) -> str:
    """How the service built every event before (and still builds the rare ones)."""
    return f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"


def envelope(choices: list[Choice], include_usage: bool, **extra: object) -> ChatCompletionChunk:
    fields: dict[str, object] = {"usage": None} if include_usage else {}
    fields.update(extra)
    return ChatCompletionChunk(
        id="chatcmpl-abc123",
        object="chat.completion.chunk",
        created=1_764_000_000,
        model="demo-all",
        choices=choices,
        **fields,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("finish_reason", FINISH)
@pytest.mark.parametrize("text", [*TEXTS, ""])
def test_content_events_match_pydantic(
    text: str, finish_reason: str | None, include_usage: bool
) -> None:
    encoder = ChatChunkEncoder("chatcmpl-abc123", 1_764_000_000, "demo-all", include_usage)
    expected = envelope(
        [
            Choice(
                index=0,
                delta=ChoiceDelta(content=text) if text else ChoiceDelta(),
                finish_reason=finish_reason,  # type: ignore[arg-type]
                logprobs=None,
            )
        ],
        include_usage,
    )
    assert encoder.event([encoder.content(0, text, finish_reason)]) == pydantic_event(expected)


def test_several_choices_and_unusual_names_match_pydantic() -> None:
    model = 'odd "model" name/é'
    encoder = ChatChunkEncoder("chatcmpl-x\\y", 7, model, True)
    choices = [
        Choice(index=i, delta=ChoiceDelta(content=t), finish_reason=None, logprobs=None)
        for i, t in enumerate(TEXTS[:3])
    ]
    expected = ChatCompletionChunk(
        id="chatcmpl-x\\y",
        object="chat.completion.chunk",
        created=7,
        model=model,
        choices=choices,
        usage=None,
    )
    built = encoder.event([encoder.content(i, t, None) for i, t in enumerate(TEXTS[:3])])
    assert built == pydantic_event(expected)


def test_typed_choices_role_and_usage_match_pydantic() -> None:
    encoder = ChatChunkEncoder("chatcmpl-abc123", 1_764_000_000, "demo-all", True)
    role = Choice(index=0, delta=ChoiceDelta(role="assistant", content=""))
    with_logprobs = Choice(
        index=0,
        delta=ChoiceDelta(content="Hi"),
        finish_reason=None,
        logprobs=ChoiceLogprobs(
            content=[
                ChatCompletionTokenLogprob(
                    token="Hi", bytes=[72, 105], logprob=-0.25, top_logprobs=[]
                )
            ]
        ),
    )
    for choice in (role, with_logprobs):
        expected = pydantic_event(envelope([choice], True))
        assert encoder.event([encoder.choice(choice)]) == expected
    tokens = CompletionUsage(prompt_tokens=12, completion_tokens=3, total_tokens=15)
    assert encoder.usage_event(tokens) == pydantic_event(envelope([], False, usage=tokens))


def test_events_parse_as_the_official_client_reads_them() -> None:
    encoder = ChatChunkEncoder("chatcmpl-abc123", 1_764_000_000, "demo-all", False)
    for text in TEXTS:
        event = encoder.event([encoder.content(0, text, "stop")])
        chunk = ChatCompletionChunk.model_validate_json(event.removeprefix("data: "))
        assert chunk.choices[0].delta.content == text
        assert chunk.choices[0].finish_reason == "stop"
