"""The engine supervisor: the engine the services use, replaced in-process when it dies.

`EngineSupervisor` implements `InferenceEngine` by forwarding to the current engine, so services
hold the supervisor and never see an engine swap. The first call that finds the engine dead (a
request, a probe or the watchdog) turns the service to RESTARTING at once, so requests and
`/ready` agree from that moment; in-flight requests end with EngineDeadError (503). A new engine
is then started with backoff, the registered adapters are loaded into it again (same ids, pins),
and the service is READY again. Only when the engine keeps dying (more than `max_restarts` within
`window_seconds`) does the service fail, and the CLI exit with status 1 as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from server.engine.crash_guard import CrashGuard, request_fingerprint
from server.engine.protocol import (
    AdapterActivity,
    AdapterRef,
    EngineDeadError,
    EngineError,
    GenerationChunk,
    InferenceEngine,
    Prompt,
    ResidentAdapter,
    Sampling,
)
from server.engine.residency_cache import ResidencyCache
from server.lifecycle import ServiceLifecycle
from server.metrics import ServiceMetrics

logger = logging.getLogger(__name__)
T = TypeVar("T")

EngineFactory = Callable[[], Awaitable[InferenceEngine]]
AdapterRestorer = Callable[[], Awaitable[None]]

RESTARTING = "the inference engine stopped and is restarting; retry shortly"
STOPPED = "the inference engine stopped"
REFUSED = (
    "this request crashed the inference engine twice in a row and is refused; "
    "change it (or report it to the operator) instead of retrying"
)
MAX_BACKOFF_SECONDS = 30.0


@dataclass(frozen=True)
class RestartPolicy:
    """How often the engine may be restarted before the service gives up."""

    max_restarts: int
    window_seconds: float

    @staticmethod
    def backoff(recent_restarts: int) -> float:
        """Wait before a restart: none for the first in the window, then 1, 3, 7 ... 30 s."""
        return min(MAX_BACKOFF_SECONDS, 2.0**recent_restarts - 1)


@dataclass
class _Running:
    """A request on an engine: what the crash guard needs if that engine dies under it."""

    engine: InferenceEngine
    prompt: Prompt
    sampling: Sampling
    adapter: AdapterRef | None
    produced: bool = False  # has the engine returned output for it yet
    _fingerprint: str | None = field(default=None, repr=False)

    def fingerprint(self) -> str:
        # Computed only when needed (a death, or a guard that remembers something).
        if self._fingerprint is None:
            self._fingerprint = request_fingerprint(self.prompt, self.sampling, self.adapter)
        return self._fingerprint


class EngineSupervisor:
    """`InferenceEngine` forwarding to the current engine and restarting it when it dies.

    With `start_engine` the supervisor owns its engines: it starts replacements and shuts them
    down. Without it the engine belongs to the caller, and its death fails the service.
    """

    def __init__(
        self,
        engine: InferenceEngine,
        lifecycle: ServiceLifecycle,
        metrics: ServiceMetrics,
        policy: RestartPolicy,
        start_engine: EngineFactory | None = None,
    ) -> None:
        self._engine: InferenceEngine | None = engine
        self._max_model_len = engine.max_model_len  # same settings, same value after a restart
        self._lifecycle = lifecycle
        self._metrics = metrics
        self._policy = policy
        self._start_engine = start_engine
        self._restore_adapters: AdapterRestorer | None = None
        self._running: dict[str, _Running] = {}
        self._guard = CrashGuard()
        self._dead: list[InferenceEngine] = []  # owned engines to shut down
        self._restarts: deque[float] = deque()  # monotonic times of recent restarts
        self._restarting: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._residency = ResidencyCache()

    def restore_adapters_with(self, restore: AdapterRestorer) -> None:
        """What loads the registered adapters into a new engine before it serves."""
        self._restore_adapters = restore

    # InferenceEngine

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    async def generate(
        self, request_id: str, prompt: Prompt, sampling: Sampling, adapter: AdapterRef | None
    ) -> AsyncIterator[GenerationChunk]:
        """The current engine's stream; refused (400) if the request crashed it twice in a row."""
        engine = self._current()
        running = _Running(engine, prompt, sampling, adapter)
        if len(self._guard) and self._guard.refuses(running.fingerprint()):
            logger.warning("request refused: it crashed the engine twice in a row")
            raise EngineError(REFUSED, is_client_fault=True)
        self._running[request_id] = running
        if adapter is not None:  # its scheduling may move adapters between slots and caches
            self._residency.request_started()
        try:
            async for chunk in engine.generate(request_id, prompt, sampling, adapter):
                running.produced = True
                yield chunk
        except EngineDeadError as exc:
            self._engine_died(engine)
            raise EngineDeadError(RESTARTING if self._start_engine else STOPPED) from exc
        else:
            if len(self._guard):
                self._guard.acquit(running.fingerprint())
        finally:
            self._running.pop(request_id, None)
            if adapter is not None:
                self._residency.request_ended()

    async def abort(self, request_id: str) -> None:
        running = self._running.pop(request_id, None)
        engine = running.engine if running else self._engine
        if engine is None:
            return
        with contextlib.suppress(EngineDeadError):  # a dead engine runs nothing to abort
            await engine.abort(request_id)

    async def add_adapter(self, adapter: AdapterRef) -> None:
        await self._changing_residency(lambda engine: engine.add_adapter(adapter))

    async def remove_adapter(self, int_id: int) -> bool:
        return await self._changing_residency(lambda engine: engine.remove_adapter(int_id))

    async def pin_adapter(self, int_id: int) -> bool:
        return await self._changing_residency(lambda engine: engine.pin_adapter(int_id))

    async def list_adapters(self) -> set[int]:
        return await self._forward(lambda engine: engine.list_adapters())

    async def adapter_residency(self) -> list[ResidentAdapter]:
        """The engine's LoRA residency; asked of it only when it may have changed (see
        `server.engine.residency_cache`: up to 1 s old while requests on adapters run)."""
        self._current()  # while no engine serves: EngineDeadError, not an old answer
        return await self._residency.get(
            lambda: self._forward(lambda engine: engine.adapter_residency())
        )

    def adapter_activity(self) -> AdapterActivity:
        return self._engine.adapter_activity() if self._engine else AdapterActivity()

    def running_request_count(self) -> int:
        return self._engine.running_request_count() if self._engine else 0

    async def check_health(self) -> None:
        """Raises EngineDeadError while no engine serves; a death found here starts a restart."""
        await self._forward(lambda engine: engine.check_health())

    async def shutdown(self) -> None:
        """Stop restarting; shut down the engines this supervisor owns (a starting one too)."""
        self._stopping.set()
        if self._restarting is not None:
            await self._restarting  # an engine half-started must still be stopped, not orphaned
        if self._start_engine is not None and self._engine is not None:
            self._dead.append(self._engine)
        self._engine = None
        await self._bury()

    # Supervision

    def _current(self) -> InferenceEngine:
        if self._engine is None:
            restarting = self._restarting is not None and not self._restarting.done()
            raise EngineDeadError(RESTARTING if restarting else STOPPED)
        return self._engine

    async def _forward(self, call: Callable[[InferenceEngine], Awaitable[T]]) -> T:
        engine = self._current()
        try:
            return await call(engine)
        except EngineDeadError as exc:
            self._engine_died(engine)
            raise EngineDeadError(RESTARTING if self._start_engine else STOPPED) from exc

    async def _changing_residency(self, call: Callable[[InferenceEngine], Awaitable[T]]) -> T:
        """`_forward` a call that adds, removes or pins an adapter: the residency is asked anew."""
        try:
            return await self._forward(call)
        finally:
            self._residency.invalidate()

    def _engine_died(self, engine: InferenceEngine) -> None:
        """Called synchronously by whoever sees the death first, so readiness turns at once."""
        if engine is not self._engine:
            return  # already noticed
        self._engine = None
        self._blame_suspects(engine)
        if self._start_engine is None:
            self._lifecycle.fail(STOPPED)  # not ours to restart
            return
        self._dead.append(engine)
        if self._lifecycle.engine_died():
            logger.error("the inference engine died")
            # A fresh context: the restart's log lines are not the noticing request's.
            self._restarting = asyncio.create_task(self._restart(), context=contextvars.Context())

    def _blame_suspects(self, engine: InferenceEngine) -> None:
        # A request that crashes the engine mostly does so before its first output (prefill,
        # media encoders); requests that already produced output ran through a step unharmed.
        # When every request had output (a crash in decoding), all of them are suspects.
        suspects = [r for r in self._running.values() if r.engine is engine]
        for running in [r for r in suspects if not r.produced] or suspects:
            self._guard.blame(running.fingerprint())

    async def _restart(self) -> None:
        """Start a new engine with backoff until one serves, the limit is hit, or a stop."""
        started = time.perf_counter()
        while not self._stopping.is_set():
            await self._bury()  # the dead engine's processes go first: no orphans, memory back
            now = time.monotonic()
            while self._restarts and now - self._restarts[0] > self._policy.window_seconds:
                self._restarts.popleft()
            if len(self._restarts) >= self._policy.max_restarts:
                reason = (
                    f"the inference engine died after {len(self._restarts)} restarts in "
                    f"{self._policy.window_seconds:g} s"
                )
                logger.error("giving up: %s", reason)
                self._lifecycle.fail(reason)
                return
            delay = self._policy.backoff(len(self._restarts))
            self._restarts.append(now)
            logger.warning(
                "restarting the inference engine in %g s (restart %d of at most %d in %g s)",
                delay,
                len(self._restarts),
                self._policy.max_restarts,
                self._policy.window_seconds,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                return
            if await self._start_and_restore():
                self._metrics.engine_restarts.inc()
                self._lifecycle.engine_restarted()
                logger.info("inference engine restarted in %.1f s", time.perf_counter() - started)
                return
            self._metrics.engine_restart_failures.inc()

    async def _start_and_restore(self) -> bool:
        """A new engine with the registered adapters; False (engine buried) if that failed."""
        assert self._start_engine is not None
        try:
            engine = await self._start_engine()
        except Exception:
            logger.exception("the inference engine could not be restarted")
            return False
        self._engine = engine
        self._residency.invalidate()  # the new engine holds nothing yet
        try:
            if self._restore_adapters is not None:
                await self._restore_adapters()
        except Exception:
            logger.exception("the adapters could not be restored on the new engine")
            if self._engine is engine:  # not already noticed dead
                self._engine = None
                self._dead.append(engine)
            return False
        return True

    async def _bury(self) -> None:
        while self._dead:
            engine = self._dead.pop()
            try:
                await engine.shutdown()
            except Exception:
                logger.exception("a dead inference engine did not shut down cleanly")
