"""Liveness (`/health`) and readiness (`/ready`) probes."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from server.engine.protocol import EngineDeadError
from server.http.deps import LifecycleDep
from server.lifecycle import Phase
from server.services import Services

router = APIRouter()


class Health(BaseModel):
    status: Literal["ok", "failed"]
    phase: Phase | None = None  # left out once failed


class Readiness(BaseModel):
    ready: bool
    phase: Phase


@router.get(
    "/health",
    response_model=Health,
    responses={503: {"model": Health, "description": "The engine died or failed to start"}},
)
async def health(lifecycle: LifecycleDep) -> JSONResponse:
    """Alive unless the engine died or failed to start (then a restart is the cure)."""
    if lifecycle.phase is Phase.FAILED:
        return JSONResponse({"status": "failed"}, status_code=503)
    return JSONResponse({"status": "ok", "phase": lifecycle.phase})


@router.get(
    "/ready",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Starting, draining, or failed"}},
)
async def ready(request: Request, lifecycle: LifecycleDep) -> JSONResponse:
    """Ready only when the engine is up and healthy and the server is not draining."""
    services: Services | None = request.app.state.services
    if lifecycle.phase is Phase.READY and services is not None:
        try:
            await services.engine.check_health()
        except EngineDeadError:
            lifecycle.fail("the inference engine stopped")
    status = 200 if lifecycle.phase is Phase.READY else 503
    return JSONResponse({"ready": status == 200, "phase": lifecycle.phase}, status_code=status)
