"""The Responses API: a request becomes a chat conversation, run by the chat service's core.

Rendering, media, the adapter lease, generation, tool grammar and tool/thought parsing are the
chat completions code (`ChatService.open_request`); this module turns a Responses request into
a chat request, and what the chat layer reads from the output into Responses items and events.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseCreatedEvent,
    ResponseErrorEvent,
    ResponseFailedEvent,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseUsage,
)
from pydantic import BaseModel, ValidationError

from server.engine.protocol import GenerationChunk
from server.http.errors import BadRequest, NotFound, ServiceError, client_safe
from server.inference.chat_serving import ChatService
from server.inference.chat_tools import CompletionReader, ReadDelta
from server.inference.generation import openai_finish_reason
from server.inference.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    FunctionDefinition,
    JsonSchemaFormat,
    NamedFunction,
    NamedToolChoice,
    ResponseFormat,
    ToolDefinition,
)
from server.inference.tool_grammar import CHANNEL_END, CHANNEL_START
from server.responses.conversation import Conversation, answer_turn, append_input
from server.responses.output import OutputAssembler
from server.responses.protocol import (
    FunctionToolChoiceIn,
    FunctionToolIn,
    ResponseDeleted,
    ResponsesRequest,
    Unserved,
)
from server.responses.store import ResponseStore, StoredResponse

logger = logging.getLogger(__name__)


def _refuse_unserved(request: ResponsesRequest) -> None:
    """400 naming the first field asking for something this service does not do."""
    unserved = {
        "background": request.background,
        "conversation": request.conversation is not None,
        "prompt": request.prompt is not None,
        "include": bool(request.include),
        "max_tool_calls": request.max_tool_calls is not None,
        "top_logprobs": bool(request.top_logprobs),
        "truncation": request.truncation == "auto",
    }
    for name, asked in unserved.items():
        if asked:
            raise BadRequest(f"{name} is not supported by this server", param=name)
    for i, tool in enumerate(request.tools or []):
        if isinstance(tool, Unserved):
            raise BadRequest(
                f"tools[{i}].type {tool.type!r} is not supported; only function tools are",
                param=f"tools[{i}].type",
            )
    if isinstance(request.tool_choice, Unserved):
        raise BadRequest(
            f"tool_choice type {request.tool_choice.type!r} is not supported "
            "(none, auto, required or a function are)",
            param="tool_choice",
        )
    text_format = request.text.format if request.text else None
    if text_format and text_format.type == "json_schema" and text_format.schema_ is None:
        raise BadRequest("text.format.schema is required for json_schema", param="text.format")


def _chat_request(request: ResponsesRequest, messages: list[ChatMessage]) -> ChatCompletionRequest:
    """The same request in chat completions' terms."""
    tools = [
        ToolDefinition(
            type="function",
            function=FunctionDefinition(
                name=tool.name,
                description=tool.description,
                parameters=tool.parameters,
                strict=tool.strict,
            ),
        )
        for tool in request.tools or []
        if isinstance(tool, FunctionToolIn)
    ]
    choice: Any = request.tool_choice
    if isinstance(choice, FunctionToolChoiceIn):
        choice = NamedToolChoice(type="function", function=NamedFunction(name=choice.name))
    text_format = request.text.format if request.text else None
    response_format = None
    if text_format is not None and text_format.type != "text":
        schema = None
        if text_format.type == "json_schema":
            schema = JsonSchemaFormat.model_validate(
                {"name": text_format.name, "schema": text_format.schema_ or {}}
            )
        response_format = ResponseFormat(type=text_format.type, json_schema=schema)
    try:
        return ChatCompletionRequest(
            model=request.model,
            messages=messages,
            max_completion_tokens=request.max_output_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            seed=request.seed,
            # OpenAI's clients send `tools: []` for "no tools"; chat completions refuse it.
            tools=tools or None,
            tool_choice=choice,
            parallel_tool_calls=request.parallel_tool_calls,
            reasoning_effort=request.reasoning.effort if request.reasoning else None,
            response_format=response_format,
        )
    except ValidationError as exc:  # not expected: the fields were checked already
        raise BadRequest(f"invalid request: {exc.errors()[0].get('msg')}") from exc


