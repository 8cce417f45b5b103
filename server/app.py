"""The FastAPI application: lifespan (engine start and stop), error mapping, routers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from adapters.base_model import BaseModelSpec
from adapters.errors import AdapterError, AdapterExists, AdapterNotFound, AdapterTooLarge
from adapters.persistence import RegistryStore
from adapters.registry import AdapterRegistry
from adapters.sources import remove_partial_uploads, scan_preload_dir
from adapters.store import ManifestConflict, StoreError, VersionCache, open_store
from adapters.validation import ValidationLimits
from server.admin import api_router as admin_router
from server.admin.adapter_service import AdapterService, AdapterSources
from server.admin.store_sync import StoreSync
from server.engine.gemma4_parser import VllmOutputParsers
from server.engine.protocol import EngineDeadError, InferenceEngine
from server.engine.supervisor import EngineSupervisor, RestartPolicy
from server.http import health_router, metrics_router, models_router
from server.http.errors import (
    BadRequest,
    Conflict,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    ServiceUnavailable,
    envelope,
    error_body,
    unexpected_error_body,
)
from server.http.openapi import service_openapi
from server.http.request_context import BodyTooLarge, RequestContextMiddleware
from server.inference import api_router as inference_router
from server.inference.chat_serving import ChatService
from server.inference.completion_serving import CompletionService
from server.inference.media import MediaLimits, check_audio_limit
from server.inference.prompt import ChatRenderer
from server.lifecycle import Phase, ServiceLifecycle
from server.metrics import ServiceMetrics
from server.playground import api_router as playground_router
from server.responses import api_router as responses_router
from server.responses.serving import ResponsesService
from server.responses.store import ResponseStore
from server.services import Services
from server.settings import Settings
from server.testbed.default_model import ensure_default_model

logger = logging.getLogger(__name__)

ENGINE_CHECK_SECONDS = 2.0

_ADAPTER_ERRORS: dict[type[AdapterError], type[ServiceError]] = {
    AdapterNotFound: NotFound,
    AdapterExists: Conflict,
    AdapterTooLarge: PayloadTooLarge,
    ManifestConflict: Conflict,
    StoreError: ServiceUnavailable,
}


def _adapter_error(exc: AdapterError) -> ServiceError:
    return _ADAPTER_ERRORS.get(type(exc), BadRequest)(exc.message)


def _validation_error(exc: RequestValidationError) -> BadRequest:
    """400 naming the first bad field (FastAPI's 422 lists everything, with the input echoed)."""
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return BadRequest("request body is not valid JSON")
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    return BadRequest(
        f"{where or 'body'}: {first.get('msg', 'invalid value')}", param=where or None
    )


def _install_error_handlers(app: FastAPI) -> None:
    def answer(error: ServiceError) -> JSONResponse:
        return JSONResponse(envelope(error), status_code=error.status)

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return answer(exc)

    @app.exception_handler(AdapterError)
    async def adapter_error(_: Request, exc: AdapterError) -> JSONResponse:
        return answer(_adapter_error(exc))

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        # Any route that reaches the engine while it restarts (the admin API too).
        return answer(ServiceUnavailable(str(exc)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return answer(_validation_error(exc))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, BodyTooLarge):
            return answer(PayloadTooLarge("request body is too large"))
        kinds = {404: "NotFoundError", 405: "MethodNotAllowedError"}
        body = error_body(
            exc.status_code, kinds.get(exc.status_code, "BadRequestError"), exc.detail
        )
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error", exc_info=exc)
        return JSONResponse(unexpected_error_body(), status_code=500)


def _startup_folders(settings: Settings, preload_dir: Path | None) -> dict[str, Path]:
    """Adapters to serve from start-up: the preload folder's, then `lora_modules`."""
    folders = scan_preload_dir(preload_dir) if preload_dir else {}
    for spec in settings.lora_modules:
        name, _, path = spec.partition("=")
        folders[name.strip()] = Path(path.strip())
    return folders


async def _start_services(app: FastAPI, settings: Settings, engine: InferenceEngine | None) -> None:
    """Start the engine (unless given) under a supervisor, then the services on it."""
    if settings.model:
        model_dir = Path(settings.model)
        preload_dir = settings.preload_dir
    else:
        tiny = await asyncio.to_thread(ensure_default_model, settings.cache_dir)
        model_dir = tiny.model_dir
        preload_dir = settings.preload_dir or tiny.adapters_dir
    if settings.max_audios_per_prompt > 0:
        check_audio_limit(settings.max_audio_seconds, model_dir)
    served_name = settings.served_name(model_dir)
    base = await asyncio.to_thread(BaseModelSpec.from_model_dir, model_dir, served_name)
    policy = RestartPolicy(settings.engine_max_restarts, settings.engine_restart_window_seconds)
    lifecycle: ServiceLifecycle = app.state.lifecycle
    if engine is not None:  # the caller's engine: never restarted nor shut down here
        supervisor = EngineSupervisor(engine, lifecycle, app.state.metrics, policy)
    else:
        from server.engine.vllm_engine import VllmEngine  # vLLM is heavy: import it only when run

        async def start_engine() -> InferenceEngine:
            return await VllmEngine.start(settings, str(model_dir), served_name)

        first = await start_engine()
        supervisor = EngineSupervisor(first, lifecycle, app.state.metrics, policy, start_engine)
    try:
        await _start_adapter_services(app, settings, supervisor, model_dir, preload_dir, base)
    except BaseException:
        await supervisor.shutdown()  # never leave engine processes behind a failed start
        raise


async def _start_adapter_services(
    app: FastAPI,
    settings: Settings,
    engine: EngineSupervisor,
    model_dir: Path,
    preload_dir: Path | None,
    base: BaseModelSpec,
) -> None:
    """Registry, adapters, chat and completions on a running engine."""
    served_name = base.served_name
    metrics: ServiceMetrics = app.state.metrics
    metrics.set_base_model(served_name)
    upload_dir = settings.state_dir / "uploads"
    upload_dir.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(remove_partial_uploads, upload_dir)
    adapters = AdapterService(
        engine,
        AdapterRegistry(served_name),
        RegistryStore(settings.state_dir),
        base,
        ValidationLimits(
            max_rank=settings.max_lora_rank,
            max_adapter_bytes=settings.max_adapter_bytes,
            allow_pickle=settings.allow_pickle_adapters,
            tower_lora=settings.enable_tower_lora,
            accepts_media=settings.max_images_per_prompt > 0 or settings.max_audios_per_prompt > 0,
        ),
        AdapterSources(
            roots=[root.resolve() for root in settings.adapter_roots],
            upload_dir=upload_dir,
            served_dir=settings.state_dir / "served",
        ),
        metrics,
        # vLLM keeps max_cpu_loras adapters in host memory, max_loras when unset.
        host_cache_size=settings.max_cpu_loras or settings.max_loras,
        probe=settings.adapter_probe,
    )
    store_sync = await _store_sync(settings, adapters)
    await adapters.restore()
    engine.restore_adapters_with(adapters.restore_into_new_engine)
    await adapters.preload(_startup_folders(settings, preload_dir))
    adapters.start_validating_pending()
    if store_sync is not None:
        try:  # nothing unloaded or replaced elsewhere while this replica was down is served
            await store_sync.sync_once()
        except (StoreError, OSError) as exc:  # serve what is here; the watcher retries
            logger.warning("adapter store not reachable at start-up: %s", exc)
        store_sync.start()

    resolve = store_sync.resolve if store_sync is not None else adapters.acquire
    limits = MediaLimits(
        max_image_bytes=settings.max_image_bytes,
        max_image_pixels=settings.max_image_pixels,
        max_audio_bytes=settings.max_audio_bytes,
        max_audio_seconds=settings.max_audio_seconds,
        allow_remote_images=settings.allow_remote_images,
        remote_timeout_seconds=settings.remote_image_timeout_seconds,
    )
    renderer = ChatRenderer(
        model_dir, limits, settings.max_images_per_prompt, settings.max_audios_per_prompt
    )
    # vLLM's Gemma 4 output parser: imported once here (seconds), used by every tools request.
    parsers = await asyncio.to_thread(VllmOutputParsers, renderer.tokenizer)
    chat = ChatService(engine, renderer, resolve, metrics, parsers)
    app.state.services = Services(
        engine=engine,
        adapters=adapters,
        chat=chat,
        completions=CompletionService(engine, resolve, metrics),
        responses=ResponsesService(chat, ResponseStore(settings.responses_store_size)),
        started_at=int(time.time()),
        store=store_sync,
    )


async def _store_sync(settings: Settings, adapters: AdapterService) -> StoreSync | None:
    """With a shared adapter store configured: its client, the local cache, the write-through."""
    if not settings.adapter_store:
        return None
    store = await asyncio.to_thread(
        open_store, settings.adapter_store, settings.adapter_store_endpoint_url
    )
    cache_dir = settings.adapter_cache_dir or settings.state_dir / "cache"
    cache = await asyncio.to_thread(VersionCache, cache_dir, settings.adapter_cache_max_bytes)
    sync = StoreSync(store, cache, adapters, settings.adapter_store_poll_seconds)
    adapters.publisher = sync
    logger.info("adapter store: %s, polled every %s s", store.url, sync.poll_seconds)
    return sync


def create_app(settings: Settings, engine: InferenceEngine | None = None) -> FastAPI:
    """The service. With `engine` given the caller owns it; otherwise the app starts vLLM.

    The engine starts in the background: `/health` answers at once, `/ready` once it can serve.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        lifecycle: ServiceLifecycle = app.state.lifecycle

        async def start() -> None:
            try:
                await _start_services(app, settings, engine)
                if lifecycle.phase is Phase.STARTING:
                    lifecycle.ready()
                    logger.info("ready")
            except Exception as exc:
                logger.exception("start-up failed")
                lifecycle.fail(f"start-up failed: {type(exc).__name__}")

        async def watch_engine() -> None:
            # A dead engine is noticed within seconds even when no request or probe comes;
            # the supervisor then restarts it.
            while lifecycle.phase is not Phase.FAILED:
                await asyncio.sleep(ENGINE_CHECK_SECONDS)
                services: Services | None = app.state.services
                if lifecycle.phase is Phase.READY and services is not None:
                    with contextlib.suppress(EngineDeadError):
                        await services.engine.check_health()

        starting = asyncio.create_task(start())
        watching = asyncio.create_task(watch_engine())
        try:
            yield
        finally:
            watching.cancel()
            if lifecycle.phase is not Phase.FAILED:
                lifecycle.phase = Phase.STOPPED
            await starting  # an engine half-started must still be stopped, not orphaned
            if app.state.services is not None:
                if app.state.services.store is not None:
                    await app.state.services.store.stop()
                await app.state.services.adapters.shutdown()
                await app.state.services.engine.shutdown()

    app = FastAPI(title="Gemma 4 adapter server", lifespan=lifespan)
    app.state.settings = settings
    app.state.lifecycle = ServiceLifecycle()
    app.state.services = None
    app.state.metrics = ServiceMetrics(settings.metrics_max_adapter_labels)
    app.state.model_list = models_router.ModelListCache()
    app.state.adapter_list = admin_router.AdapterListCache()
    app.add_middleware(
        RequestContextMiddleware,
        metrics=app.state.metrics,
        max_body_bytes=settings.max_request_bytes,
        # Adapter uploads may be larger than any inference request.
        large_body_paths={"/v1/adapters": settings.max_adapter_bytes + 2**20},
    )
    _install_error_handlers(app)
    app.include_router(health_router.router)
    app.include_router(metrics_router.router)
    app.include_router(models_router.router)
    app.include_router(inference_router.router)
    app.include_router(responses_router.router)
    app.include_router(admin_router.router)
    if settings.playground:
        app.include_router(playground_router.router)
    service_openapi(app, [*inference_router.ANSWER_MODELS, *responses_router.ANSWER_MODELS])
    return app
