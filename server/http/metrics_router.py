"""`GET /metrics` and `GET /metrics/router`: Prometheus text, the service's metrics and vLLM's."""

from __future__ import annotations

import contextlib
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.engine.protocol import EngineDeadError
from server.http.deps import BearerDep, require_admin_key
from server.http.openapi import KEY_OPTIONAL, errors
from server.metrics import ServiceMetrics
from server.services import Services

router = APIRouter()
# Both routes answer Prometheus text, with the admin key when --metrics-need-admin-key is set.
TEXT_ROUTE: dict[str, Any] = {
    "response_class": Response,
    "responses": {
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        **errors(401, 403),
    },
    "openapi_extra": KEY_OPTIONAL,
}


@router.get("/metrics", **TEXT_ROUTE)
async def metrics(request: Request, credentials: BearerDep) -> Response:
    """Prometheus text format: the service's metrics and vLLM's `vllm:*` engine metrics."""
    service_metrics = await _refreshed(request, credentials)
    return Response(service_metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/metrics/router", **TEXT_ROUTE)
async def router_metrics(request: Request, credentials: BearerDep) -> Response:
    """What an adapter-aware router reads (queue, running, KV cache, LoRA gauges), nothing else.

    The same values as in `/metrics`, at a cost that does not grow with the adapters: for an
    endpoint picker that scrapes every pod many times a second.
    """
    service_metrics = await _refreshed(request, credentials)
    return Response(service_metrics.router_exposition(), media_type=CONTENT_TYPE_LATEST)


async def _refreshed(request: Request, credentials: BearerDep) -> ServiceMetrics:
    """The service's metrics with the gauges read at scrape time brought up to date."""
    if request.app.state.settings.metrics_need_admin_key:
        await require_admin_key(request, credentials)
    service_metrics: ServiceMetrics = request.app.state.metrics
    services: Services | None = request.app.state.services
    if services is not None:
        with contextlib.suppress(EngineDeadError):  # while restarting: keep the last values
            resident = await services.engine.adapter_residency()
            service_metrics.adapters_resident.set(len(resident))
            service_metrics.engine_unfinished.set(services.engine.running_request_count())
            service_metrics.record_lora_state(
                services.engine.adapter_activity(),
                services.adapters.served_residency(resident),
                request.app.state.settings.max_loras,
            )
    return service_metrics
