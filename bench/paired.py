"""Paired runs: both servers up at once, runs alternated A B B A ..., medians of pair ratios.

On a shared, noisy machine two runs far apart in time see different loads; two runs back to back
see nearly the same. Each pair measures one cell on the service and on `vllm serve` in turn (the
order flips every pair), and the figure reported is the median over pairs of the ratio
service/vllm: throughput, TTFT p50 and p99, and CPU seconds of the API process per output token.
Reached through `python -m bench.compare --paired N`.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.adapters import BenchAdapters
from bench.measure import RssSampler, RunMetrics, event_loop_factory, summarize
from bench.rounds import HttpDriver, Plan
from bench.servers import (
    SERVICE,
    VLLM,
    TargetProcess,
    base_env,
    free_port,
    service_command,
    vllm_command,
    vllm_env,
)
from bench.workload import MIXES, PromptFactory, cell_requests

logger = logging.getLogger(__name__)

# (metric, the ratio's direction: True when higher is better for the service)
PAIRED_METRICS = {
    "output_tokens_per_s": True,
    "ttft_p50_ms": False,
    "ttft_p99_ms": False,
    "api_cpu_s_per_1k_tokens": False,
}
TARGET_RATIOS = {
    "output_tokens_per_s": 1.05,  # at least
    "ttft_p50_ms": 1.0,  # at most
    "ttft_p99_ms": 1.0,
    "api_cpu_s_per_1k_tokens": 0.6,
}


@dataclass
class PairedCell:
    """One cell's pairs: each target's runs, in pair order."""

    runs: dict[str, list[RunMetrics]] = field(default_factory=lambda: {SERVICE: [], VLLM: []})

    def ratios(self, metric: str) -> list[float]:
        pairs = zip(self.runs[SERVICE], self.runs[VLLM], strict=False)
        return [
            getattr(a, metric) / getattr(b, metric)
            for a, b in pairs
            if getattr(a, metric) is not None and getattr(b, metric)
        ]


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


async def _warm_up(drivers: dict[str, HttpDriver], plan: Plan, factory: PromptFactory) -> None:
    widest = max(cell.concurrency for cell in plan.cells)
    served = plan.engine.served_name
    for mix_name in dict.fromkeys(cell.mix for cell in plan.cells):
        warm = cell_requests(
            factory,
            plan.workload,
            served,
            MIXES[mix_name],
            max(widest, plan.workload.warmup_requests),
            len(plan.registered),
            "warm-up",
        )
        for driver in drivers.values():
            await driver.run(warm, widest)


async def _run_pairs(
    drivers: dict[str, HttpDriver],
    samplers: dict[str, RssSampler],
    plan: Plan,
    factory: PromptFactory,
    pairs: int,
) -> dict[str, PairedCell]:
    await _warm_up(drivers, plan, factory)
    result: dict[str, PairedCell] = {}
    for cell in plan.cells:
        paired = result[cell.key] = PairedCell()
        mix = MIXES[cell.mix]
        count = plan.workload.request_count(cell.concurrency)
        for number in range(pairs):
            requests = cell_requests(
                factory,
                plan.workload,
                plan.engine.served_name,
                mix,
                count,
                len(plan.registered),
                cell.concurrency,
                number,
            )
            order = (SERVICE, VLLM) if number % 2 == 0 else (VLLM, SERVICE)
            for target in order:
                samplers[target].window()
                records, seconds = await drivers[target].run(requests, cell.concurrency)
                metrics = summarize(
                    records, seconds, plan.workload.output_tokens, samplers[target].window()
                )
                paired.runs[target].append(metrics)
                logger.info(
                    "%s pair %d %s: %.1f tok/s, TTFT p50 %s ms, API CPU %s s/1k tokens, errors %d",
                    cell.key,
                    number + 1,
                    target,
                    metrics.output_tokens_per_s,
                    metrics.ttft_p50_ms,
                    metrics.api_cpu_s_per_1k_tokens,
                    metrics.errors,
                )
    return result


def run_paired(
    plan: Plan,
    factory: PromptFactory,
    adapters: BenchAdapters,
    log_dir: Path,
    timeout: float,
    pairs: int,
) -> dict[str, PairedCell]:
    """Start both servers, run every cell `pairs` times on each in alternation, stop them."""
    state_dir = Path(tempfile.mkdtemp(prefix="bench-state-"))
    ports = {SERVICE: free_port(), VLLM: free_port()}
    commands = {
        SERVICE: (service_command(plan.engine, adapters, ports[SERVICE], state_dir), base_env()),
        VLLM: (vllm_command(plan.engine, adapters, ports[VLLM]), vllm_env()),
    }
    processes: dict[str, TargetProcess] = {}
    try:
        for target, (command, env) in commands.items():
            processes[target] = TargetProcess(target, command, env, log_dir / f"{target}.log")
        drivers = {}
        for target, process in processes.items():
            base_url = f"http://127.0.0.1:{ports[target]}"
            startup = process.wait_ready(base_url, plan.engine.served_name, timeout)
            logger.info("%s ready in %.1f s", target, startup)
            drivers[target] = HttpDriver(base_url, target, plan.workload.output_tokens)
        samplers = {t: RssSampler(p.pid) for t, p in processes.items()}
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            return runner.run(_run_pairs(drivers, samplers, plan, factory, pairs))
    finally:
        for process in processes.values():
            process.stop()
        shutil.rmtree(state_dir, ignore_errors=True)


def paired_summary(cells: dict[str, PairedCell]) -> dict[str, Any]:
    """Per cell: medians of the pair ratios and of each target's own figures; the targets."""
    summary: dict[str, Any] = {}
    for key, cell in cells.items():
        entry: dict[str, Any] = {"pairs": len(cell.runs[SERVICE])}
        for metric in PAIRED_METRICS:
            ratios = cell.ratios(metric)
            entry[f"{metric}_ratio_median"] = _median(ratios)
            entry[f"{metric}_ratio_range"] = (
                [round(min(ratios), 3), round(max(ratios), 3)] if ratios else None
            )
            for target, runs in cell.runs.items():
                values = [getattr(r, metric) for r in runs if getattr(r, metric) is not None]
                entry[f"{metric}_{target}_median"] = _median(values)
        entry["errors"] = {t: sum(r.errors for r in runs) for t, runs in cell.runs.items()}
        summary[key] = entry
    return summary


