"""After a known sequence of requests and adapter operations, /metrics holds exactly that."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.engine.vllm_engine import VllmEngine
from server.testbed.default_model import DefaultModel
from tests.conftest import engine_settings
from tests.live_server import LiveServer, live_server

ADMIN = "metrics-admin"
BASE = "tiny-gemma4"
PROMPT = [{"role": "user", "content": "Tell me a story about a cat."}]


def scrape(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


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
    root = tmp_path / "root"
    shutil.copytree(tiny.adapter_dirs()["demo-attn"], root / "good")
    settings = engine_settings(
        cache_dir=tiny.model_dir.parent,
        state_dir=tmp_path / "state",
        adapter_roots=[root],
        admin_keys=[ADMIN],
        metrics_need_admin_key=True,
    )
    async with live_server(settings, engine, first_adapter_id=50_000) as server:
        prompt_tokens = await run_sequence(server, root)
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
    assert value(m, "gemma_server_adapters_registered") == len(tiny.adapter_dirs())  # the demos
    assert value(m, "gemma_server_adapter_on_demand_loads_total") == 0
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
