"""Registered adapters survive a crash: SIGKILL the server, start it again on the same state."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import httpx
import openai

from server.testbed.default_model import DefaultModel
from server.testbed.demo_adapters import DEMO_ADAPTERS, write_demo_adapter
from tests.live_server import free_port, kill_tree, server_command, wait_ready

ADMIN = "restart-admin-key"
PROMPT = [{"role": "user", "content": "Tell me a story about a cat."}]


async def outputs(base_url: str, models: list[str]) -> dict[str, str]:
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    answers = {}
    for model in models:
        reply = await client.chat.completions.create(
            model=model, messages=PROMPT, max_tokens=12, temperature=0
        )
        answers[model] = reply.choices[0].message.content or ""
    return answers


async def test_adapters_survive_sigkill(tiny: DefaultModel, tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_demo_adapter(tiny.model_dir, root / "kept", DEMO_ADAPTERS[0], seed=7)
    uploaded = root / "uploaded"
    write_demo_adapter(tiny.model_dir, uploaded, DEMO_ADAPTERS[1], seed=8)
    flags = ["--state-dir", str(tmp_path / "state"), "--adapter-roots", str(root)]
    flags += ["--admin-keys", ADMIN, "--max-loras", "2", "--max-cpu-loras", "3"]
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    command = server_command(tiny.model_dir.parent, port, *flags)
    admin = {"Authorization": f"Bearer {ADMIN}"}

    first = subprocess.Popen(command)
    try:
        await wait_ready(base_url)
        async with httpx.AsyncClient(base_url=base_url, headers=admin, timeout=60) as client:
            by_path = await client.post(
                "/v1/adapters", json={"name": "kept", "path": "kept", "pin": True}
            )
            files = {
                n: (n, (uploaded / n).read_bytes())
                for n in ("adapter_config.json", "adapter_model.safetensors")
            }
            by_upload = await client.post("/v1/adapters", data={"name": "sent"}, files=files)
            assert by_path.status_code == 201 and by_upload.status_code == 201
            before = (await client.get("/v1/adapters")).json()["data"]
            while any(a["state"] == "pending" for a in before):  # preloaded: validated soon
                await asyncio.sleep(0.2)
                before = (await client.get("/v1/adapters")).json()["data"]
        answers = await outputs(base_url, [a["name"] for a in before])
    finally:
        kill_tree(first)

    second = subprocess.Popen(command)
    try:
        await wait_ready(base_url)
        async with httpx.AsyncClient(base_url=base_url, headers=admin, timeout=60) as client:
            after = (await client.get("/v1/adapters")).json()["data"]
            fresh = await client.post("/v1/adapters", json={"name": "later", "path": "kept"})
        assert [(a["name"], a["id"], a["sha256"], a["pinned"]) for a in after] == [
            (a["name"], a["id"], a["sha256"], a["pinned"]) for a in before
        ]
        assert {"kept", "sent", "demo-all", "demo-attn", "demo-mlp"} <= {a["name"] for a in after}
        assert await outputs(base_url, [a["name"] for a in after]) == answers
        assert fresh.json()["id"] > max(a["id"] for a in before)  # ids are never reused
    finally:
        kill_tree(second)
