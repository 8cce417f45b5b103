"""Chat completions: render the conversation, run it on the adapter asked for, answer."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

from openai.types.chat import (
    ChatCompletion,
    ChatCompletionMessage,
    ChatCompletionMessageFunctionToolCall,
)
from openai.types.chat.chat_completion import Choice, ChoiceLogprobs
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import (
    ChoiceDelta,
    ChoiceDeltaToolCall,
    ChoiceDeltaToolCallFunction,
)
from openai.types.chat.chat_completion_chunk import ChoiceLogprobs as ChunkLogprobs
from openai.types.chat.chat_completion_message_function_tool_call import Function
from openai.types.chat.chat_completion_token_logprob import ChatCompletionTokenLogprob, TopLogprob
from openai.types.completion_usage import CompletionUsage

from server.admin.adapter_service import AdapterLease
from server.engine.protocol import (
    GenerationChunk,
    InferenceEngine,
    OutputParsers,
    TokenLogprob,
)
from server.http.errors import BadRequest
from server.inference.chat_tools import (
    CompletionReader,
    ReadDelta,
    ToolCallOut,
    ToolPlan,
    forced_call_tag,
    plan_tools,
)
from server.inference.generation import (
    GenerationResult,
    open_generation,
    openai_finish_reason,
    sampling_from,
)
from server.inference.prompt import ChatRenderer
from server.inference.protocol import ChatCompletionRequest
from server.inference.sse import DONE
from server.inference.stream_chunks import ChatChunkEncoder
from server.inference.tool_grammar import MARKER_TOKENS
from server.metrics import ServiceMetrics

# The adapter a request's `model` names: pulled from the shared store first if need be, and
# loaded into the engine if it was not in memory.
ModelResolver = Callable[[str], Awaitable[AdapterLease]]


def _reasoning_fields(reasoning: str) -> dict[str, Any]:
    # vLLM's field, and the one many clients read; the `openai` types keep extra fields.
    return {"reasoning": reasoning, "reasoning_content": reasoning} if reasoning else {}


def _message_calls(calls: list[ToolCallOut]) -> list[ChatCompletionMessageFunctionToolCall]:
    return [
        ChatCompletionMessageFunctionToolCall(
            id=call.id,
            type="function",
            function=Function(name=call.name, arguments=call.arguments),
        )
        for call in calls
    ]


def _delta_calls(calls: list[ToolCallOut]) -> list[ChoiceDeltaToolCall]:
    # Whole calls in one delta each: id, type and name once, as the official client expects.
    return [
        ChoiceDeltaToolCall(
            index=call.index,
            id=call.id,
            type="function",
            function=ChoiceDeltaToolCallFunction(name=call.name, arguments=call.arguments),
        )
        for call in calls
    ]


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


def _read_delta(read: ReadDelta) -> ChoiceDelta | None:
    fields: dict[str, Any] = _reasoning_fields(read.reasoning)
    if read.content:
        fields["content"] = read.content
    if read.tool_calls:
        fields["tool_calls"] = _delta_calls(read.tool_calls)
    return ChoiceDelta(**fields) if fields else None


class ChatService:
    """Serves `POST /v1/chat/completions`."""

    def __init__(
        self,
        engine: InferenceEngine,
        renderer: ChatRenderer,
        resolve_model: ModelResolver,
        metrics: ServiceMetrics,
        parsers: OutputParsers,
    ) -> None:
        self._engine = engine
        self.renderer = renderer
        self._resolve_model = resolve_model
        self._metrics = metrics
        self._parsers = parsers
        vocab = renderer.tokenizer.get_vocab()
        self._marker_ids = {token: vocab[token] for token in MARKER_TOKENS}

    async def _open(
        self, request: ChatCompletionRequest, request_id: str
    ) -> tuple[AsyncIterator[GenerationChunk], ToolPlan, list[CompletionReader]]:
        if request.top_logprobs and not request.logprobs:
            raise BadRequest("top_logprobs needs logprobs set to true", param="top_logprobs")
        plan = plan_tools(request)
        prompt = await self.renderer.render(request.messages, plan.tools, plan.template_kwargs)
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        sampling = sampling_from(request, request.token_limit(), logprobs)
        readers: list[CompletionReader] = []
        if plan.parses_output:
            forced = forced_call_tag(plan, prompt.text, self._marker_ids)
            if forced is not None and (sampling.json_schema or sampling.json_object):
                raise BadRequest(
                    "response_format cannot be combined with a forced tool call",
                    param="response_format",
                )
            # Special tokens stay in the text: the parser needs Gemma 4's markers.
            sampling = replace(sampling, skip_special_tokens=False, structural_tag=forced)
            prompt_ids = self.renderer.tokenizer.encode(prompt.text, add_special_tokens=False)
            readers = [
                CompletionReader(
                    self._parsers.new(plan.tools, plan.template_kwargs),
                    plan,
                    self._marker_ids,
                    prompt_ids,
                )
                for _ in range(request.n)
            ]
        lease = await self._resolve_model(request.model)
        tracker = self._metrics.track(request.model)
        generation = await open_generation(
            self._engine, request_id, prompt, sampling, lease, tracker
        )
        return generation, plan, readers

    async def complete(self, request: ChatCompletionRequest, request_id: str) -> ChatCompletion:
        """The whole answer at once (read by the same per-completion readers as a stream)."""
        generation, plan, readers = await self._open(request, request_id)
        result = GenerationResult()
        reads = [ReadDelta() for _ in readers]
        async for chunk in generation:
            result.add(chunk)
            for delta in chunk.completions if readers else []:
                read = readers[delta.index].feed(
                    delta.text, delta.token_ids, finished=delta.finish_reason is not None
                )
                reads[delta.index].extend(read)
        top = request.top_logprobs or 0
        choices = []
        for choice in sorted(result.choices.values(), key=lambda c: c.index):
            finish_reason = choice.finish_reason or "stop"
            fields: dict[str, Any] = {"content": choice.text}
            if readers:
                reader, read = readers[choice.index], reads[choice.index]
                finish_reason = plan.finish_reason(finish_reason, reader.called) or "stop"
                fields = {"content": read.content or None, **_reasoning_fields(read.reasoning)}
                if read.tool_calls:
                    fields["tool_calls"] = _message_calls(read.tool_calls)
            choices.append(
                Choice(
                    index=choice.index,
                    message=ChatCompletionMessage(role="assistant", **fields),
                    finish_reason=finish_reason,
                    logprobs=ChoiceLogprobs(content=_token_logprobs(choice.logprobs, top))
                    if request.logprobs
                    else None,
                )
            )
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
        generation, plan, readers = await self._open(request, request_id)
        return self._events(request, request_id, generation, plan, readers)

    async def _events(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        generation: AsyncIterator[GenerationChunk],
        plan: ToolPlan,
        readers: list[CompletionReader],
    ) -> AsyncIterator[str]:
        include_usage = request.include_usage()
        top = request.top_logprobs or 0
        encoder = ChatChunkEncoder(
            f"chatcmpl-{request_id}", int(time.time()), request.model, include_usage
        )
        # The role chunk once per request: through the `openai` types.
        yield encoder.event(
            [
                encoder.choice(
                    ChunkChoice(index=i, delta=ChoiceDelta(role="assistant", content=""))
                )
                for i in range(request.n)
            ]
        )
        prompt_tokens = completion_tokens = 0
        async for output in generation:
            prompt_tokens = output.prompt_token_count
            choices = []
            for delta in output.completions:
                completion_tokens += len(delta.token_ids)
                finish_reason = openai_finish_reason(delta.finish_reason)
                wants_logprobs = request.logprobs and delta.logprobs
                if not readers and not wants_logprobs:
                    # The hot path: plain text, one JSON string escape per event.
                    if delta.text or finish_reason is not None:
                        choices.append(encoder.content(delta.index, delta.text, finish_reason))
                    continue
                message: ChoiceDelta | None
                if readers:
                    reader = readers[delta.index]
                    read = reader.feed(
                        delta.text, delta.token_ids, finished=delta.finish_reason is not None
                    )
                    finish_reason = plan.finish_reason(finish_reason, reader.called)
                    message = _read_delta(read)
                else:
                    message = ChoiceDelta(content=delta.text) if delta.text else None
                if message is None and finish_reason is None:
                    continue
                logprobs = None
                if wants_logprobs:
                    logprobs = ChunkLogprobs(content=_token_logprobs(delta.logprobs or [], top))
                choices.append(
                    encoder.choice(
                        ChunkChoice(
                            index=delta.index,
                            delta=message or ChoiceDelta(),
                            finish_reason=finish_reason,
                            logprobs=logprobs,
                        )
                    )
                )
            if choices:
                yield encoder.event(choices)
        if include_usage:
            yield encoder.usage_event(usage(prompt_tokens, completion_tokens))
        yield DONE

    async def open_request(
        self, request: ChatCompletionRequest, request_id: str
    ) -> tuple[AsyncIterator[GenerationChunk], ToolPlan, list[CompletionReader]]:
        """Check, render and submit a request; its output stream, tool plan and readers.

        The core the Responses API shares: errors raise here, before any byte is sent.
        """
        return await self._open(request, request_id)
