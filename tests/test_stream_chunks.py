"""Stream events built from per-request templates are byte for byte what pydantic writes
(chat chunks and completion chunks)."""

from __future__ import annotations

import pytest
from openai.types.chat import ChatCompletionChunk
from openai.types.chat.chat_completion_chunk import Choice, ChoiceDelta, ChoiceLogprobs
from openai.types.chat.chat_completion_token_logprob import ChatCompletionTokenLogprob
from openai.types.completion_choice import Logprobs
from openai.types.completion_usage import CompletionUsage

from server.inference.protocol import CompletionChunk, CompletionChunkChoice
from server.inference.stream_chunks import ChatChunkEncoder, CompletionChunkEncoder

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


def pydantic_event(chunk: ChatCompletionChunk | CompletionChunk) -> str:
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


COMPLETION_FINISH = [None, "stop", "length"]
LOGPROBS = Logprobs(
    tokens=["Hi", ' "there"', "é"],
    token_logprobs=[-0.25, -1.5e-07, -12.0],
    top_logprobs=[{"Hi": -0.25, "Hello": -2.0}, {' "there"': -1.5e-07}, {"é": -12.0}],
    text_offset=[0, 2, 10],
)


def completion_chunk(
    choices: list[CompletionChunkChoice], model: str = "demo-mlp", **extra: object
) -> CompletionChunk:
    return CompletionChunk(
        id="cmpl-abc123",
        object="text_completion",
        created=1_764_000_000,
        model=model,
        choices=choices,
        **extra,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("logprobs", [None, LOGPROBS])
@pytest.mark.parametrize("finish_reason", COMPLETION_FINISH)
@pytest.mark.parametrize("text", [*TEXTS, ""])
def test_completion_events_match_pydantic(
    text: str, finish_reason: str | None, logprobs: Logprobs | None
) -> None:
    encoder = CompletionChunkEncoder("cmpl-abc123", 1_764_000_000, "demo-mlp")
    expected = completion_chunk(
        [
            CompletionChunkChoice(
                index=3,
                text=text,
                finish_reason=finish_reason,  # type: ignore[arg-type]
                logprobs=logprobs,
            )
        ]
    )
    built = encoder.event([encoder.text(3, text, finish_reason, logprobs)])
    assert built == pydantic_event(expected)


def test_completion_choices_names_and_usage_match_pydantic() -> None:
    model = 'odd "model" name/é'
    encoder = CompletionChunkEncoder("cmpl-abc123", 1_764_000_000, model)
    choices = [
        CompletionChunkChoice(index=i, text=t, finish_reason=None, logprobs=None)
        for i, t in enumerate(TEXTS[:3])
    ]
    built = encoder.event([encoder.text(i, t, None, None) for i, t in enumerate(TEXTS[:3])])
    assert built == pydantic_event(completion_chunk(choices, model))
    tokens = CompletionUsage(prompt_tokens=5, completion_tokens=8, total_tokens=13)
    expected = pydantic_event(completion_chunk([], model, usage=tokens))
    assert encoder.usage_event(tokens) == expected


def test_completion_events_parse_as_the_official_client_reads_them() -> None:
    encoder = CompletionChunkEncoder("cmpl-abc123", 1_764_000_000, "demo-mlp")
    for text in TEXTS:
        event = encoder.event([encoder.text(0, text, "length", LOGPROBS)])
        chunk = CompletionChunk.model_validate_json(event.removeprefix("data: "))
        assert chunk.choices[0].text == text
        assert chunk.choices[0].finish_reason == "length"
        assert chunk.choices[0].logprobs == LOGPROBS
