"""The supervisor's logic on a fake engine: restart, limits, shutdown, the poison-request guard.

Fast unit tests of the decisions; tests/test_engine_supervision.py proves the same on the real
engine through HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest
from PIL import Image

from server.engine.crash_guard import CrashGuard, request_fingerprint
from server.engine.protocol import (
    AdapterActivity,
    AdapterRef,
    CompletionDelta,
    EngineDeadError,
    EngineError,
    GenerationChunk,
    InferenceEngine,
    Prompt,
    ResidentAdapter,
    Sampling,
)
from server.engine.supervisor import EngineSupervisor, RestartPolicy
from server.lifecycle import Phase, ServiceLifecycle
from server.metrics import ServiceMetrics

ADAPTER = AdapterRef("a", 7, "/adapters/a")


class FakeEngine:
    """Yields one token per step until told to die; then every call raises EngineDeadError."""

    max_model_len = 1024

    def __init__(self) -> None:
        self.alive = True
        self.adapters: set[int] = set()
        self.pinned: set[int] = set()
        self.shut_down = False

    def _check(self) -> None:
        if not self.alive:
            raise EngineDeadError("the inference engine stopped")

    async def generate(
        self, request_id: str, prompt: Prompt, sampling: Sampling, adapter: AdapterRef | None
    ) -> AsyncIterator[GenerationChunk]:
        steps = sampling.max_tokens or 1
        for step in range(steps):
            await asyncio.sleep(0)
            self._check()
            delta = CompletionDelta(0, "x", [1], None, "length" if step == steps - 1 else None)
            yield GenerationChunk(request_id, 3, [delta], finished=step == steps - 1)

    async def abort(self, request_id: str) -> None:
        self._check()

    async def add_adapter(self, adapter: AdapterRef) -> None:
        self._check()
        self.adapters.add(adapter.int_id)

    async def remove_adapter(self, int_id: int) -> bool:
        self._check()
        return bool(self.adapters.discard(int_id))

    async def pin_adapter(self, int_id: int) -> bool:
        self._check()
        self.pinned.add(int_id)
        return True

    async def list_adapters(self) -> set[int]:
        self._check()
        return set(self.adapters)

    async def adapter_residency(self) -> list[ResidentAdapter]:
        self._check()
        return [ResidentAdapter(int_id, "cpu", False) for int_id in self.adapters]

    def adapter_activity(self) -> AdapterActivity:
        return AdapterActivity()

    def running_request_count(self) -> int:
        return 0

    async def check_health(self) -> None:
        self._check()

    async def shutdown(self) -> None:
        self.shut_down = True


class Harness:
    """A supervisor over fake engines, ready, with a restore step that loads ADAPTER pinned."""

    def __init__(self, policy: RestartPolicy, failing_starts: int = 0) -> None:
        self.engines = [FakeEngine()]
        self.failing_starts = failing_starts
        self.lifecycle = ServiceLifecycle()
        self.lifecycle.phase = Phase.READY
        self.failures: list[str] = []
        self.lifecycle.on_failure(self.failures.append)
        self.metrics = ServiceMetrics(10)
        self.supervisor = EngineSupervisor(
            self.engines[0], self.lifecycle, self.metrics, policy, self.start
        )
        self.supervisor.restore_adapters_with(self.restore)

    async def start(self) -> InferenceEngine:
        if self.failing_starts:
            self.failing_starts -= 1
            raise RuntimeError("no memory")
        self.engines.append(FakeEngine())
        return self.engines[-1]

    async def restore(self) -> None:
        await self.supervisor.add_adapter(ADAPTER)
        await self.supervisor.pin_adapter(ADAPTER.int_id)

    def metric(self, name: str) -> float:
        return self.metrics.registry.get_sample_value(name) or 0.0

    async def engine_dies(self) -> None:
        """The newest engine dies; the next health check finds it dead (and raises)."""
        self.engines[-1].alive = False
        with pytest.raises(EngineDeadError):
            await self.supervisor.check_health()

    async def until(self, phase: Phase, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while self.lifecycle.phase is not phase:
                await asyncio.sleep(0.01)


def prompt(text: str = "hello") -> Prompt:
    return Prompt(text)


async def test_death_mid_stream_turns_restarting_at_once_then_ready_on_a_new_engine() -> None:
    h = Harness(RestartPolicy(max_restarts=3, window_seconds=600))
    stream = h.supervisor.generate("r1", prompt(), Sampling(max_tokens=5), None)
    await anext(stream)
    h.engines[0].alive = False
    with pytest.raises(EngineDeadError, match="restarting"):
        await anext(stream)
    assert h.lifecycle.phase is Phase.RESTARTING  # in the same step that raised, no lag
    await h.until(Phase.READY)
    assert len(h.engines) == 2 and h.engines[0].shut_down and not h.engines[1].shut_down
    assert h.engines[1].adapters == {7} and h.engines[1].pinned == {7}  # restored before ready
    chunks = [c async for c in h.supervisor.generate("r2", prompt(), Sampling(max_tokens=2), None)]
    assert chunks[-1].finished
    assert h.metric("gemma_server_engine_restarts_total") == 1
    await h.supervisor.shutdown()
    assert h.engines[1].shut_down


async def test_a_probe_finds_the_death_and_calls_while_restarting_get_engine_dead() -> None:
    h = Harness(RestartPolicy(max_restarts=3, window_seconds=600), failing_starts=1)
    await h.engine_dies()
    assert h.lifecycle.phase is Phase.RESTARTING
    with pytest.raises(EngineDeadError, match="restarting"):
        await anext(h.supervisor.generate("r", prompt(), Sampling(), None))
    await h.until(Phase.READY)  # the first start failed; the second came after a backoff
    assert h.metric("gemma_server_engine_restart_failures_total") == 1
    assert h.metric("gemma_server_engine_restarts_total") == 1
    await h.supervisor.shutdown()


async def test_the_service_fails_when_the_engine_keeps_dying() -> None:
    h = Harness(RestartPolicy(max_restarts=1, window_seconds=600))
    await h.engine_dies()
    await h.until(Phase.READY)
    await h.engine_dies()
    await h.until(Phase.FAILED)
    assert h.failures and "1 restarts in 600 s" in h.failures[0]
    assert all(engine.shut_down for engine in h.engines) and len(h.engines) == 2
    await h.supervisor.shutdown()


async def test_no_restarts_allowed_fails_at_the_first_death() -> None:
    h = Harness(RestartPolicy(max_restarts=0, window_seconds=600))
    await h.engine_dies()
    await h.until(Phase.FAILED)
    assert len(h.engines) == 1


async def test_a_callers_engine_is_not_restarted_nor_shut_down() -> None:
    engine = FakeEngine()
    lifecycle = ServiceLifecycle()
    lifecycle.phase = Phase.READY
    supervisor = EngineSupervisor(
        engine, lifecycle, ServiceMetrics(10), RestartPolicy(3, 600), start_engine=None
    )
    engine.alive = False
    with pytest.raises(EngineDeadError, match="stopped"):
        await supervisor.check_health()
    assert lifecycle.phase is Phase.FAILED
    await supervisor.shutdown()
    assert not engine.shut_down


async def test_shutdown_during_backoff_stops_at_once() -> None:
    h = Harness(RestartPolicy(max_restarts=5, window_seconds=600), failing_starts=5)
    await h.engine_dies()
    await asyncio.sleep(0.1)  # first start failed; now waiting 1 s before the next
    h.lifecycle.drain()
    async with asyncio.timeout(0.5):
        await h.supervisor.shutdown()
    assert h.engines[0].shut_down and h.lifecycle.phase is Phase.DRAINING


async def test_a_request_suspected_in_two_deaths_in_a_row_is_refused() -> None:
    h = Harness(RestartPolicy(max_restarts=5, window_seconds=600))
    poison = prompt("kill")
    for round_ in range(2):
        innocent = h.supervisor.generate(f"ok{round_}", prompt(), Sampling(max_tokens=50), None)
        await anext(innocent)  # it already ran through a step
        suspect = h.supervisor.generate(f"p{round_}", poison, Sampling(max_tokens=50), ADAPTER)
        waiting = asyncio.ensure_future(anext(suspect))
        h.engines[-1].alive = False  # dies before the suspect's first output
        with pytest.raises(EngineDeadError):
            await waiting
        with pytest.raises(EngineDeadError):
            await anext(innocent)
        await h.until(Phase.READY)
    with pytest.raises(EngineError, match="twice in a row") as refused:
        await anext(h.supervisor.generate("p3", poison, Sampling(max_tokens=50), ADAPTER))
    assert refused.value.is_client_fault
    # Keyed on what the engine sees: the innocent one, and the same prompt otherwise, still run.
    assert [c async for c in h.supervisor.generate("ok", prompt(), Sampling(max_tokens=50), None)]
    assert [c async for c in h.supervisor.generate("p4", poison, Sampling(max_tokens=2), ADAPTER)]
    await h.supervisor.shutdown()


async def test_a_request_that_succeeds_between_deaths_is_acquitted() -> None:
    h = Harness(RestartPolicy(max_restarts=5, window_seconds=600))
    request = (prompt("maybe"), Sampling(max_tokens=3), None)
    for round_ in range(2):
        stream = h.supervisor.generate(f"r{round_}", *request)
        waiting = asyncio.ensure_future(anext(stream))
        h.engines[-1].alive = False
        with pytest.raises(EngineDeadError):
            await waiting
        await h.until(Phase.READY)
        if round_ == 0:
            assert [c async for c in h.supervisor.generate("fine", *request)]
    # One crash since its last success: still served.
    assert [c async for c in h.supervisor.generate("again", *request)]
    await h.supervisor.shutdown()


def test_the_guard_is_a_bounded_lru() -> None:
    guard = CrashGuard(capacity=3, crashes_to_refuse=2)
    for key in ["a", "a", "b", "c", "d"]:
        guard.blame(key)
    assert len(guard) == 3
    assert not guard.refuses("a")  # the oldest went first
    guard.blame("d")
    assert guard.refuses("d")
    guard.acquit("d")
    assert not guard.refuses("d")


def test_the_fingerprint_covers_what_the_engine_sees() -> None:
    image = Image.new("RGB", (4, 4), "red")
    audio = np.zeros(1600, dtype=np.float32)
    base = request_fingerprint(Prompt("p", [image], [audio]), Sampling(), ADAPTER)
    assert base == request_fingerprint(
        Prompt("p", [image.copy()], [audio.copy()]), Sampling(), ADAPTER
    )
    variants = [
        Prompt("q", [image], [audio]),
        Prompt("p", [Image.new("RGB", (4, 4), "blue")], [audio]),
        Prompt("p", [image], [np.ones(1600, dtype=np.float32)]),
    ]
    others = {request_fingerprint(v, Sampling(), ADAPTER) for v in variants}
    others.add(request_fingerprint(Prompt("p", [image], [audio]), Sampling(seed=1), ADAPTER))
    others.add(request_fingerprint(Prompt("p", [image], [audio]), Sampling(), None))
    assert base not in others and len(others) == 5
