"""Chat completions: render the conversation, run it on the adapter asked for, answer."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice, ChoiceLogprobs
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from openai.types.chat.chat_completion_chunk import ChoiceLogprobs as ChunkLogprobs
from openai.types.chat.chat_completion_token_logprob import ChatCompletionTokenLogprob, TopLogprob
from openai.types.completion_usage import CompletionUsage

from server.admin.adapter_service import AdapterLease
from server.engine.protocol import GenerationChunk, InferenceEngine, TokenLogprob
from server.http.errors import BadRequest
from server.inference.generation import (
    GenerationResult,
    collect,
    open_generation,
    openai_finish_reason,
    sampling_from,
)
from server.inference.prompt import ChatRenderer
from server.inference.protocol import ChatCompletionRequest
from server.inference.sse import DONE, sse_event
from server.metrics import ServiceMetrics

ModelResolver = Callable[[str], AdapterLease]  # the adapter a request's `model` names


def _token_logprobs(steps: list[TokenLogprob], top: int) -> list[ChatCompletionTokenLogprob]:
    return [
        ChatCompletionTokenLogprob(
            token=step.token,
            bytes=list(step.token.encode()),
            logprob=step.logprob,
            top_logprobs=[
                TopLogprob(token=token, bytes=list(token.encode()), logprob=logprob)
                for _, token, logprob in step.top[:top]
            ],
        )
        for step in steps
    ]


def usage(prompt_tokens: int, completion_tokens: int) -> CompletionUsage:
    """OpenAI's token usage block."""
    return CompletionUsage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


class ChatService:
    """Serves `POST /v1/chat/completions`."""

    def __init__(
        self,
        engine: InferenceEngine,
        renderer: ChatRenderer,
        resolve_model: ModelResolver,
        metrics: ServiceMetrics,
    ) -> None:
        self._engine = engine
        self.renderer = renderer
        self._resolve_model = resolve_model
        self._metrics = metrics

    async def _open(
        self, request: ChatCompletionRequest, request_id: str
    ) -> AsyncIterator[GenerationChunk]:
        if request.top_logprobs and not request.logprobs:
            raise BadRequest("top_logprobs needs logprobs set to true", param="top_logprobs")
        prompt = await self.renderer.render(request.messages)
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        sampling = sampling_from(request, request.token_limit(), logprobs)
        lease = self._resolve_model(request.model)
        tracker = self._metrics.track(request.model)
        return await open_generation(self._engine, request_id, prompt, sampling, lease, tracker)

    async def complete(self, request: ChatCompletionRequest, request_id: str) -> ChatCompletion:
        """The whole answer at once."""
        result: GenerationResult = await collect(await self._open(request, request_id))
        top = request.top_logprobs or 0
        choices = [
            Choice(
                index=choice.index,
                message=ChatCompletionMessage(role="assistant", content=choice.text),
                finish_reason=choice.finish_reason or "stop",
                logprobs=ChoiceLogprobs(content=_token_logprobs(choice.logprobs, top))
                if request.logprobs
                else None,
            )
            for choice in sorted(result.choices.values(), key=lambda c: c.index)
        ]
        return ChatCompletion(
            id=f"chatcmpl-{request_id}",
            object="chat.completion",
            created=int(time.time()),
            model=request.model,
            choices=choices,
            usage=usage(result.prompt_tokens, result.completion_tokens),
        )

    async def stream(self, request: ChatCompletionRequest, request_id: str) -> AsyncIterator[str]:
        """Open the request (errors raise here, before any byte), then return its SSE events."""
        generation = await self._open(request, request_id)
        return self._events(request, request_id, generation)

    async def _events(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        generation: AsyncIterator[GenerationChunk],
    ) -> AsyncIterator[str]:
        created = int(time.time())
        include_usage = request.include_usage()
        top = request.top_logprobs or 0

        def chunk(choices: list[ChunkChoice], tokens: CompletionUsage | None = None) -> str:
            fields: dict[str, Any] = {}
            if include_usage:
                fields["usage"] = tokens
            return sse_event(
                ChatCompletionChunk(
                    id=f"chatcmpl-{request_id}",
                    object="chat.completion.chunk",
                    created=created,
                    model=request.model,
                    choices=choices,
                    **fields,
                )
            )

        yield chunk(
            [
                ChunkChoice(index=i, delta=ChoiceDelta(role="assistant", content=""))
                for i in range(request.n)
            ]
        )
        prompt_tokens = completion_tokens = 0
        async for output in generation:
            prompt_tokens = output.prompt_token_count
            choices = []
            for delta in output.completions:
                completion_tokens += len(delta.token_ids)
                if not delta.text and delta.finish_reason is None:
                    continue
                logprobs = None
                if request.logprobs and delta.logprobs:
                    logprobs = ChunkLogprobs(content=_token_logprobs(delta.logprobs, top))
                choices.append(
                    ChunkChoice(
                        index=delta.index,
                        delta=ChoiceDelta(content=delta.text),
                        finish_reason=openai_finish_reason(delta.finish_reason),
                        logprobs=logprobs,
                    )
                )
            if choices:
                yield chunk(choices)
        if include_usage:
            yield chunk([], usage(prompt_tokens, completion_tokens))
        yield DONE
