"""HTTP routes of inference: parse, call the service, answer (JSON or an SSE stream)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel

from server.http.deps import RequestIdDep, ServicesDep, require_inference_key
from server.http.openapi import BODY, INFERENCE_ROUTE, KEY_OPTIONAL, errors, json_or_sse
from server.inference.generation import ClientDisconnected, until_disconnected
from server.inference.protocol import (
    ChatCompletionRequest,
    CompletionChunk,
    CompletionRequest,
)
from server.inference.sse import with_error_event

router = APIRouter(
    prefix="/v1",
    dependencies=[Depends(require_inference_key)],
    # 404: unknown model; 500: the engine failed on the request (not the client's fault).
    responses={**INFERENCE_ROUTE, **BODY, **errors(404, 500)},
)

RequestT = TypeVar("RequestT", contravariant=True)
CLIENT_CLOSED_REQUEST = 499
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _disconnected(request: Request) -> None:
    # The body is already read, so the next message can only be the client going away.
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Serving(Protocol[RequestT]):
    async def stream(self, request: RequestT, request_id: str) -> AsyncIterator[str]: ...

    async def complete(self, request: RequestT, request_id: str) -> BaseModel: ...


async def _answer(
    serving: _Serving[RequestT], body: RequestT, stream: bool, request: Request, request_id: str
) -> Response:
    """An SSE stream, or one JSON answer that is abandoned if the client goes away."""
    if stream:
        events = await serving.stream(body, request_id)
        return StreamingResponse(
            with_error_event(events), media_type="text/event-stream", headers=SSE_HEADERS
        )
    try:
        answer = await until_disconnected(
            serving.complete(body, request_id), lambda: _disconnected(request)
        )
    except ClientDisconnected:
        # Nobody reads it; nginx's 499 marks the request in the access log and metrics, where
        # an exception would log a traceback per disconnect.
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return Response(answer.model_dump_json(exclude_unset=True), media_type="application/json")


@router.post(
    "/chat/completions",
    responses=json_or_sse(ChatCompletion, ChatCompletionChunk),
    openapi_extra=KEY_OPTIONAL,
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, services: ServicesDep, request_id: RequestIdDep
) -> Response:
    return await _answer(services.chat, body, body.stream, request, request_id)


@router.post(
    "/completions", responses=json_or_sse(Completion, CompletionChunk), openapi_extra=KEY_OPTIONAL
)
async def completions(
    body: CompletionRequest, request: Request, services: ServicesDep, request_id: RequestIdDep
) -> Response:
    return await _answer(services.completions, body, body.stream, request, request_id)


# Schemas the OpenAPI document needs beyond the routes' own models (see `service_openapi`).
ANSWER_MODELS = (ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk)
