"""`GET /metrics`: Prometheus text format, the service's metrics and vLLM's."""

from __future__ import annotations

import contextlib
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.engine.protocol import EngineDeadError
from server.http.deps import require_admin_key
from server.metrics import ServiceMetrics
from server.services import Services

router = APIRouter()


@router.get("/metrics")
async def metrics(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> Response:
    if request.app.state.settings.metrics_need_admin_key:
        await require_admin_key(request, authorization)
    service_metrics: ServiceMetrics = request.app.state.metrics
    services: Services | None = request.app.state.services
    if services is not None:
        with contextlib.suppress(EngineDeadError):  # while restarting: keep the last value
            service_metrics.adapters_resident.set(len(await services.adapters.resident_ids()))
    return Response(service_metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
