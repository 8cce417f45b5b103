"""The service's phases: readiness listeners, and the start-up heap freeze of `python -m server`."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from server.__main__ import freeze_startup_heap
from server.lifecycle import Phase, ServiceLifecycle


def test_ready_listeners_run_before_readiness_turns_true() -> None:
    lifecycle = ServiceLifecycle()
    seen: list[Phase] = []
    lifecycle.on_ready(lambda: seen.append(lifecycle.phase))
    lifecycle.ready()
    assert seen == [Phase.STARTING]
    assert lifecycle.phase is Phase.READY
    lifecycle.ready()  # already ready: listeners are not called again
    assert seen == [Phase.STARTING]


def test_no_readiness_after_a_stop_began() -> None:
    lifecycle = ServiceLifecycle()
    called: list[bool] = []
    lifecycle.on_ready(lambda: called.append(True))
    lifecycle.drain()
    lifecycle.ready()
    assert lifecycle.phase is Phase.DRAINING
    assert not called


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # this test process creates many apps: nothing of theirs may stay frozen


def test_the_startup_heap_is_frozen(unfrozen: None) -> None:
    assert gc.get_freeze_count() == 0
    alive = [[i] for i in range(1000)]  # tracked containers that survive start-up
    freeze_startup_heap()
    assert gc.get_freeze_count() >= len(alive)
