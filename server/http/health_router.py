"""Liveness (`/health`) and readiness (`/ready`) probes."""

from __future__ import annotations

import contextlib
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from server.engine.protocol import EngineDeadError
from server.http.deps import LifecycleDep
from server.lifecycle import Phase, ServiceLifecycle
from server.services import Services

router = APIRouter()


class Health(BaseModel):
    status: Literal["ok", "failed"]
    phase: Phase


class Readiness(BaseModel):
    ready: bool
    phase: Phase


async def _phase(request: Request, lifecycle: ServiceLifecycle) -> Phase:
    """The phase after asking the engine: a death found here turns it at once (to RESTARTING)."""
    services: Services | None = request.app.state.services
    if lifecycle.phase is Phase.READY and services is not None:
        with contextlib.suppress(EngineDeadError):
            await services.engine.check_health()
    return lifecycle.phase


@router.get(
    "/health",
    response_model=Health,
    responses={503: {"model": Health, "description": "The service failed for good"}},
)
async def health(request: Request, lifecycle: LifecycleDep) -> JSONResponse:
    """Alive unless the service failed for good (then a restart of the process is the cure).

    While the engine restarts in-process the service is alive but not ready.
    """
    phase = await _phase(request, lifecycle)
    if phase is Phase.FAILED:
        return JSONResponse({"status": "failed", "phase": phase}, status_code=503)
    return JSONResponse({"status": "ok", "phase": phase})


@router.get(
    "/ready",
    response_model=Readiness,
    responses={
        503: {
            "model": Readiness,
            "description": "Starting, restarting the engine, draining, or failed",
        }
    },
)
async def ready(request: Request, lifecycle: LifecycleDep) -> JSONResponse:
    """Ready only when the engine is up and healthy and the server is not draining."""
    phase = await _phase(request, lifecycle)
    status = 200 if phase is Phase.READY else 503
    return JSONResponse({"ready": status == 200, "phase": phase}, status_code=status)
