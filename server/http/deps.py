"""FastAPI dependencies, as `Annotated` aliases the routes declare.

All are `async def`: FastAPI runs a plain `def` dependency in a worker thread, a hop per
dependency per request for functions that never block.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials

from server.http.auth import check_admin_key, check_inference_key
from server.http.errors import ServiceUnavailable
from server.http.openapi import bearer_key
from server.lifecycle import Phase, ServiceLifecycle
from server.services import Services
from server.settings import Settings


async def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def _lifecycle(request: Request) -> ServiceLifecycle:
    lifecycle: ServiceLifecycle = request.app.state.lifecycle
    return lifecycle


async def _services(request: Request) -> Services:
    """The running services; 503 while starting, draining or after the engine died."""
    lifecycle: ServiceLifecycle = request.app.state.lifecycle
    services: Services | None = request.app.state.services
    if lifecycle.phase is not Phase.READY or services is None:
        raise ServiceUnavailable(f"the server is not ready ({lifecycle.phase})")
    return services


async def _request_id(request: Request) -> str:
    request_id: str = request.state.request_id
    return request_id


BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_key)]


def _token(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return credentials.credentials if credentials else None


async def require_inference_key(request: Request, credentials: BearerDep) -> None:
    """Dependency of every /v1 inference route."""
    settings: Settings = request.app.state.settings
    check_inference_key(_token(credentials), settings.api_keys, settings.admin_keys)


async def require_admin_key(request: Request, credentials: BearerDep) -> None:
    """Dependency of every admin route."""
    settings: Settings = request.app.state.settings
    check_admin_key(
        _token(credentials),
        settings.admin_keys,
        settings.api_keys,
        settings.admin_open_on_loopback,
    )


SettingsDep = Annotated[Settings, Depends(_settings)]
LifecycleDep = Annotated[ServiceLifecycle, Depends(_lifecycle)]
ServicesDep = Annotated[Services, Depends(_services)]
RequestIdDep = Annotated[str, Depends(_request_id)]