def _echo(request: ResponsesRequest) -> dict[str, Any]:
    """The request's settings, as a Response repeats them."""
    tools = [
        tool.model_dump(exclude_none=True)
        for tool in request.tools or []
        if isinstance(tool, FunctionToolIn)
    ]
    choice: Any = request.tool_choice
    if isinstance(choice, FunctionToolChoiceIn):
        choice = {"type": "function", "name": choice.name}
    return {
        "model": request.model,
        "instructions": request.instructions,
        "metadata": request.metadata,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "max_output_tokens": request.max_output_tokens,
        "parallel_tool_calls": request.parallel_tool_calls,
        "previous_response_id": request.previous_response_id,
        "tool_choice": choice or "auto",
        "tools": tools,
        "text": {"format": _format_echo(request)},
        "reasoning": {"effort": request.reasoning.effort if request.reasoning else None},
        "user": request.user,
    }


def _format_echo(request: ResponsesRequest) -> dict[str, Any]:
    text_format = request.text.format if request.text else None
    if text_format is None or text_format.type != "json_schema":
        return {"type": text_format.type if text_format else "text"}
    return text_format.model_dump(by_alias=True, exclude_none=True)


def _sse(event: BaseModel) -> str:
    kind = getattr(event, "type", "message")
    return f"event: {kind}\ndata: {event.model_dump_json(exclude_unset=True)}\n\n"


@dataclass
class _Run:
    """One submitted request."""

    request: ResponsesRequest
    response_id: str
    created_at: int
    generation: AsyncIterator[GenerationChunk]
    readers: list[CompletionReader]
    history: list[ChatMessage]  # the conversation so far, without `instructions`
    assembler: OutputAssembler

    def response(self, status: str, **fields: Any) -> Response:
        return Response.model_validate(
            {
                "id": self.response_id,
                "object": "response",
                "created_at": self.created_at,
                "status": status,
                "output": self.assembler.items if status != "in_progress" else [],
                "error": None,
                "incomplete_details": None,
                **_echo(self.request),
                **fields,
            }
        )


