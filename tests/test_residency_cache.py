"""The residency answer is cached: asked of the engine only after an event that may change it.

Fast unit tests on a fake engine counting its residency RPCs; tests/test_metrics.py proves the
scraped residency on the real engine through HTTP.
"""

from __future__ import annotations

import pytest

from server.engine.protocol import EngineDeadError, ResidentAdapter, Sampling
from server.engine.residency_cache import MAX_AGE_SECONDS, ResidencyCache
from server.engine.supervisor import EngineSupervisor, RestartPolicy
from server.lifecycle import Phase, ServiceLifecycle
from server.metrics import ServiceMetrics
from tests.test_supervisor_logic import ADAPTER, FakeEngine, prompt


class CountingEngine(FakeEngine):
    def __init__(self) -> None:
        super().__init__()
        self.residency_calls = 0

    async def adapter_residency(self) -> list[ResidentAdapter]:
        self.residency_calls += 1
        return await super().adapter_residency()


def supervised(engine: CountingEngine) -> EngineSupervisor:
    lifecycle = ServiceLifecycle()
    lifecycle.phase = Phase.READY
    return EngineSupervisor(engine, lifecycle, ServiceMetrics(10), RestartPolicy(3, 600), None)


def ids(residency: list[ResidentAdapter]) -> set[int]:
    return {entry.int_id for entry in residency}


async def test_scrapes_without_a_change_cost_one_rpc_and_a_load_is_seen_at_once() -> None:
    engine = CountingEngine()
    supervisor = supervised(engine)
    for _ in range(10):
        assert await supervisor.adapter_residency() == []
    assert engine.residency_calls == 1
    await supervisor.add_adapter(ADAPTER)  # a load (or a first use's on-demand load)
    assert ids(await supervisor.adapter_residency()) == {ADAPTER.int_id}
    assert ids(await supervisor.adapter_residency()) == {ADAPTER.int_id}
    assert engine.residency_calls == 2
    await supervisor.pin_adapter(ADAPTER.int_id)
    await supervisor.adapter_residency()
    await supervisor.remove_adapter(ADAPTER.int_id)
    assert await supervisor.adapter_residency() == []
    assert engine.residency_calls == 4


async def test_a_finished_request_on_an_adapter_makes_the_next_read_ask() -> None:
    engine = CountingEngine()
    supervisor = supervised(engine)
    await supervisor.adapter_residency()
    base_only = supervisor.generate("b", prompt(), Sampling(max_tokens=2), None)
    assert [c async for c in base_only][-1].finished
    await supervisor.adapter_residency()
    assert engine.residency_calls == 1  # a base-model request moves no adapter
    on_adapter = supervisor.generate("a", prompt(), Sampling(max_tokens=2), ADAPTER)
    assert [c async for c in on_adapter][-1].finished
    await supervisor.adapter_residency()
    await supervisor.adapter_residency()
    assert engine.residency_calls == 2


async def test_no_answer_while_no_engine_serves() -> None:
    engine = CountingEngine()
    supervisor = supervised(engine)
    await supervisor.adapter_residency()
    engine.alive = False
    with pytest.raises(EngineDeadError):
        await supervisor.check_health()
    with pytest.raises(EngineDeadError):
        await supervisor.adapter_residency()  # not the dead engine's cached answer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Asker:
    def __init__(self) -> None:
        self.calls = 0
        self.answer = [ResidentAdapter(1, "gpu", False)]

    async def __call__(self) -> list[ResidentAdapter]:
        self.calls += 1
        return list(self.answer)


async def test_while_requests_run_the_answer_is_at_most_max_age_old() -> None:
    clock, ask = Clock(), Asker()
    cache = ResidencyCache(clock=clock)
    await cache.get(ask)
    cache.request_started()
    cache.request_started()
    ask.answer = [ResidentAdapter(2, "gpu", False)]  # the scheduler moved adapters
    clock.now += MAX_AGE_SECONDS / 2
    assert ids(await cache.get(ask)) == {1}  # younger than the bound: the cached answer
    assert ask.calls == 1
    clock.now += MAX_AGE_SECONDS / 2
    assert ids(await cache.get(ask)) == {2}  # as old as the bound: asked again
    assert ask.calls == 2
    cache.request_ended()
    assert ids(await cache.get(ask)) == {2}  # one still runs, and the answer is young
    assert ask.calls == 2
    cache.request_ended()
    await cache.get(ask)  # none runs now: the next read is exact
    assert ask.calls == 3
    clock.now += 60
    await cache.get(ask)  # and stays so, however old, until an event
    assert ask.calls == 3


async def test_a_load_while_requests_run_is_not_hidden_by_the_age_bound() -> None:
    clock, ask = Clock(), Asker()
    cache = ResidencyCache(clock=clock)
    cache.request_started()
    await cache.get(ask)
    cache.invalidate()
    await cache.get(ask)
    assert ask.calls == 2


async def test_an_event_during_the_rpc_leaves_its_answer_marked_old() -> None:
    cache = ResidencyCache(clock=Clock())
    calls = 0

    async def ask_while_loading() -> list[ResidentAdapter]:
        nonlocal calls
        calls += 1
        if calls == 1:
            cache.invalidate()  # an adapter added while the RPC was under way
        return []

    await cache.get(ask_while_loading)
    await cache.get(ask_while_loading)
    assert calls == 2
