"""A thousand registered adapters: start-up, list and metrics latency, memory, churn.

Prints a table:

    .venv/bin/python -m bench.many_adapters [--adapters 1000] [--calls 100] [--churn-rounds 1]

Builds N small adapters for the tiny Gemma 4 (rank 4 attention, each a seeded variation of one
PEFT adapter, so N of them take seconds to write), then runs `python -m server` with
`--max-loras 4 --max-cpu-loras 8` four times: with an empty preload folder (the baseline), with
the N adapters as its preload folder on an empty state (first start: each validated), again on
that state (the registry file restores them; the preload scan finds them registered), and with
the registry file alone. On the last server it times `GET /v1/models`, `GET /v1/adapters` and
`GET /metrics`, reads the API process's memory, and sends a chat to every adapter in turn
(round robin, 8 at a time) counting errors; then `/metrics` again, after the churn.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import psutil
from openai.types.chat import ChatCompletionMessageParam

from bench.measure import percentile
from bench.servers import TargetProcess, base_env, free_port

logger = logging.getLogger("bench.many_adapters")

ADMIN = "bench-admin"
PROMPT: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Tell me a story about a cat."}
]
MAX_LORAS = 4
MAX_CPU_LORAS = 8
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def build_adapters(model_dir: Path, out_dir: Path, count: int) -> list[str]:
    """`count` adapters `m0000`...: one PEFT adapter (demo-attn's kind), varied per adapter."""
    from server.testbed.demo_adapters import (
        DEMO_ADAPTERS,
        write_adapter_variants,
        write_demo_adapter,
    )

    names = [f"m{i:04d}" for i in range(count)]
    if all((out_dir / name / WEIGHTS).is_file() for name in names):
        return names
    template = out_dir.parent / "template"
    if not (template / WEIGHTS).is_file():
        spec = next(s for s in DEMO_ADAPTERS if s.name == "demo-attn")
        write_demo_adapter(model_dir, template, spec, seed=4242)
    write_adapter_variants(template, out_dir, names)
    return names


@dataclass
class Start:
    label: str
    registered: int
    ready_seconds: float
    adapter_phase_seconds: float  # what the server logged for restore + preload
    api_rss_bytes: int


def _logged_seconds(log: str) -> float:
    restored = re.findall(r"registry restored in ([\d.]+) s", log)
    preloaded = re.findall(r"preload: \d+ new of \d+ folders registered in ([\d.]+) s", log)
    return sum(float(x) for x in restored[-1:] + preloaded[-1:])


class Server:
    def __init__(self, cache_dir: Path, state_dir: Path, preload_dir: Path, log: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        command = [
            *[sys.executable, "-m", "server", "--cache-dir", str(cache_dir)],
            *["--state-dir", str(state_dir), "--preload-dir", str(preload_dir)],
            *["--max-loras", str(MAX_LORAS), "--max-cpu-loras", str(MAX_CPU_LORAS)],
            *["--max-lora-rank", "16", "--kv-cache-memory-bytes", str(64 * 2**20)],
            *["--admin-keys", ADMIN, "--port", str(self.port), "--no-playground"],
        ]
        self.target = TargetProcess("server", command, base_env(), log)

    def wait_ready(self, timeout: float = 900.0) -> float:
        deadline = time.perf_counter() + timeout
        with httpx.Client(timeout=5.0) as http:
            while time.perf_counter() < deadline:
                if self.target.process.poll() is not None:
                    raise RuntimeError(f"server exited:\n{self.target.log_tail()}")
                try:
                    if http.get(f"{self.base_url}/ready").status_code == 200:
                        return time.perf_counter() - self.target.started
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        raise TimeoutError(self.target.log_tail())

    def api_rss(self) -> int:
        return int(psutil.Process(self.target.pid).memory_info().rss)

    def log(self) -> str:
        return self.target.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.target.stop()


def start(label: str, registered: int, cache: Path, state: Path, preload: Path, log: Path) -> Start:
    server = Server(cache, state, preload, log)
    try:
        ready = server.wait_ready()
        with httpx.Client(timeout=60) as http:  # settle allocations the first answers make
            http.get(f"{server.base_url}/v1/models")
        result = Start(label, registered, ready, _logged_seconds(server.log()), server.api_rss())
        logger.info("%s", result)  # each figure as soon as it is measured
        return result
    finally:
        server.stop()


def traced_bytes_per_adapter(state_dir: Path) -> float:
    """Python memory the API process holds per registered adapter (tracemalloc): the records
    as read from the registry file, the sorted list, the cached `/v1/models` body."""
    import tracemalloc

    from adapters.persistence import RegistryStore
    from adapters.registry import AdapterRegistry
    from server.http.models_router import ModelListCache

    class Service:  # what ModelListCache reads of the adapter service
        def __init__(self, registry: AdapterRegistry) -> None:
            self.registry = registry
            self.base_model_name = registry.base_model_name

    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    records, _ = RegistryStore(state_dir).load()
    registry = AdapterRegistry("tiny-gemma4")
    for record in records:
        registry.put(record)
    registry.by_name()
    body = ModelListCache().body(Service(registry), 0, None)  # type: ignore[arg-type]
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    assert body
    return grown / max(1, len(records))


def timed_get(url: str, headers: dict[str, str], calls: int) -> tuple[float, float, int]:
    """p50 and p99 in ms over `calls` sequential GETs, and the last body's size."""
    times = []
    size = 0
    with httpx.Client(timeout=60, headers=headers) as http:
        http.get(url)  # warm: caches, connection
        for _ in range(calls):
            began = time.perf_counter()
            response = http.get(url)
            times.append(time.perf_counter() - began)
            response.raise_for_status()
            size = len(response.content)
    return percentile(times, 50) * 1000, percentile(times, 99) * 1000, size  # type: ignore[operator]


async def first_use(base_url: str, names: list[str]) -> dict[str, list[float]]:
    """One-token requests: first use of each adapter (load, and the probe still due), the
    same adapter again at once (in memory), and again after 8 others (loaded from disk)."""
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)

    async def seconds(name: str) -> float:
        began = time.perf_counter()
        await client.chat.completions.create(
            model=name, messages=PROMPT, max_tokens=1, temperature=0
        )
        return time.perf_counter() - began

    times: dict[str, list[float]] = {"first use": [], "in memory": [], "from disk": []}
    for name in names:
        times["first use"].append(await seconds(name))
        times["in memory"].append(await seconds(name))
    for name in names:  # each evicted by the 8 loaded after it (max_cpu_loras 8)
        times["from disk"].append(await seconds(name))
    return times


async def churn(base_url: str, names: list[str], rounds: int) -> tuple[int, int, float]:
    """Requests round robin over every adapter, 8 at a time: (requests, errors, seconds)."""
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    order = [name for _ in range(rounds) for name in names]
    semaphore = asyncio.Semaphore(8)
    errors: list[str] = []

    async def one(name: str) -> None:
        async with semaphore:
            try:
                await client.chat.completions.create(
                    model=name, messages=PROMPT, max_tokens=4, temperature=0
                )
            except openai.APIError as exc:
                errors.append(f"{name}: {exc}")

    began = time.perf_counter()
    await asyncio.gather(*(one(name) for name in order))
    if errors:
        logger.warning("churn errors (first 5): %s", errors[:5])
    return len(order), len(errors), time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--churn-rounds", type=int, default=1)
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache"))
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from server.testbed.default_model import ensure_default_model

    model_dir = ensure_default_model(args.cache_dir).model_dir
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="many-adapters-"))
    adapters_dir = work / "adapters"
    began = time.perf_counter()
    names = build_adapters(model_dir, adapters_dir, args.adapters)
    logger.info("%d adapters in %s (%.1f s)", len(names), adapters_dir, time.perf_counter() - began)
    empty = work / "empty"
    empty.mkdir(exist_ok=True)
    logs = work / "logs"
    starts: list[Start] = []
    for label in ("baseline", "preload"):
        shutil.rmtree(work / f"state-{label}", ignore_errors=True)
    n = len(names)
    starts.append(
        start("none registered", 0, args.cache_dir, work / "state-baseline", empty, logs / "0.log")
    )
    state = work / "state-preload"
    starts.append(
        start("preload dir, first start", n, args.cache_dir, state, adapters_dir, logs / "1.log")
    )
    starts.append(
        start("preload dir, restart", n, args.cache_dir, state, adapters_dir, logs / "2.log")
    )

    server = Server(args.cache_dir, state, empty, logs / "3.log")
    try:
        ready = server.wait_ready()
        with httpx.Client(timeout=60) as http:
            http.get(f"{server.base_url}/v1/models")
        starts.append(
            Start("registry file only", n, ready, _logged_seconds(server.log()), server.api_rss())
        )
        admin = {"Authorization": f"Bearer {ADMIN}"}
        lists = {
            "/v1/models": timed_get(f"{server.base_url}/v1/models", {}, args.calls),
            "/v1/adapters": timed_get(f"{server.base_url}/v1/adapters", admin, args.calls),
            "/metrics (before churn)": timed_get(f"{server.base_url}/metrics", {}, args.calls),
        }
        cold = asyncio.run(first_use(server.base_url, names[-20:]))
        logger.info("lists: %s; one-token chats: %s", lists, cold)
        requests, errors, seconds = asyncio.run(churn(server.base_url, names, args.churn_rounds))
        logger.info("churn: %d requests, %d errors, %.0f s", requests, errors, seconds)
        lists["/metrics (after churn)"] = timed_get(f"{server.base_url}/metrics", {}, args.calls)
        lists["/metrics/router (after churn)"] = timed_get(
            f"{server.base_url}/metrics/router", {}, args.calls
        )
        with httpx.Client(timeout=60) as http:
            exposition = http.get(f"{server.base_url}/metrics").text
        series = sum(1 for line in exposition.splitlines() if line and not line.startswith("#"))
        lora_info = exposition.count("vllm:lora_requests_info{")
        after_rss = server.api_rss()
    finally:
        server.stop()

    print(f"\n{n} adapters, --max-loras {MAX_LORAS} --max-cpu-loras {MAX_CPU_LORAS}, tiny Gemma 4")
    print("\n| Start | Registered | Start-up to /ready | Restore + preload (server log) |")
    print("|---|---|---|---|")
    for s in starts:
        print(
            f"| {s.label} | {s.registered} | {s.ready_seconds:.1f} s | "
            f"{s.adapter_phase_seconds:.2f} s |"
        )
    print(f"\n| Route ({args.calls} calls) | p50 | p99 | Body |")
    print("|---|---|---|---|")
    for route, (p50, p99, size) in lists.items():
        print(f"| `{route}` | {p50:.1f} ms | {p99:.1f} ms | {size / 1024:.0f} KiB |")
    print("\n| One-token chat (20 adapters, sequential) | p50 | p99 |")
    print("|---|---|---|")
    for kind, values in cold.items():
        low, high = (1000 * (percentile(values, q) or 0.0) for q in (50, 99))
        print(f"| {kind} | {low:.0f} ms | {high:.0f} ms |")
    traced = traced_bytes_per_adapter(state)
    per_adapter = (starts[-1].api_rss_bytes - starts[0].api_rss_bytes) / n
    print(
        f"\nAPI process RSS at ready: {starts[0].api_rss_bytes / 2**20:.0f} MiB with none, "
        f"{starts[-1].api_rss_bytes / 2**20:.0f} MiB with {n} (registry file): "
        f"{per_adapter / 1024:.1f} KiB per adapter; {after_rss / 2**20:.0f} MiB after the churn"
    )
    print(f"Python objects per registered adapter (tracemalloc): {traced / 1024:.1f} KiB")
    print(
        f"Churn: {requests} requests round robin over {n} adapters, 8 at a time, 4 tokens each: "
        f"{errors} errors, {seconds:.0f} s ({requests / seconds:.1f} requests/s)"
    )
    print(f"/metrics after the churn: {series} samples, {lora_info} vllm:lora_requests_info series")
    print(f"Logs: {logs}")


if __name__ == "__main__":
    main()
