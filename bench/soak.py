"""Soak: mixed traffic against a real `python -m server` for a bounded time, then a leak check.

    .venv/bin/python -m bench.soak --seconds 300 [--dtype float32] [--concurrency 6]

Workers send, for `--seconds`: chat completions streamed and not, on the base model and the demo
adapters, with text, an image or an audio clip; completions; and requests whose client goes away
mid-stream or before a non-streamed answer. A hot-load loop loads, uses and unloads adapters
through the admin API. Then the script checks, and prints as a markdown table:

- requests by kind and status; any 5xx, transport error or error event is a failure;
- engine requests left once the clients went away (on /metrics: vLLM's
  `vllm:num_requests_running` and `..._waiting`, the engine client's count
  `gemma_server_engine_requests_unfinished`, the service's `gemma_server_requests_in_flight`):
  each must be 0;
- RSS of each process (API, engine core, worker), sampled every `--sample-seconds`, and its open
  file descriptors, from after warm-up to the end. RSS is checked twice: growth over the second
  half of the traffic time (along the least-squares line of the samples) beyond
  `--max-late-rss-growth-mib` is a leak; growth from start to end beyond `--max-rss-growth-mib` is
  a plateau too high. Start to end alone cannot tell the two apart: the worker's RSS rises at
  first however healthy it is, as oneDNN compiles a GEMM primitive (~0.6-0.7 MiB) for each new
  prompt length until its cache (bounded by the service) is full, and then levels off; a leak
  keeps growing. Open-file growth beyond `--max-fd-growth` is a failure.

`--skip` leaves kinds of traffic out (images, audio, adapters, hot loads, disconnects), to find
which one a growth comes from.

Exit status 1 on any failure. The server runs on the tiny Gemma 4 with the demo adapters (built
in `--cache-dir` if missing); its log goes to bench/results/logs/soak-server.log.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import logging
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
import soundfile
from prometheus_client.parser import text_string_to_metric_families

from bench.servers import TargetProcess, base_env, free_port
from bench.workload import png_image

logger = logging.getLogger("bench.soak")

ADMIN_KEY = "soak-admin-key"
BASE = "tiny-gemma4"
ADAPTERS = ("demo-attn", "demo-mlp", "demo-all")
HOT_NAMES = ("soak-hot-0", "soak-hot-1")
SKIPPABLE = ("images", "audio", "adapters", "hot-loads", "disconnects")
MIB = 2**20
LOG_PATH = Path(__file__).parent / "results" / "logs" / "soak-server.log"
PROMPTS = (
    "Tell me about the river.",
    "Write a short poem about the sea.",
    "What is the capital of a country you like?",
    "List three colours.",
)


@dataclass
class Tally:
    """What the clients saw."""

    by_kind: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    disconnects: int = 0
    hot_loads: int = 0
    hot_unloads: int = 0

    def record(self, kind: str, status: str, failure: str | None = None) -> None:
        self.by_kind[kind] += 1
        self.statuses[status] += 1
        if failure is not None and len(self.failures) < 20:
            self.failures.append(f"{kind}: {failure}")


@dataclass(frozen=True)
class ProcessSample:
    rss: int
    fds: int


RssSeries = dict[str, list[tuple[float, int]]]
"""RSS of each process during the traffic: (seconds since the traffic began, bytes)."""


def second_half_slope(points: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS over the second half of the run, in MiB per minute."""
    if len(points) < 2:
        return 0.0
    middle = points[-1][0] / 2
    tail = [(t, rss / MIB) for t, rss in points if t >= middle]
    if len(tail) < 2:
        tail = [(t, rss / MIB) for t, rss in points[-2:]]
    times = np.array([t for t, _ in tail])
    values = np.array([v for _, v in tail])
    if np.ptp(times) == 0:
        return 0.0
    return float(np.polyfit(times, values, 1)[0] * 60)


def second_half_growth(points: list[tuple[float, int]]) -> float:
    """RSS growth over the second half of the run along its least-squares line, in MiB.

    A line rather than two samples, so one allocation peak at the end does not count as growth.
    """
    if len(points) < 2:
        return 0.0
    return second_half_slope(points) / 60 * points[-1][0] / 2


