"""After a known sequence of requests and adapter operations, /metrics holds exactly that."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from server.engine.vllm_engine import VllmEngine
from server.settings import Settings
from server.testbed.default_model import DefaultModel
from tests.conftest import engine_settings
from tests.live_server import LiveServer, live_server

ADMIN = "metrics-admin"
BASE = "tiny-gemma4"
PROMPT = [{"role": "user", "content": "Tell me a story about a cat."}]


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]  # (name, labels) -> value


def scrape(text: str) -> Samples:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def settings_with_root(tiny: DefaultModel, tmp_path: Path, **overrides: Any) -> Settings:
    """Test engine settings with an admin key and an adapter root holding `good` (demo-attn)."""
    root = tmp_path / "root"
    shutil.copytree(tiny.adapter_dirs()["demo-attn"], root / "good")
    return engine_settings(
        cache_dir=tiny.model_dir.parent,
        state_dir=tmp_path / "state",
        adapter_roots=[root],
        admin_keys=[ADMIN],
        **overrides,
    )


async def run_sequence(server: LiveServer, root: Path) -> dict[str, int]:
    """Requests and adapter operations with known outcomes; returns the prompt tokens used."""
    client = openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    prompt_tokens = {"demo-attn": 0, BASE: 0, "demo-mlp": 0}
    for model in ["demo-attn", "demo-attn", BASE]:
        reply = await client.chat.completions.create(
            model=model, messages=PROMPT, max_tokens=5, extra_body={"ignore_eos": True}
        )
        assert reply.usage is not None
        prompt_tokens[model] += reply.usage.prompt_tokens
    stream = await client.chat.completions.create(
        model="demo-mlp",
        messages=PROMPT,
        max_tokens=7,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.usage:
            prompt_tokens["demo-mlp"] += chunk.usage.prompt_tokens
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="nope", messages=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(
            model=BASE, messages=[{"role": "user", "content": "word " * 3000}], max_tokens=2
        )
    broken = root / "broken"
    shutil.copytree(root / "good", broken, dirs_exist_ok=True)
    (broken / "adapter_config.json").write_text("{not json")
    async with httpx.AsyncClient(
        base_url=server.base_url, headers={"Authorization": f"Bearer {ADMIN}"}
    ) as admin:
        assert (
            await admin.post("/v1/adapters", json={"name": "m1", "path": "good"})
        ).status_code == 201
        assert (
            await admin.post("/v1/adapters", json={"name": "m1", "path": "good"})
        ).status_code == 409
        assert (
            await admin.post("/v1/adapters", json={"name": "m2", "path": "broken"})
        ).status_code == 400
        replaced = await admin.post(
            "/v1/adapters", json={"name": "m1", "path": "good", "replace": True}
        )
        assert replaced.status_code == 200
        assert (await admin.delete("/v1/adapters/m1")).status_code == 200
    return prompt_tokens


async def test_metrics_count_exactly(
    engine: VllmEngine, tiny: DefaultModel, tmp_path: Path
) -> None:
    settings = settings_with_root(tiny, tmp_path, metrics_need_admin_key=True)
    async with live_server(settings, engine, first_adapter_id=50_000) as server:
        prompt_tokens = await run_sequence(server, settings.adapter_roots[0])
        async with httpx.AsyncClient(base_url=server.base_url) as http:
            assert (await http.get("/metrics")).status_code == 401
            text = (await http.get("/metrics", headers={"Authorization": f"Bearer {ADMIN}"})).text
    m = scrape(text)
    requests = "gemma_server_requests_total"
    assert value(m, requests, model="demo-attn", status="ok") == 2
    assert value(m, requests, model=BASE, status="ok") == 1
    assert value(m, requests, model=BASE, status="rejected") == 1
    assert value(m, requests, model="demo-mlp", status="ok") == 1
    assert value(m, requests, model="nope", status="ok") == 0
    completion = "gemma_server_completion_tokens_total"
    assert value(m, completion, model="demo-attn") == 10
    assert value(m, completion, model="demo-mlp") == 7
    for model, tokens in prompt_tokens.items():
        assert value(m, "gemma_server_prompt_tokens_total", model=model) == tokens
    assert value(m, "gemma_server_time_to_first_token_seconds_count", model="demo-attn") == 2
    assert value(m, "gemma_server_request_duration_seconds_count", model="demo-mlp") == 1
    assert value(m, "gemma_server_requests_in_flight") == 0
    assert m[("gemma_server_engine_requests_unfinished", frozenset())] == 0  # present, and 0
    assert value(m, "gemma_server_queue_wait_seconds_count") == 4
    assert value(m, "gemma_server_adapter_loads_total") == 2
    assert value(m, "gemma_server_adapter_replaces_total") == 1
    assert value(m, "gemma_server_adapter_unloads_total") == 1
    assert value(m, "gemma_server_adapter_load_failures_total", reason="exists") == 1
    assert value(m, "gemma_server_adapter_load_failures_total", reason="invalid") == 1
    assert value(m, "gemma_server_adapter_load_seconds_count") == 2
    for phase in ("validate", "fingerprint", "engine_add", "probe", "persist"):
        assert value(m, "gemma_server_adapter_load_phase_seconds_count", phase=phase) == 2
    assert value(m, "gemma_server_adapter_load_phase_seconds_count", phase="pin") == 0
    assert value(m, "gemma_server_adapters_registered") == len(tiny.adapter_dirs())  # the demos
    # Registered adapters are loaded at their first request: demo-attn's and demo-mlp's first.
    assert value(m, "gemma_server_adapter_on_demand_loads_total") == 2
    assert 1 <= value(m, "gemma_server_adapters_resident") <= settings.max_cpu_loras
    http_requests = "gemma_server_http_requests_total"
    route = "/v1/chat/completions"
    assert value(m, http_requests, route=route, method="POST", status="200") == 4
    assert value(m, http_requests, route=route, method="POST", status="404") == 1
    assert value(m, http_requests, route=route, method="POST", status="400") == 1
    assert value(m, http_requests, route="/v1/adapters", method="POST", status="409") == 1
    assert any(name.startswith("vllm:") for name, _ in m), "vLLM's engine metrics are exposed"


def test_adapter_labels_are_bounded() -> None:
    from server.metrics import OTHER, ServiceMetrics

    metrics = ServiceMetrics(max_adapter_labels=2)
    metrics.set_base_model("base")
    labels = [metrics.model_label(name) for name in ["a", "b", "c", "a", "base", "d"]]
    assert labels == ["a", "b", OTHER, "a", "base", OTHER]


# --- the model-server protocol of the Gateway API Inference Extension (routers read these) ---

LONG = 960  # tokens: a stream stays in flight for seconds while the test reads /metrics


def family_samples(text: str, name: str) -> list[Sample]:
    """The samples of the metric family `name`, which must appear exactly once (the service's
    own, where vLLM has one of the same name: vLLM's is left out)."""
    families = [f for f in text_string_to_metric_families(text) if f.name == name]
    assert len(families) == 1, f"{name}: {len(families)} families"
    return families[0].samples


def lora_info(text: str) -> list[dict[str, str]]:
    """The label sets of `vllm:lora_requests_info`."""
    return [dict(sample.labels) for sample in family_samples(text, "vllm:lora_requests_info")]


def vllm_gauge(text: str, name: str) -> float:
    """One of vLLM's own engine gauges (labelled with the served model and engine index)."""
    return value(scrape(text), name, model_name=BASE, engine="0")


def router_view(text: str) -> dict[str, Any]:
    """What a router reads: the one `vllm:lora_requests_info` label set, with vLLM's counts of
    running and waiting requests."""
    (info,) = lora_info(text)
    return {
        **info,
        "running": vllm_gauge(text, "vllm:num_requests_running"),
        "waiting": vllm_gauge(text, "vllm:num_requests_waiting"),
    }


def residency(text: str) -> set[tuple[str, str, str]]:
    return {
        (s.labels["adapter_name"], s.labels["level"], s.labels["pinned"])
        for s in family_samples(text, "vllm:lora_adapter_loaded")
        if s.value == 1
    }


async def poll_metrics(http: httpx.AsyncClient, done: Callable[[str], bool]) -> str:
    """/metrics once `done` holds for it (the engine's own gauges update at its steps)."""
    deadline = asyncio.get_running_loop().time() + 300
    while True:
        text = (await http.get("/metrics")).text
        if done(text) or asyncio.get_running_loop().time() > deadline:
            return text
        await asyncio.sleep(0.1)


@pytest_asyncio.fixture(loop_scope="session")
async def own_engine(tiny: DefaultModel) -> AsyncIterator[VllmEngine]:
    """An engine of this test's own. vLLM's gauges live in prometheus_client's global registry,
    and each new AsyncLLM replaces the previous one's there (one engine per process in the
    service): the session engine's would be stale once another test started an engine."""
    started = await VllmEngine.start(engine_settings(), str(tiny.model_dir), "tiny-gemma4")
    yield started
    await started.shutdown()


async def test_router_gauges_name_served_adapters(
    own_engine: VllmEngine, tiny: DefaultModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = own_engine  # holds no adapter yet: the residency below is exactly predictable
    residency_rpcs = counted(monkeypatch, engine)
    settings = settings_with_root(tiny, tmp_path)
    assert (settings.max_loras, settings.max_cpu_loras) == (3, 4)
    async with live_server(settings, engine, first_adapter_id=52_000) as server:
        client = openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
            loaded = await http.post(
                "/v1/adapters",
                json={"name": "pinned-attn", "path": "good", "pin": True},
                headers={"Authorization": f"Bearer {ADMIN}"},
            )
            assert loaded.status_code == 201, loaded.text

            def long_stream(model: str) -> Any:
                return client.chat.completions.create(
                    model=model,
                    messages=PROMPT,
                    max_tokens=LONG,
                    stream=True,
                    extra_body={"ignore_eos": True},
                )

            streams: list[Any] = []
            fourth: asyncio.Task[Any] | None = None
            try:
                # One adapter running: its served name, not the engine's `demo-attn@<id>`.
                streams.append(await long_stream("demo-attn"))
                await anext(aiter(streams[0]))
                text = (await http.get("/metrics")).text
                assert router_view(text) == {
                    "max_lora": "3",
                    "running_lora_adapters": "demo-attn",
                    "waiting_lora_adapters": "",
                    "running": 1,
                    "waiting": 0,
                }
                assert 0 < vllm_gauge(text, "vllm:kv_cache_usage_perc") < 1

                # Three adapters fill the three slots; a request on a fourth waits for a slot.
                for model in ["demo-mlp", "demo-all"]:
                    streams.append(await long_stream(model))
                    await anext(aiter(streams[-1]))
                fourth = asyncio.create_task(
                    client.chat.completions.create(
                        model="demo-pirate", messages=PROMPT, max_tokens=2
                    )
                )
                # Until the engine core has it queued (its own gauges follow a step later).
                text = await poll_metrics(
                    http, lambda t: vllm_gauge(t, "vllm:num_requests_waiting") == 1
                )
                assert router_view(text) == {
                    "max_lora": "3",
                    "running_lora_adapters": "demo-all,demo-attn,demo-mlp",
                    "waiting_lora_adapters": "demo-pirate",
                    "running": 3,
                    "waiting": 1,
                }
                assert value(scrape(text), "gemma_server_engine_requests_unfinished") == 4
                # The router's own route: the same view, and only what a router reads.
                routed = (await http.get("/metrics/router")).text
                assert router_view(routed) == router_view(text)
                assert residency(routed) == residency(text)
                assert 0 < vllm_gauge(routed, "vllm:kv_cache_usage_perc") < 1
                assert {f.name for f in text_string_to_metric_families(routed)} == {
                    "vllm:lora_requests_info",
                    "vllm:lora_adapter_loaded",
                    "vllm:num_requests_waiting",
                    "vllm:num_requests_running",
                    "vllm:kv_cache_usage_perc",
                    "vllm:cache_config_info",
                }
            finally:
                for stream in streams:
                    await stream.close()  # aborts: the waiting request gets a slot and finishes
                if fourth is not None:
                    await fourth

            # Idle: nothing running or waiting. Then one request on each of three adapters, one at
            # a time: they hold the three slots; the host cache (4) holds them and the pinned one.
            text = await poll_metrics(
                http, lambda t: value(scrape(t), "gemma_server_engine_requests_unfinished") == 0
            )
            assert lora_info(text) == [
                {"max_lora": "3", "running_lora_adapters": "", "waiting_lora_adapters": ""}
            ]
            for model in ["demo-mlp", "demo-all", "demo-attn"]:
                await client.chat.completions.create(model=model, messages=PROMPT, max_tokens=2)
            text = (await http.get("/metrics")).text
            assert residency(text) == {
                ("demo-all", "gpu", "false"),
                ("demo-attn", "gpu", "false"),
                ("demo-mlp", "gpu", "false"),
                ("pinned-attn", "cpu", "true"),
            }
            assert value(scrape(text), "gemma_server_adapters_resident") == 4
            registry = server.app.state.services.adapters.registry
            resident = {registry.get(n).int_id for n in ["demo-all", "demo-attn", "demo-mlp"]}
            resident.add(registry.get("pinned-attn").int_id)
            assert await engine.list_adapters() == resident  # vLLM's own list agrees
            assert "@" not in text.split("vllm:lora_requests_info", 1)[1].split("\n# ", 1)[0]

            # Scrapes with nothing changed ask the engine nothing (the answer is cached).
            asked = len(residency_rpcs)
            for _ in range(5):
                assert residency((await http.get("/metrics")).text) == residency(text)
            assert len(residency_rpcs) == asked
            # A first use (an on-demand load) shows in the next scrape, asked once.
            await client.chat.completions.create(model="demo-pirate", messages=PROMPT, max_tokens=2)
            text = (await http.get("/metrics")).text
            assert ("demo-pirate", "gpu", "false") in residency(text)
            assert ("pinned-attn", "cpu", "true") in residency(text)
            assert len(residency(text)) == 4  # the host cache holds 4
            assert len(residency_rpcs) == asked + 1


def counted(monkeypatch: pytest.MonkeyPatch, engine: VllmEngine) -> list[float]:
    """The times of the engine's residency RPCs from now on."""
    calls: list[float] = []
    real = engine.adapter_residency

    async def adapter_residency() -> Any:
        calls.append(time.monotonic())
        return await real()

    monkeypatch.setattr(engine, "adapter_residency", adapter_residency)
    return calls
