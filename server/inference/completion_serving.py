"""Completions: raw prompts (no chat template) on the asked adapter, in OpenAI's legacy shape."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from openai.types import Completion, CompletionChoice
from openai.types.completion_choice import Logprobs

from server.admin.adapter_service import AdapterLease
from server.engine.protocol import GenerationChunk, InferenceEngine, Prompt, TokenLogprob
from server.inference.chat_serving import ModelResolver, usage
from server.inference.generation import (
    ChoiceResult,
    GenerationResult,
    collect,
    open_generation,
    openai_finish_reason,
    sampling_from,
)
from server.inference.protocol import CompletionRequest
from server.inference.sse import DONE
from server.inference.stream_chunks import CompletionChunkEncoder
from server.metrics import ServiceMetrics


def _legacy_logprobs(steps: list[TokenLogprob]) -> Logprobs:
    offsets, position = [], 0
    for step in steps:
        offsets.append(position)
        position += len(step.token)
    return Logprobs(
        tokens=[step.token for step in steps],
        token_logprobs=[step.logprob for step in steps],
        top_logprobs=[{token: lp for _, token, lp in step.top} for step in steps],
        text_offset=offsets,
    )


class CompletionService:
    """Serves `POST /v1/completions`; a list of prompts runs as one engine request per prompt."""

    def __init__(
        self, engine: InferenceEngine, resolve_model: ModelResolver, metrics: ServiceMetrics
    ) -> None:
        self._engine = engine
        self._resolve_model = resolve_model
        self._metrics = metrics

    async def _open(
        self, request: CompletionRequest, request_id: str
    ) -> list[AsyncIterator[GenerationChunk]]:
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        sampling = sampling_from(request, request.max_tokens or 16, request.logprobs)
        streams = []
        first: AdapterLease | None = None
        try:
            for i, text in enumerate(prompts):
                # One version for every prompt of the request, whatever is replaced meanwhile.
                lease = first.another() if first else await self._resolve_model(request.model)
                first = first or lease
                tracker = self._metrics.track(request.model)
                streams.append(
                    await open_generation(
                        self._engine,
                        f"{request_id}-{i}",
                        Prompt(text=text),
                        sampling,
                        lease,
                        tracker,
                    )
                )
        except BaseException:
            for stream in streams:
                await stream.aclose()  # type: ignore[attr-defined]
            raise
        return streams

    def _choice(self, request: CompletionRequest, choice: ChoiceResult) -> CompletionChoice:
        return CompletionChoice(
            index=choice.index,
            text=choice.text,
            finish_reason=choice.finish_reason or "stop",
            logprobs=_legacy_logprobs(choice.logprobs) if request.logprobs is not None else None,
        )

    async def complete(self, request: CompletionRequest, request_id: str) -> Completion:
        """All completions at once; choice i*n+j is completion j of prompt i."""
        streams = await self._open(request, request_id)
        results: list[GenerationResult] = await asyncio.gather(
            *(collect(stream, i * request.n) for i, stream in enumerate(streams))
        )
        choices = sorted(
            (choice for result in results for choice in result.choices.values()),
            key=lambda c: c.index,
        )
        prompt_tokens = sum(r.prompt_tokens for r in results)
        completion_tokens = sum(r.completion_tokens for r in results)
        return Completion(
            id=f"cmpl-{request_id}",
            object="text_completion",
            created=int(time.time()),
            model=request.model,
            choices=[self._choice(request, c) for c in choices],
            usage=usage(prompt_tokens, completion_tokens),
        )

    async def stream(self, request: CompletionRequest, request_id: str) -> AsyncIterator[str]:
        """Open every prompt's request (errors raise here), then return the SSE events."""
        streams = await self._open(request, request_id)
        return self._events(request, request_id, streams)

    async def _events(
        self, request: CompletionRequest, request_id: str, streams: list[AsyncIterator[Any]]
    ) -> AsyncIterator[str]:
        encoder = CompletionChunkEncoder(f"cmpl-{request_id}", int(time.time()), request.model)
        wants_logprobs = request.logprobs is not None
        prompt_tokens = completion_tokens = 0
        for i, stream in enumerate(streams):
            async for output in stream:
                if output.finished:
                    prompt_tokens += output.prompt_token_count
                choices = []
                for delta in output.completions:
                    completion_tokens += len(delta.token_ids)
                    if not delta.text and delta.finish_reason is None:
                        continue
                    logprobs = None
                    if wants_logprobs and delta.logprobs:
                        logprobs = _legacy_logprobs(delta.logprobs)
                    choices.append(
                        encoder.text(
                            i * request.n + delta.index,
                            delta.text,
                            openai_finish_reason(delta.finish_reason),
                            logprobs,
                        )
                    )
                if choices:
                    yield encoder.event(choices)
        if request.include_usage():
            yield encoder.usage_event(usage(prompt_tokens, completion_tokens))
        yield DONE