def rss_violations(
    role: str, points: list[tuple[float, int]], max_growth_mib: float, max_late_growth_mib: float
) -> list[str]:
    """The memory bounds one process's RSS series breaks: growth from start to end (a ceiling
    on the plateau) and growth in the second half (still growing: a leak)."""
    if len(points) < 2:
        return []
    violations = []
    growth = (points[-1][1] - points[0][1]) / MIB
    if growth > max_growth_mib:
        violations.append(f"{role} RSS grew {growth:.0f} MiB (bound {max_growth_mib:g})")
    late = second_half_growth(points)
    if late > max_late_growth_mib:
        violations.append(
            f"{role} RSS still grew {late:.0f} MiB in the second half (bound "
            f"{max_late_growth_mib:g}): no plateau"
        )
    return violations


async def sample_rss(
    processes: dict[str, psutil.Process], series: RssSeries, until: float, every: float
) -> None:
    """Record each process's RSS every `every` seconds until `until`, and once at the end."""
    started = time.monotonic()
    while True:
        now = time.monotonic()
        for role, process in processes.items():
            with contextlib.suppress(psutil.NoSuchProcess):
                series.setdefault(role, []).append((now - started, process.memory_info().rss))
        if now >= until:
            return
        await asyncio.sleep(min(every, until - now))


def wav_base64(seconds: float, seed: int) -> str:
    """A 16 kHz mono tone with a little noise, as a base64 WAV."""
    t = np.arange(int(16_000 * seconds)) / 16_000
    noise = np.random.default_rng(seed).normal(0, 0.05, t.shape)
    clip = (0.5 * np.sin(2 * np.pi * 440 * t) + noise).astype(np.float32)
    buffer = io.BytesIO()
    soundfile.write(buffer, clip, 16_000, format="WAV", subtype="PCM_16")
    return base64.b64encode(buffer.getvalue()).decode()


def image_data_url(rng: random.Random) -> str:
    return "data:image/png;base64," + base64.b64encode(png_image(rng, 64)).decode()


def engine_processes(api_pid: int) -> dict[str, psutil.Process]:
    """The server's processes by role: api, engine core and worker (vLLM retitles its
    processes `VLLM::EngineCore` and `VLLM::Worker`; the worker is the engine core's child)."""
    api = psutil.Process(api_pid)
    roles = {"api": api}
    for child in api.children():
        with contextlib.suppress(psutil.NoSuchProcess):
            if "EngineCore" in " ".join(child.cmdline()):
                roles["engine core"] = child
                workers = [
                    worker
                    for worker in child.children()
                    if "resource_tracker" not in " ".join(worker.cmdline())
                ]
                if workers:
                    roles["worker"] = workers[0]
    return roles


def sample(processes: dict[str, psutil.Process]) -> dict[str, ProcessSample]:
    return {
        role: ProcessSample(process.memory_info().rss, process.num_fds())
        for role, process in processes.items()
    }


async def metric_sums(http: httpx.AsyncClient, names: tuple[str, ...]) -> dict[str, float]:
    """Sum of every series of each named metric on /metrics."""
    text = (await http.get("/metrics")).text
    sums = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(text):
        for sample_ in family.samples:
            if sample_.name in sums:
                sums[sample_.name] += sample_.value
    return sums


# vLLM's scheduler gauges, the engine client's own count of unfinished requests, and the
# service's requests in flight: all must be 0 once the clients are gone.
LEFT_METRICS = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "gemma_server_engine_requests_unfinished",
    "gemma_server_requests_in_flight",
)


