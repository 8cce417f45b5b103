"""One round on one running target: warm-up, every cell, hot loads. Same code for every target.

A driver sends requests: over HTTP for the two servers (`HttpDriver`), straight into the engine
for the engine alone (`bench.engine_alone.EngineDriver`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bench.http_client import HotLoad, hot_load, run_requests
from bench.measure import RequestRecord, RssSampler, RunMetrics, summarize
from bench.workload import (
    ADMIN_KEY,
    MIXES,
    BenchRequest,
    Cell,
    EngineConfig,
    PromptFactory,
    WorkloadConfig,
    cell_requests,
    to_json,
    workload_from_json,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What every round runs, on every target."""

    engine: EngineConfig
    workload: WorkloadConfig
    cells: list[Cell]
    registered: dict[str, str]  # adapter name -> folder, served from start-up
    hot: dict[str, str]  # adapter name -> folder, loaded during the round

    def to_json(self) -> dict[str, Any]:
        return dict(to_json(self))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        return cls(
            engine=EngineConfig(**data["engine"]),
            workload=workload_from_json(data["workload"]),
            cells=[Cell(**cell) for cell in data["cells"]],
            registered=dict(data["registered"]),
            hot=dict(data["hot"]),
        )


class Driver(Protocol):
    async def run(
        self, requests: Sequence[BenchRequest], concurrency: int
    ) -> tuple[list[RequestRecord], float]: ...

    async def hot_load(self, name: str, path: str, request: BenchRequest) -> HotLoad: ...


@dataclass
class RoundResult:
    """One target, one start: a run per cell, the hot loads, the whole round's peak RSS."""

    cells: dict[str, RunMetrics] = field(default_factory=dict)
    hot_loads: list[HotLoad] = field(default_factory=list)
    peak_rss_mib: float | None = None
    startup_seconds: float | None = None
    error: str | None = None


class HttpDriver:
    """The servers, through the one HTTP client."""

    def __init__(self, base_url: str, kind: str, output_tokens: int) -> None:
        self.base_url = base_url
        self.kind = kind
        self.output_tokens = output_tokens

    async def run(
        self, requests: Sequence[BenchRequest], concurrency: int
    ) -> tuple[list[RequestRecord], float]:
        bodies = [r.http_body(self.output_tokens) for r in requests]
        return await run_requests(self.base_url, bodies, concurrency)

    async def hot_load(self, name: str, path: str, request: BenchRequest) -> HotLoad:
        body = request.http_body(self.output_tokens)
        if self.kind == "service":  # the admin API; paths are relative to --adapter-roots
            return await hot_load(
                self.base_url, "/v1/adapters", {"name": name, "path": name}, ADMIN_KEY, body
            )
        return await hot_load(
            self.base_url,
            "/v1/load_lora_adapter",
            {"lora_name": name, "lora_path": path},
            ADMIN_KEY,
            body,
        )


def _hot_request(plan: Plan, factory: PromptFactory, name: str) -> BenchRequest:
    rng = random.Random(f"{plan.workload.seed}|hot|{name}")
    return BenchRequest(name, factory.text(rng, plan.workload.prompt_tokens))


async def run_round(
    driver: Driver,
    plan: Plan,
    factory: PromptFactory,
    sampler: RssSampler,
    label: str,
) -> RoundResult:
    """Warm the target up, measure every cell, then the hot loads."""
    result = RoundResult()
    workload = plan.workload
    registered = len(plan.registered)
    served = plan.engine.served_name
    # First requests pay for lazy initialisation (media processor, adapter loads, first batches
    # of each size): a full batch of every mix at the highest concurrency, not measured.
    widest = max(cell.concurrency for cell in plan.cells)
    for mix_name in dict.fromkeys(cell.mix for cell in plan.cells):
        mix = MIXES[mix_name]
        count = max(widest, workload.warmup_requests)
        warm = cell_requests(factory, workload, served, mix, count, registered, "warm-up")
        await driver.run(warm, widest)
    for cell in plan.cells:
        mix = MIXES[cell.mix]
        warm_count = min(cell.concurrency, workload.warmup_requests)
        warm = cell_requests(factory, workload, served, mix, warm_count, registered, "cell-warm-up")
        await driver.run(warm, cell.concurrency)
        requests = cell_requests(
            factory,
            workload,
            served,
            mix,
            workload.request_count(cell.concurrency),
            registered,
            cell.concurrency,
        )
        sampler.window()
        records, seconds = await driver.run(requests, cell.concurrency)
        metrics = summarize(records, seconds, workload.output_tokens, sampler.window())
        result.cells[cell.key] = metrics
        logger.info(
            "%s %s: %.1f tok/s, %.2f req/s, TTFT p50 %s ms, ITL p50 %s ms, errors %d%s",
            label,
            cell.key,
            metrics.output_tokens_per_s,
            metrics.requests_per_s,
            metrics.ttft_p50_ms,
            metrics.itl_p50_ms,
            metrics.errors,
            f" ({metrics.first_error})" if metrics.first_error else "",
        )
    for name, path in plan.hot.items():
        loaded = await driver.hot_load(name, path, _hot_request(plan, factory, name))
        result.hot_loads.append(loaded)
        logger.info(
            "%s hot load %s: load %.0f ms, first token %s ms%s",
            label,
            name,
            loaded.load_seconds * 1000,
            None
            if loaded.first_token_seconds is None
            else round(loaded.first_token_seconds * 1000),
            f" ({loaded.error})" if loaded.error else "",
        )
    result.peak_rss_mib = round(sampler.peak / 2**20, 1)
    return result
