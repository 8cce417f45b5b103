"""`python -m server` / `gemma-adapter-server`: serve the API with uvicorn (one worker)."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator, MutableMapping
from types import FrameType

import uvicorn

from server.app import create_app
from server.http.request_context import RequestIdLogFilter
from server.lifecycle import ServiceLifecycle
from server.settings import Settings

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# oneDNN (the CPU GEMMs of vLLM and torch) keeps up to 1024 compiled primitives by default, one per
# GEMM shape, about 0.6-0.7 MiB each: every new prompt length makes new shapes, and the vLLM worker
# grew by hundreds of MiB under mixed traffic (BENCHMARKS.md, Soak). Bounded lower here, for the
# engine processes vLLM spawns; an explicit ONEDNN_PRIMITIVE_CACHE_CAPACITY wins.
ONEDNN_PRIMITIVE_CACHE_CAPACITY = "128"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class DrainingServer(uvicorn.Server):
    """Marks the service as draining as soon as a stop signal arrives, so /ready turns 503."""

    def __init__(self, config: uvicorn.Config, lifecycle: ServiceLifecycle) -> None:
        super().__init__(config)
        self._lifecycle = lifecycle

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._lifecycle.drain()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # As uvicorn's, minus re-raising the signal once stopped: a graceful stop exits with 0.
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdLogFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def bound_engine_memory(environ: MutableMapping[str, str]) -> None:
    """Bound oneDNN's primitive cache in the engine processes, which inherit `environ`.

    /proc/PID/environ cannot show it: vLLM retitles its processes over that memory.
    """
    environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_PRIMITIVE_CACHE_CAPACITY)


def freeze_startup_heap() -> None:
    """Take what start-up left alive out of the cyclic collector's sight, as `vllm serve` does.

    vLLM, torch and the tokeniser leave about 725k tracked objects; a full collection walks
    them all (1.3 s on the loaded 2-core bench machine, every stream stalled meanwhile), and
    unfrozen, the first one came within seconds of the first requests (BENCHMARKS.md, the API
    process's CPU). Run before readiness, so no request waits for this one.
    """
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    logging.getLogger(__name__).info(
        "start-up heap frozen: %d objects, after a full collection of %.2f s",
        gc.get_freeze_count(),
        time.perf_counter() - started,
    )


def cache_vllm_environment() -> None:
    """vLLM's cache of its environment variables, as its engine core and workers use it."""
    from server.engine import vllm_engine  # vLLM is heavy: imported once the engine runs

    vllm_engine.cache_vllm_environment()


def main() -> None:
    """Parse settings from the environment and flags, then serve until stopped."""
    settings = Settings(_cli_parse_args=True)
    configure_logging(settings.log_level)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the service never downloads a model
    bound_engine_memory(os.environ)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        log_config=None,
        access_log=False,  # server.access logs each request, with its id and duration
        timeout_graceful_shutdown=int(settings.drain_timeout_seconds),
    )
    lifecycle: ServiceLifecycle = app.state.lifecycle
    server = DrainingServer(config, lifecycle)
    failures: list[str] = []

    def stop_on_failure(reason: str) -> None:
        # Exit, so Docker or Kubernetes restarts the service instead of leaving it unready.
        logging.getLogger(__name__).error("stopping: %s", reason)
        failures.append(reason)
        server.should_exit = True

    lifecycle.on_failure(stop_on_failure)
    # Here and not in create_app: a test process runs many apps, and cycles among frozen
    # objects are never collected.
    lifecycle.on_ready(freeze_startup_heap)
    lifecycle.on_ready(cache_vllm_environment)
    server.run()
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