class Traffic:
    """The request mix; each method sends one request and records what happened."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        tally: Tally,
        seed: int,
        audio: str,
        skip: frozenset[str] = frozenset(),
    ) -> None:
        self.http = http
        self.tally = tally
        self.rng = random.Random(seed)
        self.audio = audio
        self.skip = skip

    def _model(self) -> str:
        return BASE if "adapters" in self.skip else self.rng.choice((BASE, *ADAPTERS))

    def _messages(self, media: str) -> list[dict[str, object]]:
        text = {"type": "text", "text": self.rng.choice(PROMPTS)}
        if media == "image":
            part: dict[str, object] = {
                "type": "image_url",
                "image_url": {"url": image_data_url(self.rng)},
            }
            return [{"role": "user", "content": [part, text]}]
        if media == "audio":
            part = {"type": "input_audio", "input_audio": {"data": self.audio, "format": "wav"}}
            return [{"role": "user", "content": [part, text]}]
        return [{"role": "user", "content": [text]}]

    async def chat(self, media: str, stream: bool, model: str | None = None) -> None:
        kind = f"chat {media}{' stream' if stream else ''}"
        body = {
            "model": model or self._model(),
            "messages": self._messages(media),
            "max_tokens": self.rng.randint(4, 24),
            "temperature": self.rng.choice((0.0, 0.8)),
            "stream": stream,
        }
        await self._send(kind, "/v1/chat/completions", body, stream)

    async def completion(self, stream: bool) -> None:
        body = {
            "model": self._model(),
            "prompt": self.rng.choice(PROMPTS),
            "max_tokens": self.rng.randint(4, 24),
            "stream": stream,
        }
        await self._send(
            f"completion{' stream' if stream else ''}", "/v1/completions", body, stream
        )

    async def _send(self, kind: str, path: str, body: dict[str, object], stream: bool) -> None:
        try:
            if not stream:
                response = await self.http.post(path, json=body)
                failure = None if response.status_code == 200 else response.text[:200]
                self.tally.record(kind, str(response.status_code), failure)
                return
            async with self.http.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")[:200]
                    self.tally.record(kind, str(response.status_code), text)
                    return
                done = False
                async for line in response.aiter_lines():
                    if line.startswith('data: {"error"'):
                        self.tally.record(kind, "error event", line[:200])
                        return
                    done = done or line == "data: [DONE]"
            self.tally.record(kind, "200" if done else "no [DONE]", None if done else "cut short")
        except httpx.HTTPError as exc:
            self.tally.record(kind, "transport error", f"{type(exc).__name__}: {exc}"[:200])

    async def disconnect_mid_stream(self) -> None:
        """Read two events of a long stream, then close the connection."""
        body = {
            "model": self._model(),
            "messages": self._messages(
                self.rng.choice(("text",) if "images" in self.skip else ("text", "image"))
            ),
            "max_tokens": 400,
            "ignore_eos": True,
            "stream": True,
        }
        try:
            async with self.http.stream("POST", "/v1/chat/completions", json=body) as response:
                events = 0
                async for line in response.aiter_lines():
                    events += line.startswith("data:")
                    if events >= 2:
                        break
            self.tally.record("disconnect mid-stream", "client left")
            self.tally.disconnects += 1
        except httpx.HTTPError as exc:
            self.tally.record("disconnect mid-stream", "transport error", str(exc)[:200])

    async def disconnect_before_answer(self) -> None:
        """A long non-streamed request whose client gives up after a moment."""
        body = {
            "model": self._model(),
            "messages": self._messages("text"),
            "max_tokens": 400,
            "ignore_eos": True,
        }
        try:
            await self.http.post("/v1/chat/completions", json=body, timeout=0.5)
            self.tally.record("disconnect before answer", "200")  # finished within 0.5 s
        except httpx.TimeoutException:
            self.tally.record("disconnect before answer", "client left")
            self.tally.disconnects += 1
        except httpx.HTTPError as exc:
            self.tally.record("disconnect before answer", "transport error", str(exc)[:200])

    def pick(self) -> Callable[[], Awaitable[None]]:
        choices: list[tuple[float, Callable[[], Awaitable[None]]]] = [
            (4, lambda: self.chat("text", stream=False)),
            (4, lambda: self.chat("text", stream=True)),
            (2, lambda: self.completion(stream=self.rng.random() < 0.5)),
        ]
        if "images" not in self.skip:
            choices.append((2, lambda: self.chat("image", stream=self.rng.random() < 0.5)))
        if "audio" not in self.skip:
            choices.append((1, lambda: self.chat("audio", stream=self.rng.random() < 0.5)))
        if "disconnects" not in self.skip:
            choices += [(1, self.disconnect_mid_stream), (1, self.disconnect_before_answer)]
        weights = [weight for weight, _ in choices]
        return self.rng.choices([action for _, action in choices], weights)[0]


async def hot_loads(http: httpx.AsyncClient, tally: Tally, traffic: Traffic, until: float) -> None:
    """Load an adapter under a new name, chat with it, unload it; again and again."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    i = 0
    while time.monotonic() < until:
        name = HOT_NAMES[i % len(HOT_NAMES)]
        source = ADAPTERS[i % len(ADAPTERS)]
        i += 1
        try:
            loaded = await http.post(
                "/v1/adapters", json={"name": name, "path": source}, headers=admin
            )
            tally.record(
                "hot load", str(loaded.status_code), None if loaded.is_success else loaded.text
            )
            if loaded.status_code != 201:
                await asyncio.sleep(1)
                continue
            tally.hot_loads += 1
            await traffic.chat("text", stream=True, model=name)
            unloaded = await http.delete(f"/v1/adapters/{name}", headers=admin)
            tally.record(
                "hot unload",
                str(unloaded.status_code),
                None if unloaded.is_success else unloaded.text,
            )
            tally.hot_unloads += unloaded.status_code == 200
        except httpx.HTTPError as exc:
            tally.record("hot load", "transport error", str(exc)[:200])
        await asyncio.sleep(2)


