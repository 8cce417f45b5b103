"""What one run measures: per-request timings, their summary, and the process tree's peak RSS."""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil


@dataclass
class RequestRecord:
    """One request as the client saw it (times from time.perf_counter)."""

    started: float
    finished: float = 0.0
    first_token: float | None = None  # the first event carrying a choice (role or token)
    token_times: list[float] = field(default_factory=list)  # events carrying output
    completion_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


@dataclass
class RunMetrics:
    """One measured run of one cell on one target."""

    requests: int
    errors: int
    seconds: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    tpot_p50_ms: float | None
    tpot_p99_ms: float | None
    peak_rss_mib: float | None
    prompt_tokens_mean: float | None
    target_cores: float | None = None  # CPU the target used during the run
    other_cores: float | None = None  # CPU other processes used meanwhile (noise)
    # CPU seconds of the API process alone (HTTP + AsyncLLM front end; not the engine core or
    # worker): a figure that noise from other jobs barely moves.
    api_cpu_s_per_1k_tokens: float | None = None
    api_cpu_ms_per_request: float | None = None
    first_error: str | None = None


def summarize(
    records: list[RequestRecord],
    seconds: float,
    expected_tokens: int,
    window: Window | None,
) -> RunMetrics:
    """Throughput over the run's wall time; latencies over the requests that succeeded.

    A request that ends with another number of output tokens than asked for is an error.
    """
    for record in records:
        if record.error is None and record.completion_tokens != expected_tokens:
            record.error = f"{record.completion_tokens} output tokens, expected {expected_tokens}"
    good = [r for r in records if r.error is None]
    ttft = [r.first_token - r.started for r in good if r.first_token is not None]
    itl = [b - a for r in good for a, b in zip(r.token_times, r.token_times[1:], strict=False)]
    # Time per output token after the first, per request: robust to events arriving in bursts.
    tpot = [
        (r.token_times[-1] - r.first_token) / (r.completion_tokens - 1)
        for r in good
        if r.first_token is not None and r.token_times and r.completion_tokens > 1
    ]
    tokens = sum(r.completion_tokens for r in good)
    errors = [r.error for r in records if r.error is not None]
    api_cpu = None if window is None else window.root_cpu_seconds
    return RunMetrics(
        requests=len(records),
        errors=len(errors),
        seconds=round(seconds, 3),
        requests_per_s=round(len(good) / seconds, 3) if seconds > 0 else 0.0,
        output_tokens_per_s=round(tokens / seconds, 2) if seconds > 0 else 0.0,
        ttft_p50_ms=_ms(percentile(ttft, 50)),
        ttft_p99_ms=_ms(percentile(ttft, 99)),
        itl_p50_ms=_ms(percentile(itl, 50)),
        itl_p99_ms=_ms(percentile(itl, 99)),
        tpot_p50_ms=_ms(percentile(tpot, 50)),
        tpot_p99_ms=_ms(percentile(tpot, 99)),
        peak_rss_mib=None if window is None else round(window.peak_rss_bytes / 2**20, 1),
        prompt_tokens_mean=round(statistics.fmean(r.prompt_tokens for r in good), 1)
        if good
        else None,
        target_cores=None if window is None else window.target_cores,
        other_cores=None if window is None else window.other_cores,
        api_cpu_s_per_1k_tokens=round(api_cpu / tokens * 1000, 4) if api_cpu and tokens else None,
        api_cpu_ms_per_request=round(api_cpu / len(good) * 1000, 3) if api_cpu and good else None,
        first_error=errors[0] if errors else None,
    )


def tree_rss(root: psutil.Process) -> int:
    """Resident bytes of a process and all its descendants (shared pages counted per process)."""
    total = 0
    with contextlib.suppress(psutil.NoSuchProcess):
        processes = [root, *root.children(recursive=True)]
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += process.memory_info().rss
    return total


def process_cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU seconds of one process (0 once it is gone)."""
    with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
        times = process.cpu_times()
        return float(times.user + times.system)
    return 0.0


def _tree_cpu_seconds(root: psutil.Process) -> float:
    total = 0.0
    with contextlib.suppress(psutil.NoSuchProcess):
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                times = process.cpu_times()
                total += times.user + times.system
    return total


def _busy_cpu_seconds() -> float:
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


@dataclass(frozen=True)
class Window:
    """What the machine did during one run."""

    peak_rss_bytes: int
    target_cores: float  # CPU used by the target's process tree, in cores
    other_cores: float  # CPU used by everything else but this harness: the noise
    root_cpu_seconds: float  # CPU seconds of the root process alone (the API process)


class RssSampler:
    """Samples a process tree's RSS in a thread; `window()` sums up the time since its last call.

    Also accounts CPU: the tree's, and that of every other process on the machine (other
    people's jobs on a shared machine), which is the benchmark's main source of noise.
    """

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self._root = psutil.Process(pid)
        self._own = psutil.Process()
        self._own_in_tree = pid == os.getpid()
        self._interval = interval
        self._lock = threading.Lock()
        self._window_peak = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._mark = self._cpu_mark()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        rss = tree_rss(self._root)
        with self._lock:
            self._window_peak = max(self._window_peak, rss)
            self.peak = max(self.peak, rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self._interval)

    def _cpu_mark(self) -> tuple[float, float, float, float, float]:
        own = 0.0 if self._own_in_tree else process_cpu_seconds(self._own)
        return (
            time.perf_counter(),
            _busy_cpu_seconds(),
            _tree_cpu_seconds(self._root),
            own,
            process_cpu_seconds(self._root),
        )

    def window(self) -> Window:
        """Peak RSS and CPU use since the previous call (sampling once more now)."""
        self._sample()
        with self._lock:
            peak, self._window_peak = self._window_peak, 0
        mark = self._cpu_mark()
        wall, busy, tree, own, root = (b - a for a, b in zip(self._mark, mark, strict=True))
        self._mark = mark
        wall = max(wall, 1e-9)
        return Window(
            peak, round(tree / wall, 2), round(max(0.0, busy - tree - own) / wall, 2), root
        )


def now() -> float:
    return time.perf_counter()


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when installed: what uvicorn uses in both servers."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
