"""Prometheus metrics of the service: per adapter, adapter lifecycle, server.

The service's metrics live in their own registry (one per app, so tests and several apps in one
process never share counters); `/metrics` serves it together with vLLM's engine metrics, which
vLLM records in prometheus_client's global registry under the `vllm:` prefix.

Two `vllm:` gauges come from the service, for routers (the Gateway API Inference Extension's
endpoint picker, llm-d) that match a request's `model` against them: `vllm:lora_requests_info`
(replacing vLLM's own, which names adapters by their engine-internal per-version name) and
`vllm:lora_adapter_loaded`, after vLLM's proposal (vllm-project/vllm#54830) for adapter residency.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from server.engine.protocol import AdapterActivity

OTHER = "other"
LORA_REQUESTS_INFO = "vllm:lora_requests_info"
LORA_ADAPTER_LOADED = "vllm:lora_adapter_loaded"
# What an adapter-aware router (the Gateway API Inference Extension's endpoint picker) reads:
# queue depth, running requests, KV-cache use, the KV-cache configuration, and the LoRA gauges.
ROUTER_ENGINE_FAMILIES = (
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    "vllm:kv_cache_usage_perc",
    "vllm:cache_config_info",
)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
PHASE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30)


class ServiceMetrics:
    """Every metric the service exports; adapter labels are bounded to keep series finite."""

    def __init__(self, max_adapter_labels: int) -> None:
        self.registry = CollectorRegistry()
        self._max_adapter_labels = max_adapter_labels
        self._labelled: set[str] = set()
        self._base_name: str | None = None
        r = self.registry
        # Per model (the base model or an adapter)
        self.requests = Counter(
            "gemma_server_requests",
            "Generation requests by model and outcome",
            ["model", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "gemma_server_prompt_tokens", "Prompt tokens processed", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "gemma_server_completion_tokens", "Tokens generated", ["model"], registry=r
        )
        self.time_to_first_token = Histogram(
            "gemma_server_time_to_first_token_seconds",
            "Arrival to first token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_latency = Histogram(
            "gemma_server_request_duration_seconds",
            "Arrival to last token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Adapter lifecycle
        self.adapter_loads = Counter(
            "gemma_server_adapter_loads", "Adapters loaded (new names and new versions)", registry=r
        )
        self.adapter_load_failures = Counter(
            "gemma_server_adapter_load_failures",
            "Refused adapter loads by reason",
            ["reason"],
            registry=r,
        )
        self.adapter_unloads = Counter(
            "gemma_server_adapter_unloads", "Adapters unloaded", registry=r
        )
        self.adapter_replaces = Counter(
            "gemma_server_adapter_replaces", "Adapters replaced by a new version", registry=r
        )
        self.adapter_load_seconds = Histogram(
            "gemma_server_adapter_load_seconds",
            "Load request to adapter ready",
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.adapter_load_phase_seconds = Histogram(
            "gemma_server_adapter_load_phase_seconds",
            "Time of each phase of an adapter load (the admin API's loads)",
            ["phase"],
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        self.adapters_registered = Gauge(
            "gemma_server_adapters_registered", "Adapters clients can name", registry=r
        )
        self.adapters_resident = Gauge(
            "gemma_server_adapters_resident", "Adapter versions in the engine's memory", registry=r
        )
        self.adapter_on_demand_loads = Counter(
            "gemma_server_adapter_on_demand_loads",
            "Requests whose adapter was not in host memory (first use or reload): cache misses",
            registry=r,
        )
        # Server
        self.in_flight = Gauge(
            "gemma_server_requests_in_flight", "Generation requests running", registry=r
        )
        self.engine_unfinished = Gauge(
            "gemma_server_engine_requests_unfinished",
            "Requests the engine holds (running or waiting), by its own count, at scrape time",
            registry=r,
        )
        self.queue_wait = Histogram(
            "gemma_server_queue_wait_seconds",
            "Time a request waited in the engine's queue",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.engine_restarts = Counter(
            "gemma_server_engine_restarts",
            "Times a dead inference engine was replaced in-process and served again",
            registry=r,
        )
        self.engine_restart_failures = Counter(
            "gemma_server_engine_restart_failures",
            "Engine restarts that failed (the new engine did not start or died during restore)",
            registry=r,
        )
        # For adapter-aware routers; set at scrape time (`record_lora_state`).
        self.lora_requests_info = Gauge(
            LORA_REQUESTS_INFO,
            "Adapters (served names, comma-separated) with running and waiting requests, and the "
            "engine's LoRA slots; the value is the time of the last update",
            ["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
            registry=r,
        )
        self.lora_adapter_loaded = Gauge(
            LORA_ADAPTER_LOADED,
            "1 per adapter (served name) in the engine's memory: level gpu = an accelerator LoRA "
            "slot, cpu = the host cache; pinned = never evicted from the host cache",
            ["adapter_name", "level", "pinned"],
            registry=r,
        )
        self.http_requests = Counter(
            "gemma_server_http_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )

    def set_base_model(self, name: str) -> None:
        self._base_name = name

    def model_label(self, model: str) -> str:
        """The model's own label, or `other` once the adapter label budget is spent."""
        if model == self._base_name or model in self._labelled:
            return model
        if len(self._labelled) < self._max_adapter_labels:
            self._labelled.add(model)
            return model
        return OTHER

    def track(self, model: str) -> RequestTracker:
        return RequestTracker(self, self.model_label(model))

    def record_lora_state(
        self, activity: AdapterActivity, resident: Iterable[tuple[str, str, bool]], max_lora: int
    ) -> None:
        """Set the routers' LoRA gauges to the engine's state now (one series per adapter)."""
        self.lora_requests_info.clear()  # one series: a router takes the newest anyway
        self.lora_requests_info.labels(
            max_lora=str(max_lora),
            running_lora_adapters=",".join(sorted(activity.running)),
            waiting_lora_adapters=",".join(sorted(activity.waiting)),
        ).set(time.time())
        self.lora_adapter_loaded.clear()  # evicted adapters lose their series
        for name, level, pinned in resident:
            self.lora_adapter_loaded.labels(name, level, str(pinned).lower()).set(1)

    def exposition(self) -> bytes:
        """The service's metrics, then vLLM's (prometheus_client's global registry).

        vLLM's `vllm:lora_requests_info` is left out: the service exports its own (same name,
        served adapter names), and a family may appear only once in an exposition.
        """
        keep_latest_lora_info(REGISTRY)  # vLLM still sets its own: bound its memory
        vllm = _Without(REGISTRY, {LORA_REQUESTS_INFO})
        return generate_latest(self.registry) + generate_latest(vllm)

    def router_exposition(self) -> bytes:
        """Only what a router reads, from the same gauges as `exposition`.

        An endpoint picker scrapes every pod often (llm-d-router's default: every 50 ms); the
        full exposition grows with the adapters that have their own labels (histograms per
        model), this one does not.
        """
        ours = self.registry.restricted_registry([LORA_REQUESTS_INFO, LORA_ADAPTER_LOADED])
        vllm = REGISTRY.restricted_registry(ROUTER_ENGINE_FAMILIES)
        return generate_latest(ours) + generate_latest(vllm)


