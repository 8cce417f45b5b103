"""HTTP routes of the Responses API: parse, call the service, answer (JSON or named SSE events)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from openai.types.responses import Response as ResponseObject

from server.http.deps import RequestIdDep, ServicesDep, require_inference_key
from server.http.openapi import (
    BODY,
    INFERENCE_ROUTE,
    KEY_OPTIONAL,
    ErrorResponse,
    errors,
    json_answer,
    json_or_events,
)
from server.inference.generation import ClientDisconnected, until_disconnected
from server.responses.protocol import ResponseDeleted, ResponsesRequest, ResponseStreamEvent

router = APIRouter(prefix="/v1", dependencies=[Depends(require_inference_key)])

CLIENT_CLOSED_REQUEST = 499
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_NOT_STORED = {
    404: {"model": ErrorResponse, "description": "No stored response with this id"},
    **errors(400),  # the store is off (--responses-store-size 0)
}


async def _disconnected(request: Request) -> None:
    # The body is already read, so the next message can only be the client going away.
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post(
    "/responses",
    # 404: unknown model, or `previous_response_id` not stored; 500: the engine failed.
    responses={
        **INFERENCE_ROUTE,
        **BODY,
        **errors(404, 500),
        **json_or_events(ResponseObject, ResponseStreamEvent),
    },
    openapi_extra=KEY_OPTIONAL,
)
async def create_response(
    body: ResponsesRequest, request: Request, services: ServicesDep, request_id: RequestIdDep
) -> Response:
    if body.stream:
        events = await services.responses.stream(body, request_id)
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        answer = await until_disconnected(
            services.responses.complete(body, request_id), lambda: _disconnected(request)
        )
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return Response(answer.model_dump_json(exclude_unset=True), media_type="application/json")


@router.get(
    "/responses/{response_id}",
    responses={
        **INFERENCE_ROUTE,
        **_NOT_STORED,
        **json_answer(ResponseObject, "The stored response"),
    },
    openapi_extra=KEY_OPTIONAL,
)
async def get_response(response_id: str, services: ServicesDep) -> Response:
    answer = services.responses.get(response_id)
    return Response(answer.model_dump_json(exclude_unset=True), media_type="application/json")


@router.delete(
    "/responses/{response_id}",
    responses={
        **INFERENCE_ROUTE,
        **_NOT_STORED,
        **json_answer(ResponseDeleted, "The response was deleted"),
    },
    openapi_extra=KEY_OPTIONAL,
)
async def delete_response(response_id: str, services: ServicesDep) -> Response:
    answer = services.responses.delete(response_id)
    return Response(answer.model_dump_json(), media_type="application/json")


# Schemas the OpenAPI document needs beyond the routes' own models (see `service_openapi`).
ANSWER_MODELS = (ResponseObject, ResponseStreamEvent, ResponseDeleted)
