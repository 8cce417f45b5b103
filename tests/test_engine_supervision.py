"""Engine death is survived in the same process: SIGKILL of the engine core, the poison guard.

The engine is crashed by SIGKILL of its engine-core process from the test, never by a hook in the
service: nothing a client sends can switch a crash on. A worker exception reaches the service the
same way (vLLM's client raises EngineDeadError to every request and check), so this covers it.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.testbed.default_model import DefaultModel
from server.testbed.demo_adapters import DEMO_ADAPTERS, write_demo_adapter
from tests.live_server import server_process, wait_ready

ADMIN = "supervision-admin"
BASE = "tiny-gemma4"
PROMPT = [{"role": "user", "content": "Tell me a story about a cat."}]
LONG = {"max_tokens": 900, "extra_body": {"ignore_eos": True}}


def engine_core(server_pid: int) -> psutil.Process:
    """The server's vLLM engine-core process (vLLM titles it `VLLM::EngineCore`)."""
    children = psutil.Process(server_pid).children(recursive=True)
    cores = [c for c in children if "EngineCore" in " ".join(c.cmdline())]
    assert len(cores) == 1, [(c.pid, c.cmdline()) for c in children]
    return cores[0]


def engine_processes(server_pid: int) -> list[psutil.Process]:
    """vLLM's engine-core and worker processes (not multiprocessing's resource tracker)."""
    children = psutil.Process(server_pid).children(recursive=True)
    return [c for c in children if "VLLM::" in " ".join(c.cmdline())]


def running(processes: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


async def greedy(client: openai.AsyncOpenAI, models: list[str]) -> dict[str, str]:
    answers = {}
    for model in models:
        reply = await client.chat.completions.create(
            model=model,
            messages=PROMPT,
            max_tokens=16,
            temperature=0,  # type: ignore[arg-type]
        )
        answers[model] = reply.choices[0].message.content or ""
    return answers


async def restarts(base_url: str) -> float:
    async with httpx.AsyncClient(base_url=base_url) as http:
        text = (await http.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gemma_server_engine_restarts_total":
                return sample.value
    raise AssertionError("no gemma_server_engine_restarts_total")


@pytest.fixture
def server(tiny: DefaultModel, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    root = tmp_path / "root"
    write_demo_adapter(tiny.model_dir, root / "kept", DEMO_ADAPTERS[0], seed=7)
    flags = ["--state-dir", str(tmp_path / "state"), "--adapter-roots", str(root)]
    flags += ["--admin-keys", ADMIN]  # and the default dtype, as users run it
    with server_process(tiny.model_dir.parent, *flags) as started:
        yield started


async def test_sigkill_of_the_engine_core_is_recovered_in_process(
    server: tuple[subprocess.Popen[bytes], str],
) -> None:
    process, base_url = server
    await wait_ready(base_url)
    admin = httpx.AsyncClient(
        base_url=base_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120
    )
    loaded = await admin.post("/v1/adapters", json={"name": "kept", "path": "kept", "pin": True})
    assert loaded.status_code == 201, loaded.text
    adapters_before = (await admin.get("/v1/adapters")).json()["data"]
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    models = [BASE, "kept", "demo-attn"]
    answers_before = await greedy(client, models)
    engine_before = engine_processes(process.pid)
    assert len(engine_before) >= 2  # the engine core and its worker
    core = engine_core(process.pid)

    streaming = [asyncio.Event() for _ in models]

    async def stream(model: str, started: asyncio.Event) -> BaseException | None:
        try:
            chunks = await client.chat.completions.create(
                model=model,
                messages=PROMPT,  # type: ignore[arg-type]
                stream=True,
                **LONG,  # type: ignore[arg-type]
            )
            async for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    started.set()
        except openai.APIError as exc:
            return exc
        return None

    streams = [asyncio.create_task(stream(m, s)) for m, s in zip(models, streaming, strict=True)]
    await asyncio.wait_for(asyncio.gather(*(s.wait() for s in streaming)), 300)
    core.kill()
    killed_at = time.perf_counter()
    outcomes = await asyncio.wait_for(asyncio.gather(*streams), 120)  # no stream hangs
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        ready = await http.get("/ready")
        health = await http.get("/health")
        chat = await http.post("/v1/chat/completions", json={"model": BASE, "messages": PROMPT})
    # Every in-flight stream ended with the service's error event, and the probes agree at once.
    assert all(isinstance(o, openai.APIError) and "restarting" in o.message for o in outcomes), [
        str(o) for o in outcomes
    ]
    assert (ready.status_code, ready.json()["phase"]) == (503, "restarting")
    assert (health.status_code, health.json()["phase"]) == (200, "restarting")
    assert chat.status_code == 503 and "restarting" in chat.json()["error"]["message"]

    await wait_ready(base_url, timeout=600)
    took = time.perf_counter() - killed_at
    print(f"\nengine restart: SIGKILL of the engine core to ready in {took:.1f} s")
    assert process.poll() is None  # the same process
    assert engine_core(process.pid).pid != core.pid
    assert not running(engine_before), "the dead engine's processes are gone"
    adapters_after = (await admin.get("/v1/adapters")).json()["data"]
    kept = ("name", "id", "sha256", "pinned", "version")
    assert [{k: a[k] for k in kept} for a in adapters_after] == [
        {k: a[k] for k in kept} for a in adapters_before
    ]
    assert await greedy(client, models) == answers_before
    assert await restarts(base_url) == 1
    await admin.aclose()


async def test_a_request_that_crashed_the_engine_twice_is_refused(
    server: tuple[subprocess.Popen[bytes], str],
) -> None:
    process, base_url = server
    await wait_ready(base_url)
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    poison: dict[str, Any] = {
        "model": "demo-mlp",
        "messages": [{"role": "user", "content": "The request that kills the engine."}],
        **LONG,
    }
    for _ in range(2):  # a client retrying a request that takes the engine down
        core = engine_core(process.pid)
        with pytest.raises(openai.APIError, match="restarting"):
            async for chunk in await client.chat.completions.create(**poison, stream=True):
                if chunk.choices and chunk.choices[0].delta.content and core.is_running():
                    core.kill()
        await wait_ready(base_url, timeout=600)
    with pytest.raises(openai.BadRequestError, match="crashed the inference engine twice"):
        await client.chat.completions.create(**poison, stream=True)
    with pytest.raises(openai.BadRequestError, match="crashed the inference engine twice"):
        await client.chat.completions.create(**poison)
    # Only that exact request is refused: the same conversation with other parameters runs.
    other = await client.chat.completions.create(**{**poison, "max_tokens": 4})
    assert other.choices[0].finish_reason == "length"
    async with httpx.AsyncClient(base_url=base_url) as http:
        assert (await http.get("/ready")).status_code == 200
    assert await restarts(base_url) == 2