class _Without(Collector):
    """A registry's metric families but the named ones."""

    def __init__(self, registry: Collector, names: set[str]) -> None:
        self._registry = registry
        self._names = names

    def collect(self) -> Iterator[Metric]:
        return (family for family in self._registry.collect() if family.name not in self._names)


def keep_latest_lora_info(registry: CollectorRegistry) -> None:
    """Bound vLLM's `vllm:lora_requests_info` to its latest series.

    vLLM 0.32 sets one series per distinct (running, waiting) adapter set, labelled with their
    names, and never removes one: with 1000s of adapters in turn the series (and the API
    process's memory) grow without bound. Its value is the time of the update, and readers
    (the Gateway API Inference Extension's endpoint picker) take the newest series, so only
    that one is kept. Reaches into prometheus_client 0.26's registry: vLLM holds the gauge.
    """
    gauge = registry._names_to_collectors.get(LORA_REQUESTS_INFO)
    if not isinstance(gauge, Gauge):
        return
    samples = [sample for family in gauge.collect() for sample in family.samples]
    if len(samples) <= 1:
        return
    newest = max(samples, key=lambda sample: sample.value)
    for sample in samples:
        if sample is not newest:
            gauge.remove(*(sample.labels[name] for name in gauge._labelnames))


class RequestTracker:
    """Times one generation request and records it when it ends (exactly once)."""

    def __init__(self, metrics: ServiceMetrics, label: str) -> None:
        self._metrics = metrics
        self._label = label
        self._started = time.perf_counter()
        self._first_token: float | None = None
        self._queue_recorded = False
        self._done = False
        metrics.in_flight.inc()

    def queued(self, seconds: float | None) -> None:
        if seconds is not None and not self._queue_recorded:
            self._queue_recorded = True
            self._metrics.queue_wait.observe(seconds)

    @property
    def waiting_for_first_token(self) -> bool:
        return self._first_token is None

    def tokens_arrived(self) -> None:
        if self._first_token is None:
            self._first_token = time.perf_counter()
            self._metrics.time_to_first_token.labels(self._label).observe(
                self._first_token - self._started
            )

    def finished(self, status: str, prompt_tokens: int, completion_tokens: int) -> None:
        if self._done:
            return
        self._done = True
        m = self._metrics
        m.in_flight.dec()
        m.requests.labels(self._label, status).inc()
        m.prompt_tokens.labels(self._label).inc(prompt_tokens)
        m.completion_tokens.labels(self._label).inc(completion_tokens)
        if status == "ok":
            m.request_latency.labels(self._label).observe(time.perf_counter() - self._started)
