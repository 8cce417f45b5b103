"""Prometheus metrics of the service: per adapter, adapter lifecycle, server.

The service's metrics live in their own registry (one per app, so tests and several apps in one
process never share counters); `/metrics` serves it together with vLLM's engine metrics, which
vLLM records in prometheus_client's global registry under the `vllm:` prefix.
"""

from __future__ import annotations

import time

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

OTHER = "other"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


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
        self.adapters_registered = Gauge(
            "gemma_server_adapters_registered", "Adapters clients can name", registry=r
        )
        self.adapters_resident = Gauge(
            "gemma_server_adapters_resident", "Adapter versions in the engine's memory", registry=r
        )
        self.adapter_on_demand_loads = Counter(
            "gemma_server_adapter_on_demand_loads",
            "Requests whose adapter had left host memory and was loaded again (cache misses)",
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

    def exposition(self) -> bytes:
        """The service's metrics, then vLLM's (prometheus_client's global registry)."""
        return generate_latest(self.registry) + generate_latest(REGISTRY)


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
