"""Medians over repetitions, ratios between targets, the issue's targets, and the tables."""

from __future__ import annotations

import statistics
from dataclasses import fields
from typing import Any

from bench.measure import RunMetrics
from bench.rounds import RoundResult
from bench.servers import ENGINE, SERVICE, VLLM
from bench.workload import Cell

NUMERIC = [f.name for f in fields(RunMetrics) if f.name not in ("first_error",)]


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def median_runs(runs: list[RunMetrics]) -> dict[str, Any]:
    """Each metric's median over the repetitions; errors are summed."""
    summary: dict[str, Any] = {
        name: _median([getattr(run, name) for run in runs]) for name in NUMERIC
    }
    summary["errors"] = sum(run.errors for run in runs)
    summary["requests"] = sum(run.requests for run in runs)
    summary["repetitions"] = len(runs)
    summary["first_error"] = next((r.first_error for r in runs if r.first_error), None)
    return summary


def aggregate(rounds: dict[str, list[RoundResult]], cells: list[Cell]) -> dict[str, Any]:
    """Per cell: each target's medians, and the ratios of the service to the others."""
    result: dict[str, Any] = {"cells": {}, "hot_load": {}, "peak_rss_mib": {}}
    for cell in cells:
        entry: dict[str, Any] = {}
        runs_of: dict[str, list[RunMetrics]] = {}
        for target, target_rounds in rounds.items():
            runs = [r.cells[cell.key] for r in target_rounds if cell.key in r.cells]
            runs_of[target] = runs
            if runs:
                entry[target] = median_runs(runs)
        ratios: dict[str, Any] = {}
        service = entry.get(SERVICE)
        for other in (VLLM, ENGINE):
            if service is None or other not in entry:
                continue
            theirs = entry[other]
            ratios[f"tokens_per_s_{SERVICE}_over_{other}"] = _ratio(
                service["output_tokens_per_s"], theirs["output_tokens_per_s"]
            )
            # The spread of the repetition-by-repetition ratios (A and B run back to back).
            paired = [
                a.output_tokens_per_s / b.output_tokens_per_s
                for a, b in zip(runs_of[SERVICE], runs_of[other], strict=False)
                if b.output_tokens_per_s
            ]
            ratios[f"tokens_per_s_{SERVICE}_over_{other}_range"] = (
                [round(min(paired), 3), round(max(paired), 3)] if paired else None
            )
            for metric in ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "itl_p50_ms", "itl_p99_ms"):
                ratios[f"{metric}_{SERVICE}_over_{other}"] = _ratio(service[metric], theirs[metric])
            ratios[f"api_cpu_per_token_{SERVICE}_over_{other}"] = _ratio(
                service["api_cpu_s_per_1k_tokens"], theirs["api_cpu_s_per_1k_tokens"]
            )
            ratios[f"peak_rss_{SERVICE}_over_{other}"] = _ratio(
                service["peak_rss_mib"], theirs["peak_rss_mib"]
            )
        entry["ratios"] = ratios
        result["cells"][cell.key] = entry
    for target, target_rounds in rounds.items():
        loads = [h for r in target_rounds for h in r.hot_loads]
        result["hot_load"][target] = {
            "count": len(loads),
            "errors": sum(1 for h in loads if h.error),
            "load_call_ms_p50": _ms(_median([h.load_seconds for h in loads])),
            "first_token_ms_p50": _ms(
                _median([h.first_token_seconds for h in loads if h.error is None])
            ),
            "first_token_ms_max": _ms(
                max((h.first_token_seconds for h in loads if h.first_token_seconds), default=None)
            ),
        }
        result["peak_rss_mib"][target] = _median([r.peak_rss_mib for r in target_rounds])
    return result


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def check_targets(summary: dict[str, Any], cells: list[Cell]) -> list[dict[str, Any]]:
    """The issue's targets, each met or missed, with the figures that decide it."""
    checks: list[dict[str, Any]] = []

    def add(name: str, met: bool | None, detail: str) -> None:
        checks.append({"target": name, "met": met, "detail": detail})

    cell_data = summary["cells"]
    for cell in cells:
        ratios = cell_data[cell.key].get("ratios", {})
        vs_vllm = ratios.get(f"tokens_per_s_{SERVICE}_over_{VLLM}")
        if vs_vllm is not None:
            add(f"throughput >= 1.00x vllm serve [{cell.key}]", vs_vllm >= 1.0, f"{vs_vllm:.2f}x")
        vs_engine = ratios.get(f"tokens_per_s_{SERVICE}_over_{ENGINE}")
        if vs_engine is not None and cell.concurrency >= 8:
            add(f"throughput >= 0.90x engine [{cell.key}]", vs_engine >= 0.9, f"{vs_engine:.2f}x")
        api_cpu = ratios.get(f"api_cpu_per_token_{SERVICE}_over_{VLLM}")
        if api_cpu is not None and cell.concurrency >= 8:
            add(
                f"API CPU per token <= 0.6x vllm serve [{cell.key}]",
                api_cpu <= 0.6,
                f"{api_cpu:.2f}x",
            )
        for metric in ("ttft_p50_ms", "ttft_p99_ms"):
            ratio = ratios.get(f"{metric}_{SERVICE}_over_{VLLM}")
            if ratio is not None:
                label = metric.removesuffix("_ms").replace("_", " ").upper()
                add(f"{label} <= vllm serve [{cell.key}]", ratio <= 1.0, f"{ratio:.2f}x")
    rss = summary["peak_rss_mib"]
    if rss.get(SERVICE) and rss.get(VLLM):
        ratio = rss[SERVICE] / rss[VLLM]
        add(
            "peak RSS <= 1.05x vllm serve (whole round, start-up included)",
            ratio <= 1.05,
            f"{rss[SERVICE]:.0f} MiB vs {rss[VLLM]:.0f} MiB = {ratio:.3f}x",
        )
    for cell in cells:
        if not cell.mix.startswith("churn"):
            continue
        service = cell_data[cell.key].get(SERVICE)
        if service is None:
            continue
        add(f"churn: no errors [{cell.key}]", service["errors"] == 0, f"{service['errors']} errors")
        one = cell_data.get(Cell("one-adapter", cell.concurrency).key, {}).get(SERVICE)
        if one and one["output_tokens_per_s"]:
            ratio = service["output_tokens_per_s"] / one["output_tokens_per_s"]
            add(
                f"churn >= 0.5x one-adapter throughput [c{cell.concurrency}]",
                ratio >= 0.5,
                f"{ratio:.2f}x",
            )
    return checks


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _triple(entry: dict[str, Any], metric: str, digits: int = 1) -> str:
    return " / ".join(_fmt(entry.get(t, {}).get(metric), digits) for t in (SERVICE, VLLM, ENGINE))


