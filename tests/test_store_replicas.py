"""Two replicas on one shared adapter store (a folder), through real HTTP on the real engine.

Both apps share the session's engine (ids kept apart), which is what makes this test cheap; the
S3 test (`test_store_s3_replicas.py`) runs two real server processes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
import pytest_asyncio

from server.engine.vllm_engine import VllmEngine
from server.testbed.default_model import DefaultModel
from server.testbed.demo_adapters import DEMO_ADAPTERS, write_demo_adapter
from tests.conftest import engine_settings
from tests.live_server import LiveServer, live_server

ADMIN = "store-admin-key"
POLL_SECONDS = 0.5
PROMPT = [{"role": "user", "content": "Tell me a story about a cat."}]
FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory, tiny: DefaultModel) -> dict[str, Path]:
    """Two versions of one adapter (different weights) and a second adapter."""
    folder = tmp_path_factory.mktemp("store-sources")
    return {
        "v1": write_demo_adapter(tiny.model_dir, folder / "v1", DEMO_ADAPTERS[0], seed=301),
        "v2": write_demo_adapter(tiny.model_dir, folder / "v2", DEMO_ADAPTERS[1], seed=302),
        "other": write_demo_adapter(tiny.model_dir, folder / "other", DEMO_ADAPTERS[2], seed=303),
    }


def replica_settings(tiny: DefaultModel, state: Path, store: Path) -> object:
    return engine_settings(
        cache_dir=tiny.model_dir.parent,
        state_dir=state,
        admin_keys=[ADMIN],
        adapter_store=str(store),
        adapter_store_poll_seconds=POLL_SECONDS,
        adapter_cache_max_bytes=10 * 2**20,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def replicas(
    engine: VllmEngine, tiny: DefaultModel, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[LiveServer, LiveServer]]:
    store = tmp_path_factory.mktemp("shared-store")
    a_settings = replica_settings(tiny, tmp_path_factory.mktemp("a"), store)
    b_settings = replica_settings(tiny, tmp_path_factory.mktemp("b"), store)
    async with (
        live_server(a_settings, engine, first_adapter_id=80_000) as a,  # type: ignore[arg-type]
        live_server(b_settings, engine, first_adapter_id=81_000) as b,  # type: ignore[arg-type]
    ):
        yield a, b


def admin(server: LiveServer) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=server.base_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120
    )


async def upload(server: LiveServer, name: str, folder: Path, **flags: str) -> httpx.Response:
    files = {n: (n, (folder / n).read_bytes()) for n in FILES}
    async with admin(server) as client:
        return await client.post("/v1/adapters", data={"name": name, **flags}, files=files)


async def greedy(server: LiveServer, model: str) -> str:
    client = openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    reply = await client.chat.completions.create(
        model=model, messages=PROMPT, max_tokens=12, temperature=0
    )
    return reply.choices[0].message.content or ""


async def model_ids(server: LiveServer) -> set[str]:
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        return {m["id"] for m in (await client.get("/v1/models")).json()["data"]}


async def until(check: object, timeout: float) -> float:
    """Seconds until the async `check()` is true; fails after `timeout`."""
    started = time.monotonic()
    while not await check():  # type: ignore[operator]
        assert time.monotonic() - started < timeout, "not reached in time"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_an_adapter_loaded_on_one_replica_answers_on_the_other(
    replicas: tuple[LiveServer, LiveServer], versions: dict[str, Path]
) -> None:
    a, b = replicas
    assert "shared" not in await model_ids(b)
    created = await upload(a, "shared", versions["v1"])
    assert created.status_code == 201, created.text
    on_a = await greedy(a, "shared")
    # Pulled on B's first request for it, several at once: one pull, one version, same answer.
    answers = await asyncio.gather(*(greedy(b, "shared") for _ in range(3)))
    assert answers == [on_a] * 3
    assert on_a != await greedy(a, "tiny-gemma4")
    async with admin(b) as client:
        listed = (await client.get("/v1/adapters/shared")).json()
    assert listed["sha256"] == created.json()["sha256"]
    assert listed["version"] == created.json()["version"] == 1
    # B lists it (the store as last polled) without being asked for it.
    assert (await upload(a, "listed-only", versions["other"])).status_code == 201
    await until(lambda: _has(b, "listed-only"), timeout=10 * POLL_SECONDS)
    async with admin(b) as client:
        adapters = {x["name"]: x for x in (await client.get("/v1/adapters")).json()["data"]}
    assert adapters["listed-only"]["state"] == "stored"  # registered, not pulled by B yet
    assert adapters["shared"]["state"] == "ready"


async def _has(server: LiveServer, name: str) -> bool:
    return name in await model_ids(server)


async def test_a_second_load_of_the_name_through_another_replica_is_refused(
    replicas: tuple[LiveServer, LiveServer], versions: dict[str, Path]
) -> None:
    a, b = replicas
    assert (await upload(a, "once", versions["v1"])).status_code == 201
    refused = await upload(b, "once", versions["v2"])
    assert refused.status_code == 409
    assert refused.json()["error"]["type"] == "ConflictError"
    assert "replace=true" in refused.json()["error"]["message"]
    # B replaces a version it never pulled: a conditional write on the store's current one.
    replaced = await upload(b, "once", versions["v2"], replace="true")
    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["version"] == 2

    async def a_switched() -> bool:
        async with admin(a) as client:
            return bool((await client.get("/v1/adapters/once")).json()["version"] == 2)

    await until(a_switched, timeout=POLL_SECONDS + 20)
    assert await greedy(a, "once") == await greedy(b, "once")


async def test_replace_and_unload_reach_the_other_replica_within_the_poll_bound(
    replicas: tuple[LiveServer, LiveServer], versions: dict[str, Path]
) -> None:
    a, b = replicas
    assert (await upload(a, "moving", versions["v1"])).status_code == 201
    old = await greedy(b, "moving")
    replaced = await upload(a, "moving", versions["v2"], replace="true")
    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["version"] == 2
    new = await greedy(a, "moving")
    assert new != old

    async def b_switched() -> bool:
        async with admin(b) as client:
            got = (await client.get("/v1/adapters/moving")).json()
        return bool(got.get("sha256") == replaced.json()["sha256"])

    await until(b_switched, timeout=POLL_SECONDS + 20)
    assert await greedy(b, "moving") == new

    async with admin(a) as client:
        assert (await client.delete("/v1/adapters/moving")).status_code == 200

    async def b_forgot() -> bool:
        try:
            await greedy(b, "moving")
        except openai.NotFoundError:
            return True
        return False

    await until(b_forgot, timeout=POLL_SECONDS + 20)
    assert "moving" not in await model_ids(a)


async def test_unload_through_a_replica_that_never_pulled_it(
    replicas: tuple[LiveServer, LiveServer], versions: dict[str, Path]
) -> None:
    a, b = replicas
    assert (await upload(a, "far", versions["other"])).status_code == 201
    async with admin(b) as client:
        gone = await client.delete("/v1/adapters/far")
        assert gone.status_code == 200, gone.text
        assert gone.json()["state"] == "unloaded"
        assert (await client.delete("/v1/adapters/far")).status_code == 404

    async def a_forgot() -> bool:
        try:
            await greedy(a, "far")
        except openai.NotFoundError:
            return True
        return False

    await until(a_forgot, timeout=POLL_SECONDS + 20)


async def test_an_unknown_name_reads_the_store_once_until_it_is_registered(
    replicas: tuple[LiveServer, LiveServer],
    versions: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = replicas
    store = b.app.state.services.store.store
    reads: list[str] = []
    real_read = store.read_manifest

    def read_manifest(name: str) -> object:
        reads.append(name)
        return real_read(name)

    monkeypatch.setattr(store, "read_manifest", read_manifest)
    client = openai.AsyncOpenAI(base_url=b.v1, api_key="unused", max_retries=0)
    for _ in range(4):
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="ghost", messages=PROMPT, max_tokens=2)
    assert reads.count("ghost") == 1  # then remembered as absent (for one poll interval)
    # Registered through A: B serves it within its poll bound, not after some longer cache.
    assert (await upload(a, "ghost", versions["other"])).status_code == 201
    on_a = await greedy(a, "ghost")

    async def b_serves() -> bool:
        try:
            return await greedy(b, "ghost") == on_a
        except openai.NotFoundError:
            return False

    await until(b_serves, timeout=POLL_SECONDS + 20)
