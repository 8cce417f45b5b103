"""A new adapter is saved to the registry file while the engine loads and probes it (fake engine).

The logic, fast: what the file holds during the probe, after a load that passed and after one the
probe refused. The real engine through HTTP: tests/test_real_adapters.py (the refused adapter is
not in the file) and tests/test_restart.py (loaded adapters survive SIGKILL).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from adapters.base_model import BaseModelSpec
from adapters.persistence import RegistryStore
from adapters.registry import AdapterRegistry
from adapters.validation import ValidationLimits
from server.admin.adapter_service import (
    AdapterService,
    AdapterSources,
    InvalidAdapter,
    LoadRequest,
)
from server.engine.protocol import (
    AdapterActivity,
    AdapterRef,
    CompletionDelta,
    GenerationChunk,
    Prompt,
    ResidentAdapter,
    Sampling,
    TokenLogprob,
)
from server.metrics import ServiceMetrics
from server.testbed.default_model import DefaultModel

BASE = "tiny-gemma4"


def _step(token: int, logprob: float) -> TokenLogprob:
    return TokenLogprob(token, str(token), logprob, [(token, str(token), logprob)])


class ProbedEngine:
    """Holds adapters; the probe's adapter request waits for `release`, then answers like the
    base (no effect) or not. Only the calls AdapterService makes on a load."""

    max_model_len = 1024

    def __init__(self, *, effect: bool) -> None:
        self.effect = effect
        self.adapters: set[int] = set()
        self.probing = asyncio.Event()
        self.release = asyncio.Event()

    async def generate(
        self, request_id: str, prompt: Prompt, sampling: Sampling, adapter: AdapterRef | None
    ) -> AsyncIterator[GenerationChunk]:
        logprob = -0.5
        if adapter is not None:
            self.probing.set()
            await self.release.wait()
            logprob += 0.1 if self.effect else 0.0
        step = _step(5, logprob)
        delta = CompletionDelta(0, "5", [5], [step], "length")
        yield GenerationChunk(request_id, 3, [delta], finished=True, prompt_logprobs=[step])

    async def add_adapter(self, adapter: AdapterRef) -> None:
        self.adapters.add(adapter.int_id)

    async def remove_adapter(self, int_id: int) -> bool:
        self.adapters.discard(int_id)
        return True

    async def pin_adapter(self, int_id: int) -> bool:
        return True

    async def list_adapters(self) -> set[int]:
        return set(self.adapters)

    async def adapter_residency(self) -> list[ResidentAdapter]:
        return []

    def adapter_activity(self) -> AdapterActivity:
        return AdapterActivity()


def _service(tiny: DefaultModel, engine: ProbedEngine, state: Path) -> AdapterService:
    return AdapterService(
        engine,  # type: ignore[arg-type]
        AdapterRegistry(BASE),
        RegistryStore(state),
        BaseModelSpec.from_model_dir(tiny.model_dir, BASE),
        ValidationLimits(max_rank=16, max_adapter_bytes=10_000_000, accepts_media=True),
        AdapterSources(
            roots=[tiny.adapters_dir.resolve()],
            upload_dir=state / "uploads",
            served_dir=state / "served",
        ),
        ServiceMetrics(10),
        host_cache_size=4,
    )


def _saved(state: Path) -> dict[str, bool]:
    """Name -> probed, as the registry file has it."""
    document = json.loads((state / "registry.json").read_text())
    return {entry["name"]: entry["probed"] for entry in document["adapters"]}


async def _load_while_probing(
    service: AdapterService, engine: ProbedEngine, state: Path
) -> tuple[asyncio.Task[object], dict[str, bool]]:
    load = asyncio.create_task(service.load(LoadRequest(name="fresh", path="demo-attn")))
    await engine.probing.wait()
    for _ in range(100):  # the save runs beside the probe: wait for it, not for the probe
        if (state / "registry.json").exists() and "fresh" in _saved(state):
            break
        await asyncio.sleep(0.01)
    during = _saved(state)
    assert not load.done() and service.registry.find("fresh") is None  # not served yet
    engine.release.set()
    return load, during


async def test_a_new_adapter_is_saved_during_its_probe_with_the_probe_due(
    tiny: DefaultModel, tmp_path: Path
) -> None:
    engine = ProbedEngine(effect=True)
    service = _service(tiny, engine, tmp_path)
    load, during = await _load_while_probing(service, engine, tmp_path)
    assert during == {"fresh": False}  # a crash now: restored, and probed at first use
    record = await load
    assert service.registry.find("fresh") is record
    assert "fresh" in _saved(tmp_path)  # in the file before the load returned
    await service.shutdown()  # waits for the follow-up save
    assert _saved(tmp_path) == {"fresh": True}


async def test_a_refused_adapter_is_withdrawn_from_the_file(
    tiny: DefaultModel, tmp_path: Path
) -> None:
    engine = ProbedEngine(effect=False)
    service = _service(tiny, engine, tmp_path)
    load, during = await _load_while_probing(service, engine, tmp_path)
    assert during == {"fresh": False}
    with pytest.raises(InvalidAdapter, match="it changes nothing here"):
        await load
    assert _saved(tmp_path) == {}
    assert service.registry.find("fresh") is None and engine.adapters == set()


async def test_a_replace_is_saved_only_once_it_passed(tiny: DefaultModel, tmp_path: Path) -> None:
    engine = ProbedEngine(effect=True)
    engine.release.set()
    service = _service(tiny, engine, tmp_path)
    first = await service.load(LoadRequest(name="fresh", path="demo-attn"))
    await service.shutdown()
    engine.release.clear()
    engine.probing.clear()
    replace = asyncio.create_task(
        service.load(LoadRequest(name="fresh", path="demo-mlp", replace=True))
    )
    await engine.probing.wait()
    await asyncio.sleep(0.05)
    document = json.loads((tmp_path / "registry.json").read_text())
    assert [(e["name"], e["int_id"]) for e in document["adapters"]] == [("fresh", first.int_id)]
    engine.release.set()
    second = await replace
    document = json.loads((tmp_path / "registry.json").read_text())
    assert [(e["name"], e["int_id"]) for e in document["adapters"]] == [("fresh", second.int_id)]
