"""Far more adapters than fit in memory: loaded on demand, least recently used out, pins kept."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio

from server.admin import api_router
from server.engine.vllm_engine import VllmEngine
from server.testbed.default_model import DefaultModel
from server.testbed.demo_adapters import DEMO_ADAPTERS, load_base_model, write_demo_adapter
from tests.conftest import engine_settings
from tests.live_server import LiveServer, live_server
from tests.test_metrics import scrape, value

ADAPTER_COUNT = 52
MAX_LORAS = 2
MAX_CPU_LORAS = 4
ADMIN = "many-admin"
WEIGHTS = "adapter_model.safetensors"
PROMPT = [{"role": "user", "content": "Tell me a story about a cat."}]


@pytest.fixture(scope="module")
def preload_dir(tiny: DefaultModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("many")
    base = load_base_model(tiny.model_dir)
    for i in range(ADAPTER_COUNT):
        spec = DEMO_ADAPTERS[i % len(DEMO_ADAPTERS)]
        write_demo_adapter(tiny.model_dir, folder / f"a{i:02d}", spec, seed=1000 + i, base=base)
    return folder


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def crowded(
    tiny: DefaultModel, preload_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LiveServer]:
    """Its own engine: 2 adapters per batch, 4 in host memory, 52 registered."""
    settings = engine_settings(
        cache_dir=tiny.model_dir.parent,
        state_dir=tmp_path_factory.mktemp("many-state"),
        preload_dir=preload_dir,
        max_loras=MAX_LORAS,
        max_cpu_loras=MAX_CPU_LORAS,
        admin_keys=[ADMIN],
    )
    engine = await VllmEngine.start(settings, str(tiny.model_dir), "tiny-gemma4")
    try:
        async with live_server(settings, engine, first_adapter_id=1) as server:
            yield server
    finally:
        await engine.shutdown()


async def answer(client: openai.AsyncOpenAI, model: str) -> str:
    reply = await client.chat.completions.create(
        model=model, messages=PROMPT, max_tokens=6, temperature=0
    )
    return reply.choices[0].message.content or ""


async def test_round_robin_over_many_adapters(crowded: LiveServer, preload_dir: Path) -> None:
    client = openai.AsyncOpenAI(base_url=crowded.v1, api_key="unused", max_retries=0)
    names = [f"a{i:02d}" for i in range(ADAPTER_COUNT)]
    listed = {m.id for m in (await client.models.list()).data}
    assert set(names) <= listed
    alone = {name: await answer(client, name) for name in names}
    assert len(set(alone.values())) > ADAPTER_COUNT // 2, "adapters should answer differently"

    source = preload_dir / "a00"
    files = {n: (n, (source / n).read_bytes()) for n in ("adapter_config.json", WEIGHTS)}
    async with httpx.AsyncClient(
        base_url=crowded.base_url, headers={"Authorization": f"Bearer {ADMIN}"}
    ) as admin:
        pinned = await admin.post(
            "/v1/adapters", data={"name": "pinned", "pin": "true"}, files=files
        )
    assert pinned.status_code == 201, pinned.text
    pinned_id = pinned.json()["id"]
    names.append("pinned")
    alone["pinned"] = alone["a00"]

    semaphore = asyncio.Semaphore(12)

    async def limited(name: str) -> tuple[str, str]:
        async with semaphore:
            return name, await answer(client, name)

    order = [names[i % len(names)] for i in range(2 * len(names))]
    results = await asyncio.gather(*(limited(name) for name in order))
    mismatches = [name for name, text in results if text != alone[name]]
    assert not mismatches, f"answers changed under adapter churn: {mismatches}"
    resident = await crowded.app.state.services.adapters.resident_ids()
    assert pinned_id in resident, "a pinned adapter never leaves memory"
    assert len(resident) <= MAX_CPU_LORAS
    async with httpx.AsyncClient(base_url=crowded.base_url) as http:
        metrics = scrape((await http.get("/metrics")).text)
    # Round robin over 53 adapters with 4 in host memory: nearly every request misses.
    misses = value(metrics, "gemma_server_adapter_on_demand_loads_total")
    assert len(names) <= misses <= len(names) + len(order)


async def test_the_adapter_list_is_cached_and_pages_agree(
    crowded: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds: list[int | None] = []
    real_page = api_router.adapter_page

    def counting_page(*args: Any) -> bytes:
        builds.append(args[2])  # the page's limit
        return real_page(*args)

    monkeypatch.setattr(api_router, "adapter_page", counting_page)
    client = openai.AsyncOpenAI(base_url=crowded.v1, api_key="unused", max_retries=0)
    async with httpx.AsyncClient(
        base_url=crowded.base_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60
    ) as admin:
        for _ in range(600):  # until the background validation of the preload folder is done
            everything = (await admin.get("/v1/adapters")).json()
            if all(a["state"] == "ready" for a in everything["data"]):
                break
            await asyncio.sleep(0.5)
        names = [a["name"] for a in everything["data"]]
        assert names == sorted(names) and len(names) >= ADAPTER_COUNT
        assert (everything["first_id"], everything["last_id"]) == (names[0], names[-1])
        assert everything["has_more"] is False

        # Nothing changed: the same body, built at most once (else cached already).
        builds.clear()
        first = (await admin.get("/v1/adapters")).content
        for _ in range(5):
            assert (await admin.get("/v1/adapters")).content == first
        assert builds in ([], [None])

        # Pages of 10 (built each time) cover the default page exactly.
        paged: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 10, **({"after": after} if after else {})}
            page = (await admin.get("/v1/adapters", params=params)).json()
            paged += page["data"]
            after = page["last_id"]
            if not page["has_more"]:
                break
        assert paged == json.loads(first)["data"]

        # A request changes its adapter's use count and residency: the next body shows them.
        before = {a["name"]: a for a in json.loads(first)["data"]}["a07"]
        await answer(client, "a07")
        after_use = {a["name"]: a for a in (await admin.get("/v1/adapters")).json()["data"]}
        assert after_use["a07"]["request_count"] == before["request_count"] + 1
        assert after_use["a07"]["resident"] is True
        # So does an unload.
        assert (await admin.delete("/v1/adapters/a07")).status_code == 200
        listed = [a["name"] for a in (await admin.get("/v1/adapters")).json()["data"]]
        assert "a07" not in listed and len(listed) == len(names) - 1
