"""The same checks on `vllm serve` (with vLLM's gemma4 parsers) and on this service, as one table.

One target at a time on the tiny Gemma 4 and its demo adapters: start it, wait until it lists a
model, ask every check, stop it. Used by `bench.tools_compare` and `bench.responses_compare`,
which differ only in their checks.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench.adapters import BenchAdapters
from bench.servers import (
    TargetProcess,
    base_env,
    free_port,
    service_command,
    vllm_command,
    vllm_env,
)
from bench.workload import EngineConfig
from server.testbed.default_model import DefaultModel

logger = logging.getLogger(__name__)

SERVED_NAME = "tiny-gemma4"
# A target's base URL -> what it answered to each check, by the check's label.
Answers = Callable[[str], dict[str, str]]


def parse_args(doc: str | None) -> argparse.Namespace:
    """`--cache-dir` and `--out`, the flags both comparisons take (logging set up too)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache"))
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return args


def _answers_of(name: str, command: list[str], env: dict[str, str], port: int, log: Path,
                ready_model: str, answers: Answers) -> dict[str, str]:  # fmt: skip
    target = TargetProcess(name, command, env, log)
    try:
        url = f"http://127.0.0.1:{port}"
        target.wait_ready(url, ready_model, timeout=1200)
        return answers(url)
    finally:
        target.stop()


def compare(tiny: DefaultModel, ready_model: str, answers: Answers, out: Path | None) -> None:
    """Ask `vllm serve`, then this service; log the table of both answers (and write it to `out`).

    `ready_model` is the model (an adapter) each target must list before it is asked.
    """
    adapters = tiny.adapter_dirs()
    engine = EngineConfig(model_dir=str(tiny.model_dir), served_name=SERVED_NAME)
    bench_adapters = BenchAdapters(
        registered_dir=tiny.adapters_dir, hot_dir=tiny.adapters_dir, registered=adapters, hot={}
    )
    results: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as work:
        logs = Path(work)
        port = free_port()
        command = [
            *vllm_command(engine, bench_adapters, port),
            "--enable-auto-tool-choice",
            "--tool-call-parser", "gemma4",
            "--reasoning-parser", "gemma4",
        ]  # fmt: skip
        results["vllm serve"] = _answers_of(
            "vllm serve", command, vllm_env(), port, logs / "vllm.log", ready_model, answers
        )
        port = free_port()
        command = service_command(engine, bench_adapters, port, logs / "state")
        results["this service"] = _answers_of(
            "service", command, base_env(), port, logs / "service.log", ready_model, answers
        )
    lines = ["| request | vllm serve (gemma4 parsers) | this service |", "|---|---|---|"]
    lines += [
        f"| {label} | {results['vllm serve'][label]} | {results['this service'][label]} |"
        for label in results["vllm serve"]
    ]
    table = "\n".join(lines)
    logger.info("\n%s", table)
    if out:
        out.write_text(table + "\n", encoding="utf-8")