class ResponsesService:
    """Serves `POST /v1/responses` and the stored responses."""

    def __init__(self, chat: ChatService, store: ResponseStore) -> None:
        self._chat = chat
        self._store = store
        vocab = chat.renderer.tokenizer.get_vocab()
        self._channel = (vocab[CHANNEL_START], vocab[CHANNEL_END])

    async def complete(self, request: ResponsesRequest, request_id: str) -> Response:
        """The whole response (assembled by the same code as a stream)."""
        run = await self._open(request, request_id)
        last: Any = None
        async for event in self._events(run):
            last = event
        response: Response = last.response
        return response

    async def stream(self, request: ResponsesRequest, request_id: str) -> AsyncIterator[str]:
        """Open the request (errors raise here, before any byte), then return its SSE events."""
        run = await self._open(request, request_id)
        return self._stream(run)

    def get(self, response_id: str) -> Response:
        """A stored response; 404 when it is unknown, deleted or evicted."""
        stored = self._store.get(response_id)
        if stored is None:
            raise self._not_stored(response_id, "response_id")
        return stored.response

    def delete(self, response_id: str) -> ResponseDeleted:
        if not self._store.delete(response_id):
            raise self._not_stored(response_id, "response_id")
        return ResponseDeleted(id=response_id)

    def _not_stored(self, response_id: str, param: str) -> ServiceError:
        if self._store.capacity <= 0:
            return BadRequest(
                f"{param}: responses are not stored on this server (--responses-store-size 0)",
                param=param,
            )
        return NotFound(
            f"{param}: no stored response {response_id!r} (never stored, deleted, or dropped: "
            f"this server keeps the last {self._store.capacity} in memory, per replica)",
            param=param,
        )

    async def _open(self, request: ResponsesRequest, request_id: str) -> _Run:
        _refuse_unserved(request)
        conversation = Conversation()
        if request.instructions:
            conversation.add(
                ChatMessage(role="system", content=request.instructions), "instructions"
            )
        kept = len(conversation.messages)  # the history kept starts after `instructions`
        if request.previous_response_id is not None:
            previous = self._store.get(request.previous_response_id)
            if previous is None:
                raise self._not_stored(request.previous_response_id, "previous_response_id")
            for message in previous.conversation:
                conversation.add(message, "previous_response_id")
        if not request.input:
            raise BadRequest("input must not be empty", param="input")
        append_input(conversation, request.input)
        chat = _chat_request(request, conversation.messages)
        try:
            generation, _, readers = await self._chat.open_request(chat, request_id)
        except BadRequest as exc:
            raise conversation.rename(exc) from exc
        return _Run(
            request=request,
            response_id=f"resp_{uuid.uuid4().hex}",
            created_at=int(time.time()),
            generation=generation,
            readers=readers,
            history=conversation.messages[kept:],
            assembler=OutputAssembler(),
        )

    async def _events(self, run: _Run) -> AsyncGenerator[BaseModel, None]:
        """The response's events, from `response.created` to `response.completed`
        (`response.incomplete` when cut off by `max_output_tokens`)."""
        assembler = run.assembler
        yield assembler.event(
            ResponseCreatedEvent, type="response.created", response=run.response("in_progress")
        )
        yield assembler.event(
            ResponseInProgressEvent,
            type="response.in_progress",
            response=run.response("in_progress"),
        )
        prompt_tokens = 0
        output_ids: list[int] = []
        finish: str | None = None
        async for output in run.generation:
            prompt_tokens = output.prompt_token_count
            for delta in output.completions:
                output_ids += delta.token_ids
                finish = delta.finish_reason or finish
                if run.readers:
                    read = run.readers[0].feed(
                        delta.text, delta.token_ids, finished=delta.finish_reason is not None
                    )
                else:
                    read = ReadDelta(content=delta.text)
                for event in assembler.add(read):
                    yield event
        incomplete = openai_finish_reason(finish) == "length"
        for event in assembler.finish(incomplete):
            yield event
        usage = ResponseUsage.model_validate(
            {
                "input_tokens": prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": len(output_ids),
                "output_tokens_details": {"reasoning_tokens": self._thought_tokens(output_ids)},
                "total_tokens": prompt_tokens + len(output_ids),
            }
        )
        if incomplete:
            response = run.response(
                "incomplete", usage=usage, incomplete_details={"reason": "max_output_tokens"}
            )
        else:
            response = run.response("completed", usage=usage, completed_at=int(time.time()))
        if run.request.store:
            turn = answer_turn(assembler.reasoning, assembler.text, assembler.calls)
            self._store.put(StoredResponse(response, [*run.history, turn]))
        if incomplete:
            yield assembler.event(
                ResponseIncompleteEvent, type="response.incomplete", response=response
            )
        else:
            yield assembler.event(
                ResponseCompletedEvent, type="response.completed", response=response
            )

    async def _stream(self, run: _Run) -> AsyncIterator[str]:
        """The events as SSE; a failure after the first byte ends the stream with an `error`
        event and `response.failed`, as OpenAI's does."""
        events = self._events(run)
        try:
            async for event in events:
                yield _sse(event)
        except Exception as exc:
            if isinstance(exc, ServiceError):
                message, code = client_safe(exc.message), str(exc.status)
            else:
                logger.exception("response stream failed")
                message, code = "internal error; see the server log", "500"
            assembler = run.assembler
            yield _sse(
                assembler.event(ResponseErrorEvent, type="error", code=code, message=message)
            )
            failed = run.response("failed", error={"code": "server_error", "message": message})
            yield _sse(
                assembler.event(ResponseFailedEvent, type="response.failed", response=failed)
            )
        finally:
            await events.aclose()

    def _thought_tokens(self, token_ids: list[int]) -> int:
        """Output tokens inside thoughts (`<|channel>` ... `<channel|>`, markers included)."""
        start, end = self._channel
        count, inside = 0, False
        for token in token_ids:
            if token == start:
                inside = True
            if inside:
                count += 1
            if token == end:
                inside = False
        return count
