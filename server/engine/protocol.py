"""The narrow contract between the service and the inference engine, free of vLLM imports.

Services depend on `InferenceEngine`; `server.engine.vllm_engine.VllmEngine` implements it on
vLLM, and tests may pass a fake. Requests and outputs are plain dataclasses so nothing above the
bridge needs vLLM.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image

AUDIO_SAMPLE_RATE = 16_000  # Gemma 4's audio feature extractor works on 16 kHz mono
# The shortest clip the engine takes: two mel frames (20 ms frames every 10 ms, the first centred
# on sample 0). A one-frame clip kills vLLM 0.32's worker (`batch_audio_features` squeezes its
# only frame away: IndexError); a shorter one gives the model no audio at all.
MIN_AUDIO_SAMPLES = 321


@dataclass(frozen=True)
class AdapterRef:
    """One version of an adapter as the engine knows it; a new version gets a new `int_id`."""

    name: str
    int_id: int
    path: str


@dataclass(frozen=True)
class AdapterActivity:
    """Served adapter names with requests in the engine, by where those requests are.

    `running`: a request on the adapter has been scheduled (it is in the batch); `waiting`: a
    request on it is in the engine but not scheduled yet (queued, or preempted). An adapter with
    requests in both states is in both.
    """

    running: frozenset[str] = frozenset()
    waiting: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ResidentAdapter:
    """One adapter version in the engine's memory, by engine id.

    `level` is `gpu` while it holds one of the engine's `max_loras` accelerator LoRA slots (the
    batch's LoRA weights: a request on it costs no load), else `cpu` (the host cache of
    `max_cpu_loras` adapters: a request on it costs a copy into a slot, no disk read). `pinned`:
    the host cache never evicts it.
    """

    int_id: int
    level: str
    pinned: bool


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters; field names and meanings are vLLM's `SamplingParams`."""

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_tokens: int = 0
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # top log-probs at every prompt position (first chunk)
    ignore_eos: bool = False
    json_schema: dict[str, Any] | None = None
    json_object: bool = False
    structural_tag: str | None = None  # an xgrammar structural tag (JSON), e.g. a forced call
    skip_special_tokens: bool = True  # False when the output is parsed for calls and thoughts


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt (chat template already applied) and its media, in prompt order."""

    text: str
    images: list[Image.Image] = field(default_factory=list)
    audios: list[np.ndarray] = field(default_factory=list)  # float32 mono at AUDIO_SAMPLE_RATE


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of one sampled token and the most likely alternatives at its step."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]


@dataclass(frozen=True)
class CompletionDelta:
    """What one of the `n` completions produced since the previous chunk."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # "stop", "length" or None while running


@dataclass(frozen=True)
class GenerationChunk:
    """One step of output for a request."""

    request_id: str
    prompt_token_count: int
    completions: list[CompletionDelta]
    finished: bool
    queue_seconds: float | None = None  # how long the request waited to be scheduled
    # With `Sampling.prompt_logprobs`: each prompt token after the first, in the first chunk.
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class ToolCallFragment:
    """Part of one tool call as a parser streams it: id and name once, then argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


@dataclass(frozen=True)
class ParsedDelta:
    """What a stretch of model output holds once thoughts and tool calls are taken apart."""

    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCallFragment] = field(default_factory=list)


class OutputParser(Protocol):
    """Parses one completion's output as it streams (one parser per completion)."""

    def feed(
        self, text: str, token_ids: list[int], prompt_token_ids: list[int], finished: bool
    ) -> ParsedDelta: ...


class OutputParsers(Protocol):
    """Makes the model's output parser for each completion of a request."""

    def new(
        self, tools: list[dict[str, Any]] | None, chat_template_kwargs: dict[str, Any]
    ) -> OutputParser: ...


class EngineError(Exception):
    """The engine failed or refused; `is_client_fault` says whether the request was to blame."""

    def __init__(self, message: str, *, is_client_fault: bool = False) -> None:
        super().__init__(message)
        self.is_client_fault = is_client_fault


class EngineDeadError(EngineError):
    """The engine stopped working; the supervisor replaces it (`server.engine.supervisor`)."""


class InferenceEngine(Protocol):
    """What the service needs of an engine: generate, abort, manage adapters, health, shutdown."""

    @property
    def max_model_len(self) -> int: ...

    def generate(
        self, request_id: str, prompt: Prompt, sampling: Sampling, adapter: AdapterRef | None
    ) -> AsyncIterator[GenerationChunk]: ...

    async def abort(self, request_id: str) -> None: ...

    async def add_adapter(self, adapter: AdapterRef) -> None: ...

    async def remove_adapter(self, int_id: int) -> bool: ...

    async def pin_adapter(self, int_id: int) -> bool: ...

    async def list_adapters(self) -> set[int]: ...

    async def adapter_residency(self) -> list[ResidentAdapter]: ...

    def adapter_activity(self) -> AdapterActivity: ...

    def running_request_count(self) -> int: ...

    async def check_health(self) -> None: ...

    async def shutdown(self) -> None: ...