def tables(summary: dict[str, Any], cells: list[Cell], checks: list[dict[str, Any]]) -> str:
    """Markdown tables: throughput and ratios, latencies and memory, hot loads, targets."""
    lines = [
        "Throughput (medians over repetitions; ratio range = min-max of per-repetition ratios; "
        "other CPU = cores busy with other processes on the machine during the run)",
        "",
        "| cell | service tok/s | vllm tok/s | engine tok/s | service/vllm (range) "
        "| service/engine | req/s service / vllm / engine | errors s/v/e "
        "| other CPU, cores s/v/e |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in cells:
        entry = summary["cells"][cell.key]
        ratios = entry.get("ratios", {})
        spread = ratios.get(f"tokens_per_s_{SERVICE}_over_{VLLM}_range")
        spread_text = f" ({spread[0]:.2f}-{spread[1]:.2f})" if spread else ""
        errors = "/".join(_fmt(entry.get(t, {}).get("errors")) for t in (SERVICE, VLLM, ENGINE))
        lines.append(
            f"| {cell.key} "
            f"| {_fmt(entry.get(SERVICE, {}).get('output_tokens_per_s'))} "
            f"| {_fmt(entry.get(VLLM, {}).get('output_tokens_per_s'))} "
            f"| {_fmt(entry.get(ENGINE, {}).get('output_tokens_per_s'))} "
            f"| {_fmt(ratios.get(f'tokens_per_s_{SERVICE}_over_{VLLM}'), 2)}{spread_text} "
            f"| {_fmt(ratios.get(f'tokens_per_s_{SERVICE}_over_{ENGINE}'), 2)} "
            f"| {_triple(entry, 'requests_per_s', 2)} | {errors} "
            f"| {_triple(entry, 'other_cores', 2)} |"
        )
    lines += [
        "",
        "Latency in ms and peak RSS in MiB of the process tree during the run "
        "(each cell: service / vllm / engine)",
        "",
        "| cell | TTFT p50 | TTFT p99 | TPOT p50 | ITL p50 | ITL p99 | peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in cells:
        entry = summary["cells"][cell.key]
        lines.append(
            f"| {cell.key} | {_triple(entry, 'ttft_p50_ms')} | {_triple(entry, 'ttft_p99_ms')} "
            f"| {_triple(entry, 'tpot_p50_ms')} "
            f"| {_triple(entry, 'itl_p50_ms')} | {_triple(entry, 'itl_p99_ms')} "
            f"| {_triple(entry, 'peak_rss_mib', 0)} |"
        )
    lines += [
        "",
        "API process CPU (HTTP + AsyncLLM front end; for the engine alone, its one process with "
        "the driver): CPU seconds per 1000 output tokens and ms per request "
        "(each cell: service / vllm / engine)",
        "",
        "| cell | API CPU s / 1k tokens | service/vllm | API CPU ms / request |",
        "|---|---:|---:|---:|",
    ]
    for cell in cells:
        entry = summary["cells"][cell.key]
        ratio = entry.get("ratios", {}).get(f"api_cpu_per_token_{SERVICE}_over_{VLLM}")
        lines.append(
            f"| {cell.key} | {_triple(entry, 'api_cpu_s_per_1k_tokens', 3)} | {_fmt(ratio, 2)} "
            f"| {_triple(entry, 'api_cpu_ms_per_request', 2)} |"
        )
    lines += [
        "",
        "Hot load (load call -> first token of a request to the new adapter) and whole-round "
        "peak RSS",
        "",
        "| target | hot loads | load call p50 ms | to first token p50 ms | max ms | errors "
        "| peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for target in (SERVICE, VLLM, ENGINE):
        hot = summary["hot_load"].get(target)
        if hot is None:
            continue
        lines.append(
            f"| {target} | {hot['count']} | {_fmt(hot['load_call_ms_p50'])} "
            f"| {_fmt(hot['first_token_ms_p50'])} | {_fmt(hot['first_token_ms_max'])} "
            f"| {hot['errors']} | {_fmt(summary['peak_rss_mib'].get(target), 0)} |"
        )
    if checks:
        met = sum(1 for c in checks if c["met"])
        lines += ["", f"Targets: {met} of {len(checks)} met", ""]
        lines += [f"- [{'x' if c['met'] else ' '}] {c['target']}: {c['detail']}" for c in checks]
    return "\n".join(lines)