async def wait_ready(http: httpx.AsyncClient, server: TargetProcess, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited:\n{server.log_tail()}")
        with contextlib.suppress(httpx.TransportError):
            if (await http.get("/ready")).status_code == 200:
                return time.monotonic() - started
        await asyncio.sleep(0.5)
    raise TimeoutError(f"not ready after {timeout:.0f} s:\n{server.log_tail()}")


async def settle(http: httpx.AsyncClient, seconds: float) -> dict[str, float]:
    """Engine and service counts once the clients are gone, after at most `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        counts = await metric_sums(http, LEFT_METRICS)
        if not any(counts.values()) or time.monotonic() > deadline:
            return counts
        await asyncio.sleep(0.5)


def table(
    args: argparse.Namespace,
    tally: Tally,
    left: dict[str, float],
    start: dict[str, ProcessSample],
    end: dict[str, ProcessSample],
    elapsed: float,
    series: RssSeries,
) -> tuple[str, list[str]]:
    """The report, and the list of violated bounds."""
    violations = []
    lines = [
        f"Soak: {elapsed:.0f} s of traffic, concurrency {args.concurrency}, dtype {args.dtype}, "
        f"seed {args.seed}" + (f", without {', '.join(sorted(args.skip))}" if args.skip else ""),
        "",
        "| Requests | Count |",
        "|---|---|",
    ]
    lines += [f"| {kind} | {count} |" for kind, count in sorted(tally.by_kind.items())]
    lines += [f"| **all** | **{sum(tally.by_kind.values())}** |", ""]
    lines += ["| Outcome | Count |", "|---|---|"]
    lines += [f"| {status} | {count} |" for status, count in sorted(tally.statuses.items())]
    lines += [
        "",
        f"Hot loads: {tally.hot_loads}, unloads: {tally.hot_unloads}; "
        f"client disconnects: {tally.disconnects}.",
        "",
        "| After the clients went away | Value | Bound |",
        "|---|---|---|",
    ]
    for name, value in left.items():
        lines.append(f"| `{name}` | {value:g} | 0 |")
        if value:
            violations.append(f"{name} is {value:g} after the clients went away")
    lines += [
        "",
        "| Process | RSS start (MiB) | RSS end (MiB) | Growth (MiB) | Growth, 2nd half (MiB) "
        "| FDs start | FDs end |",
        "|---|---|---|---|---|---|---|",
    ]
    for role, first in start.items():
        last = end.get(role)
        if last is None:
            violations.append(f"the {role} process is gone")
            continue
        growth = (last.rss - first.rss) / MIB
        # The series runs from after warm-up to once the clients went away.
        points = [(0.0, first.rss), *series.get(role, [])[1:], (elapsed, last.rss)]
        lines.append(
            f"| {role} | {first.rss / MIB:.0f} | {last.rss / MIB:.0f} | {growth:+.0f} "
            f"| {second_half_growth(points):+.0f} | {first.fds} | {last.fds} |"
        )
        violations += rss_violations(
            role, points, args.max_rss_growth_mib, args.max_late_rss_growth_mib
        )
        if last.fds - first.fds > args.max_fd_growth:
            violations.append(
                f"{role} open files grew by {last.fds - first.fds} (bound {args.max_fd_growth})"
            )
    lines += ["", f"RSS (MiB) every {args.sample_seconds:g} s:", ""]
    for role, points in series.items():
        lines.append(f"- {role}: " + " ".join(f"{rss / MIB:.0f}" for _, rss in points))
    lines += [
        "",
        f"Bounds per process: RSS growth <= {args.max_rss_growth_mib:g} MiB from after warm-up to "
        f"the end and <= {args.max_late_rss_growth_mib:g} MiB over the second half (a plateau), "
        f"open-file growth <= {args.max_fd_growth}; 0 engine requests left; no 5xx, transport "
        "error or error event.",
    ]
    bad_statuses = [
        status
        for status in tally.statuses
        if status.startswith("5") or status in ("transport error", "error event", "no [DONE]")
    ]
    for status in bad_statuses:
        violations.append(f"{tally.statuses[status]} requests ended with {status}")
    unexpected_4xx = [s for s in tally.statuses if s.startswith("4")]
    for status in unexpected_4xx:
        violations.append(f"{tally.statuses[status]} requests got {status}")
    return "\n".join(lines), violations


async def soak(args: argparse.Namespace) -> int:
    from server.testbed.default_model import ensure_default_model

    tiny = await asyncio.to_thread(ensure_default_model, args.cache_dir)
    port = free_port()
    state_dir = Path(tempfile.mkdtemp(prefix="soak-state-"))
    command = [
        sys.executable, "-m", "server",
        "--cache-dir", str(args.cache_dir),
        "--dtype", args.dtype,
        "--max-model-len", "1024",
        "--kv-cache-memory-bytes", str(64 * MIB),
        "--max-loras", "3",
        "--max-cpu-loras", "4",
        "--max-num-seqs", "16",
        "--admin-keys", ADMIN_KEY,
        "--adapter-roots", str(tiny.adapters_dir),
        "--state-dir", str(state_dir),
        "--port", str(port),
        "--log-level", "warning",
    ]  # fmt: skip
    server = TargetProcess("service", command, base_env(), LOG_PATH)
    tally = Tally()
    audio = wav_base64(1.0, args.seed)
    limits = httpx.Limits(max_connections=args.concurrency + 8)
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=600, limits=limits
        ) as http:
            ready_after = await wait_ready(http, server, args.start_timeout)
            logger.info("ready after %.0f s; warming up", ready_after)
            warm = Traffic(http, Tally(), args.seed, audio, args.skip)
            for media, kind in (("text", ""), ("image", "images"), ("audio", "audio")):
                if kind not in args.skip:
                    for model in (BASE,) if "adapters" in args.skip else (BASE, *ADAPTERS):
                        await warm.chat(media, stream=media == "text", model=model)
            await warm.completion(stream=True)
            if "disconnects" not in args.skip:
                await warm.disconnect_mid_stream()
            if warm.tally.failures:
                logger.error("warm-up failed: %s", warm.tally.failures)
                return 1
            processes = engine_processes(server.pid)
            start = sample(processes)
            logger.info("running mixed traffic for %d s", args.seconds)
            started = time.monotonic()
            until = started + args.seconds

            async def worker(seed: int) -> None:
                traffic = Traffic(http, tally, seed, audio, args.skip)
                while time.monotonic() < until:
                    await traffic.pick()()

            jobs = [worker(args.seed + i) for i in range(args.concurrency)]
            if "hot-loads" not in args.skip:
                hot = Traffic(http, tally, args.seed + 1000, audio, args.skip)
                jobs.append(hot_loads(http, tally, hot, until))
            series: RssSeries = {}
            jobs.append(sample_rss(processes, series, until, args.sample_seconds))
            await asyncio.gather(*jobs)
            elapsed = time.monotonic() - started
            left = await settle(http, args.settle_seconds)
            end = sample(processes)
        report, violations = table(args, tally, left, start, end, elapsed, series)
        print(report)
        for failure in tally.failures:
            logger.error("failure: %s", failure)
        for violation in violations:
            logger.error("violated: %s", violation)
        return 1 if violations else 0
    finally:
        server.stop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seconds", type=int, default=120, help="traffic time (default 120)")
    parser.add_argument("--concurrency", type=int, default=6, help="client workers (default 6)")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="the server's --dtype (default auto, as `make run`; float32 where bfloat16 audio "
        "still crashes the engine)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache"))
    parser.add_argument(
        "--max-rss-growth-mib",
        type=float,
        default=256.0,
        help="RSS growth allowed per process from after warm-up to the end (default 256)",
    )
    parser.add_argument(
        "--max-late-rss-growth-mib",
        type=float,
        default=32.0,
        help="RSS growth allowed per process over the second half of the traffic time, along "
        "its least-squares line (default 32)",
    )
    parser.add_argument("--max-fd-growth", type=int, default=16)
    parser.add_argument("--settle-seconds", type=float, default=10.0)
    parser.add_argument("--start-timeout", type=float, default=900.0)
    parser.add_argument(
        "--sample-seconds", type=float, default=10.0, help="RSS sampling period (default 10)"
    )
    parser.add_argument(
        "--skip",
        type=lambda text: frozenset(part for part in text.split(",") if part),
        default=frozenset(),
        help=f"leave kinds of traffic out, to isolate a cause: comma-separated from {SKIPPABLE}",
    )
    args = parser.parse_args(argv)
    if unknown := args.skip - set(SKIPPABLE):
        parser.error(f"--skip: unknown {', '.join(sorted(unknown))}; choose from {SKIPPABLE}")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    return asyncio.run(soak(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
