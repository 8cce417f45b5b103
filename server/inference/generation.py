"""Running one request on the engine: errors settled before the first byte, outputs collected.

Shared by chat completions and completions; knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from server.admin.adapter_service import AdapterLease
from server.engine.protocol import (
    EngineDeadError,
    EngineError,
    GenerationChunk,
    InferenceEngine,
    Prompt,
    Sampling,
    TokenLogprob,
)
from server.http.errors import BadRequest, ServiceError, ServiceUnavailable
from server.inference.protocol import SamplingRequest
from server.metrics import RequestTracker

logger = logging.getLogger(__name__)
T = TypeVar("T")

# vLLM reports aborted/stopped sequences with reasons OpenAI has no name for.
_FINISH_REASONS = {"length": "length"}


def openai_finish_reason(reason: str | None) -> str | None:
    """OpenAI's finish_reason for vLLM's: `length` stays, any other end is `stop`."""
    if reason is None:
        return None
    return _FINISH_REASONS.get(reason, "stop")


def sampling_from(
    request: SamplingRequest, max_tokens: int | None, logprobs: int | None
) -> Sampling:
    """Engine sampling parameters for an OpenAI request (OpenAI's defaults where it is silent)."""
    json_schema = None
    json_object = False
    if request.response_format is not None:
        if request.response_format.type == "json_schema" and request.response_format.json_schema:
            json_schema = request.response_format.json_schema.schema_
        json_object = request.response_format.type == "json_object"
    return Sampling(
        max_tokens=max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=0 if request.top_k is None else request.top_k,
        min_tokens=request.min_tokens,
        seed=request.seed,
        n=request.n,
        stop=request.stop_list(),
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        repetition_penalty=request.repetition_penalty or 1.0,
        logprobs=logprobs,
        ignore_eos=request.ignore_eos,
        json_schema=json_schema,
        json_object=json_object,
    )


def service_error(exc: EngineError) -> ServiceError:
    """The client-facing error for an engine failure (details of server faults stay in the log)."""
    if isinstance(exc, EngineDeadError):
        return ServiceUnavailable(str(exc))  # says whether the engine is restarting
    if exc.is_client_fault:
        return BadRequest(str(exc))
    logger.error("engine error: %s", exc)
    return ServiceError("the inference engine failed on this request")


async def open_generation(
    engine: InferenceEngine,
    request_id: str,
    prompt: Prompt,
    sampling: Sampling,
    lease: AdapterLease,
    tracker: RequestTracker,
) -> AsyncIterator[GenerationChunk]:
    """Submit a request and wait for its first output, so input errors raise before any byte.

    The returned stream aborts the engine request if it is closed before the request finished
    (a client that went away, or a cancelled handler), releases the adapter lease at its end,
    and reports the request's outcome to `tracker`.
    """
    stream = engine.generate(request_id, prompt, sampling, lease.adapter)
    try:
        first = await anext(stream)
    except BaseException as exc:
        lease.release()
        if isinstance(exc, EngineError) and exc.is_client_fault:
            tracker.finished("rejected", 0, 0)
        else:
            cancelled = isinstance(exc, asyncio.CancelledError)
            tracker.finished("aborted" if cancelled else "error", 0, 0)
        if isinstance(exc, EngineError):
            raise service_error(exc) from exc
        raise
    return _guarded(engine, request_id, first, stream, lease, tracker)


async def _guarded(
    engine: InferenceEngine,
    request_id: str,
    first: GenerationChunk,
    rest: AsyncIterator[GenerationChunk],
    lease: AdapterLease,
    tracker: RequestTracker,
) -> AsyncIterator[GenerationChunk]:
    finished = first.finished
    status = "aborted"  # unless the stream ends or fails
    prompt_tokens = first.prompt_token_count
    completion_tokens = sum(len(c.token_ids) for c in first.completions)
    tracker.queued(first.queue_seconds)
    if completion_tokens:
        tracker.tokens_arrived()
    try:
        yield first
        # Per token only what the request's totals need; metrics are recorded once, at the end.
        async for chunk in rest:
            finished = chunk.finished
            for completion in chunk.completions:
                completion_tokens += len(completion.token_ids)
            if tracker.waiting_for_first_token and completion_tokens:
                tracker.queued(chunk.queue_seconds)
                tracker.tokens_arrived()
            yield chunk
        status = "ok"
    except EngineError as exc:
        status = "error"
        raise service_error(exc) from exc
    finally:
        lease.release()
        tracker.finished(status, prompt_tokens, completion_tokens)
        if not finished:
            await asyncio.shield(engine.abort(request_id))


@dataclass
class ChoiceResult:
    """One completion, collected."""

    index: int
    text: str = ""
    token_count: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class GenerationResult:
    """A whole request, collected: what a non-streaming response needs."""

    prompt_tokens: int = 0
    choices: dict[int, ChoiceResult] = field(default_factory=dict)

    @property
    def completion_tokens(self) -> int:
        return sum(choice.token_count for choice in self.choices.values())

    def add(self, chunk: GenerationChunk, index_offset: int = 0) -> None:
        self.prompt_tokens = chunk.prompt_token_count
        for delta in chunk.completions:
            index = delta.index + index_offset
            choice = self.choices.setdefault(index, ChoiceResult(index))
            choice.text += delta.text
            choice.token_count += len(delta.token_ids)
            choice.logprobs.extend(delta.logprobs or [])
            choice.finish_reason = openai_finish_reason(delta.finish_reason)


async def collect(
    stream: AsyncIterator[GenerationChunk], index_offset: int = 0
) -> GenerationResult:
    """Read a stream to its end."""
    result = GenerationResult()
    async for chunk in stream:
        result.add(chunk, index_offset)
    return result


class ClientDisconnected(Exception):
    """The client went away before its answer was ready."""


async def until_disconnected(work: Awaitable[T], disconnected: Callable[[], Awaitable[None]]) -> T:
    """Run `work` unless the client goes away first; then cancel it (which aborts the engine)
    and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        raise ClientDisconnected
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