def paired_checks(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The performance issue's targets on the paired ratios."""
    checks = []
    for key, entry in summary.items():
        for metric, higher_is_better in PAIRED_METRICS.items():
            ratio = entry[f"{metric}_ratio_median"]
            if ratio is None:
                continue
            bound = TARGET_RATIOS[metric]
            met = ratio >= bound if higher_is_better else ratio <= bound
            sign = ">=" if higher_is_better else "<="
            checks.append(
                {
                    "target": f"{metric} service/vllm {sign} {bound} [{key}]",
                    "met": met,
                    "detail": f"{ratio:.2f}x",
                }
            )
    return checks


def paired_table(summary: dict[str, Any], checks: list[dict[str, Any]]) -> str:
    """Markdown: the median pair ratios and each target's medians."""

    def fmt(value: Any, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    def ratio(entry: dict[str, Any], metric: str) -> str:
        spread = entry[f"{metric}_ratio_range"]
        text = fmt(entry[f"{metric}_ratio_median"])
        return f"{text} ({spread[0]:.2f}-{spread[1]:.2f})" if spread else text

    lines = [
        "Paired runs, service / vllm serve: median of per-pair ratios (min-max); "
        "both servers up, runs alternated",
        "",
        "| cell | pairs | throughput | TTFT p50 | TTFT p99 | API CPU per token "
        "| API CPU s/1k tokens service / vllm | errors s/v |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, entry in summary.items():
        lines.append(
            f"| {key} | {entry['pairs']} | {ratio(entry, 'output_tokens_per_s')} "
            f"| {ratio(entry, 'ttft_p50_ms')} | {ratio(entry, 'ttft_p99_ms')} "
            f"| {ratio(entry, 'api_cpu_s_per_1k_tokens')} "
            f"| {fmt(entry[f'api_cpu_s_per_1k_tokens_{SERVICE}_median'], 3)} / "
            f"{fmt(entry[f'api_cpu_s_per_1k_tokens_{VLLM}_median'], 3)} "
            f"| {entry['errors'][SERVICE]}/{entry['errors'][VLLM]} |"
        )
    met = sum(1 for c in checks if c["met"])
    lines += ["", f"Targets: {met} of {len(checks)} met", ""]
    lines += [f"- [{'x' if c['met'] else ' '}] {c['target']}: {c['detail']}" for c in checks]
    return "\n".join(lines)
