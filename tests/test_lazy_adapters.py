"""Registered adapters are loaded lazily: at start-up and after an engine restart only pinned ones
go into the engine, nothing is validated again while the files are unchanged, and an adapter
whose files vanished or changed gets its requests a clear 503 while everything else serves.

The app owns its engine here (as `python -m server` does), in this process, so the test can
count validations and SIGKILL the engine core to make the supervisor restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
import uvicorn
from openai.types.chat import ChatCompletionMessageParam

from adapters.persistence import RegistryStore
from server.admin import adapter_service
from server.app import create_app
from server.settings import Settings
from server.testbed.default_model import DefaultModel
from server.testbed.demo_adapters import write_adapter_variants
from tests.conftest import engine_settings
from tests.live_server import LiveServer, free_port, wait_ready

ADMIN = "lazy-admin"
BASE = "tiny-gemma4"
COUNT = 50
PROMPT: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Tell me a story about a cat."}
]
WEIGHTS = "adapter_model.safetensors"


def engine_cores() -> set[int]:
    """Pids of the engine-core processes below this test process."""
    cores = set()
    for child in psutil.Process(os.getpid()).children(recursive=True):
        with contextlib.suppress(psutil.Error):  # exited meanwhile, or a zombie
            if "EngineCore" in " ".join(child.cmdline()):
                cores.add(child.pid)
    return cores


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[LiveServer, int]]:
    """The app with its own engine on a free port; yields it and its engine core's pid."""
    before = engine_cores()
    port = free_port()
    app = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    base_url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(base_url, timeout=900)
        (core,) = engine_cores() - before
        yield LiveServer(app, base_url), core
    finally:
        server.should_exit = True
        await task


async def answers(server: LiveServer, models: list[str]) -> dict[str, str]:
    client = openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    result = {}
    for model in models:
        reply = await client.chat.completions.create(
            model=model, messages=PROMPT, max_tokens=12, temperature=0
        )
        result[model] = reply.choices[0].message.content or ""
    return result


async def registered(admin: httpx.AsyncClient) -> list[tuple[str, int, str, bool]]:
    """(name, id, sha256, pinned) of every adapter, once none is pending validation."""
    for _ in range(600):
        data = (await admin.get("/v1/adapters")).json()["data"]
        if all(a["state"] == "ready" for a in data):
            return [(a["name"], a["id"], a["sha256"], a["pinned"]) for a in data]
        await asyncio.sleep(0.5)
    raise AssertionError("adapters still pending validation")


def counting(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every validation the adapter service runs, by folder."""
    calls: list[Path] = []
    real: Callable[..., Any] = adapter_service.validate_adapter

    def validate(folder: Path, *args: Any, **kwargs: Any) -> Any:
        calls.append(Path(folder))
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(adapter_service, "validate_adapter", validate)
    return calls


def counting_saves(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of records of every registry file save."""
    saves: list[int] = []
    real = RegistryStore.save

    def save(store: RegistryStore, records: list[Any], next_id: int) -> None:
        saves.append(len(records))
        real(store, records, next_id)

    monkeypatch.setattr(RegistryStore, "save", save)
    return saves


async def test_lazy_restore_restart_and_broken_files(
    tiny: DefaultModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    preload = tmp_path / "preload"
    names = [f"p{i:02d}" for i in range(COUNT)]
    write_adapter_variants(tiny.adapters_dir / "demo-attn", preload, names, seed=1)
    settings = engine_settings(
        cache_dir=tiny.model_dir.parent,
        state_dir=tmp_path / "state",
        preload_dir=preload,
        adapter_roots=[preload],
        admin_keys=[ADMIN],
        max_loras=2,
        max_cpu_loras=4,
    )
    admin_headers = {"Authorization": f"Bearer {ADMIN}"}
    probe = [BASE, "eager-p00", "p00", "p01", "p12", "p13"]

    # First start: 50 preload folders registered, none loaded into the engine.
    saves = counting_saves(monkeypatch)
    async with serving(settings) as (server, _):
        services = server.app.state.services
        assert await services.adapters.resident_ids() == set()
        async with httpx.AsyncClient(
            base_url=server.base_url, headers=admin_headers, timeout=300
        ) as admin:
            # The same files loaded eagerly (engine load and probe now), pinned.
            eager = await admin.post(
                "/v1/adapters", json={"name": "eager-p00", "path": "p00", "pin": True}
            )
            assert eager.status_code == 201, eager.text
            first = await answers(server, probe)
            before = await registered(admin)
        assert len(before) == COUNT + 1
        # Lazily loaded, the adapter answers exactly as its eagerly loaded twin.
        assert first["p00"] == first["eager-p00"] != first[BASE]
        assert first["p00"] != first["p01"]
    # The background validation saves the registry file about once a second, not once per
    # adapter (50); what it had not saved yet is saved at shutdown (the restart finds it).
    assert 1 <= len(saves) < COUNT // 2

    # Restart on the same state: restored from the registry file, nothing validated again.
    validations = counting(monkeypatch)
    registry_file = settings.state_dir / "registry.json"
    saved = registry_file.stat()
    async with serving(settings) as (server, core):
        adapters = server.app.state.services.adapters
        eager_id = adapters.registry.get("eager-p00").int_id
        assert await adapters.resident_ids() == {eager_id}, "only the pinned one is loaded"
        async with httpx.AsyncClient(
            base_url=server.base_url, headers=admin_headers, timeout=300
        ) as admin:
            assert await registered(admin) == before  # same ids, sha256s and pins
        assert await answers(server, probe) == first
        assert validations == []
        # Nothing changed, so nothing was written: not by the restore, not by the preload scan.
        now = registry_file.stat()
        assert (now.st_ino, now.st_mtime_ns) == (saved.st_ino, saved.st_mtime_ns)

        # Files that vanished or changed after start-up: a clear 503 for their requests.
        (preload / "p10" / WEIGHTS).unlink()
        write_adapter_variants(tiny.adapters_dir / "demo-attn", tmp_path / "other", ["p11"])
        os.replace(tmp_path / "other" / "p11" / WEIGHTS, preload / "p11" / WEIGHTS)
        os.utime(preload / "p12" / WEIGHTS)  # touched only: re-hashed once, then served
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as http:
            chat = {"messages": PROMPT, "max_tokens": 4}
            vanished = await http.post("/v1/chat/completions", json={**chat, "model": "p10"})
            changed = await http.post("/v1/chat/completions", json={**chat, "model": "p11"})
            for reply, why in ((vanished, "files are missing"), (changed, "files changed")):
                assert reply.status_code == 503, reply.text
                error = reply.json()["error"]
                assert why in error["message"] and "`p1" in error["message"]
                assert str(tmp_path) not in reply.text
            assert (await http.get("/ready")).status_code == 200
        assert await answers(server, probe) == first  # the rest serves, p12 included
        assert validations == [preload / "p11", preload / "p12"]  # a stat differed: re-hashed

        # Engine restart: the new engine gets the pinned adapter; the others load at first use.
        psutil.Process(core).kill()
        async with httpx.AsyncClient(base_url=server.base_url) as http:
            for _ in range(300):
                if (await http.get("/ready")).status_code == 503:
                    break
                await asyncio.sleep(0.1)
        await wait_ready(server.base_url, timeout=900)
        assert await adapters.resident_ids() == {eager_id}
        assert await answers(server, probe) == first
        assert validations == [preload / "p11", preload / "p12"], "nothing validated again"
        never_used = await answers(server, ["p20", "p49"])  # first use: loaded and probed now
        assert first[BASE] not in never_used.values()
