"""Two server processes on one S3 store (SeaweedFS): what one registers, the other serves.

Run with `-s` to see the measured times (the README quotes them).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from server.testbed.default_model import DefaultModel
from server.testbed.demo_adapters import DEMO_ADAPTERS, write_demo_adapter
from tests.live_server import free_port, kill_tree, server_command, wait_ready
from tests.s3_server import S3Server, start_s3_server

ADMIN = "s3-store-admin-key"
POLL_SECONDS = 1.0
PROMPT = [{"role": "user", "content": "Tell me a story about a cat."}]
FILES = ("adapter_config.json", "adapter_model.safetensors")
# A replace or unload must reach the other replica within one poll, one pull and one load; the
# margin is for a loaded 2-core machine.
BOUND_SECONDS = POLL_SECONDS + 30


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


class Replica:
    """One `python -m server` process on the shared store."""

    def __init__(self, tiny: DefaultModel, state: Path, s3: S3Server, location: str) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        flags = [
            "--state-dir",
            str(state),
            "--admin-keys",
            ADMIN,
            "--max-loras",
            "2",
            "--adapter-store",
            location,
            "--adapter-store-endpoint-url",
            s3.endpoint_url,
            "--adapter-store-poll-seconds",
            str(POLL_SECONDS),
        ]
        command = server_command(tiny.model_dir.parent, self.port, *flags)
        self.process = subprocess.Popen(command, env={**os.environ, **s3.env()})

    def admin(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=300
        )

    async def upload(self, name: str, folder: Path, **flags: str) -> httpx.Response:
        files = {n: (n, (folder / n).read_bytes()) for n in FILES}
        async with self.admin() as client:
            return await client.post("/v1/adapters", data={"name": name, **flags}, files=files)

    async def greedy(self, model: str) -> str:
        client = openai.AsyncOpenAI(
            base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, timeout=300
        )
        reply = await client.chat.completions.create(
            model=model, messages=PROMPT, max_tokens=12, temperature=0
        )
        return reply.choices[0].message.content or ""

    async def sha256(self, name: str) -> str | None:
        async with self.admin() as client:
            got = await client.get(f"/v1/adapters/{name}")
        return got.json()["sha256"] if got.status_code == 200 else None

    async def model_ids(self) -> set[str]:
        async with httpx.AsyncClient(base_url=self.base_url) as client:
            return {m["id"] for m in (await client.get("/v1/models")).json()["data"]}


async def until(check: Callable[[], Awaitable[bool]], timeout: float) -> float:
    """Seconds until `check()` is true; fails after `timeout`."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < timeout, "not reached in time"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_two_server_processes_share_one_s3_store(
    tiny: DefaultModel, s3_server: S3Server, tmp_path: Path
) -> None:
    sources = tmp_path / "sources"
    v1 = write_demo_adapter(tiny.model_dir, sources / "v1", DEMO_ADAPTERS[0], seed=401)
    v2 = write_demo_adapter(tiny.model_dir, sources / "v2", DEMO_ADAPTERS[1], seed=402)
    location = s3_server.new_location()
    a = Replica(tiny, tmp_path / "a", s3_server, location)
    b = Replica(tiny, tmp_path / "b", s3_server, location)
    late: Replica | None = None
    try:
        await asyncio.gather(wait_ready(a.base_url, 900), wait_ready(b.base_url, 900))

        # Load through A; B answers it (pulled on its first request), with A's greedy output.
        started = time.monotonic()
        created = await a.upload("shared", v1)
        assert created.status_code == 201, created.text
        loaded = time.monotonic()
        on_b = await b.greedy("shared")
        visible = time.monotonic() - loaded
        assert on_b == await a.greedy("shared")
        assert on_b != await a.greedy("tiny-gemma4")
        print(
            f"\nload through A: {loaded - started:.2f} s; first answer through B (pull on miss "
            f"included): {visible:.2f} s after A's 201"
        )

        # Replace through A: B switches within the bound, and answers the new version.
        replaced = await a.upload("shared", v2, replace="true")
        assert replaced.status_code == 200, replaced.text
        new_sha = replaced.json()["sha256"]
        assert new_sha != created.json()["sha256"]

        async def b_has_new() -> bool:
            return await b.sha256("shared") == new_sha

        switched = await until(b_has_new, BOUND_SECONDS)
        assert await b.greedy("shared") == await a.greedy("shared") != on_b
        print(f"replace through A reached B in {switched:.2f} s (poll {POLL_SECONDS} s)")

        # Registered through A and never asked of B: B lists it after one poll.
        assert (await a.upload("second", v1)).status_code == 201
        listed = await until(lambda: _listed(b, "second"), BOUND_SECONDS)
        print(f"a new adapter is listed by B's /v1/models {listed:.2f} s after A's 201")

        # Unload through A: 404 on B within the bound (B serves it until then).
        assert await b.greedy("shared")
        async with a.admin() as client:
            assert (await client.delete("/v1/adapters/shared")).status_code == 200

        async def b_404() -> bool:
            try:
                await b.greedy("shared")
            except openai.NotFoundError:
                return True
            return False

        gone = await until(b_404, BOUND_SECONDS)
        print(f"unload through A reached B in {gone:.2f} s")
        assert "shared" not in await b.model_ids()

        # A server started later (B stopped, to keep within the machine) sees what is registered.
        kill_tree(b.process)
        late = Replica(tiny, tmp_path / "late", s3_server, location)
        await wait_ready(late.base_url, 900)
        assert "second" in await late.model_ids() and "shared" not in await late.model_ids()
        assert await late.greedy("second") == await a.greedy("second")
        with pytest.raises(openai.NotFoundError):
            await late.greedy("shared")
    finally:
        for replica in (a, b, late):
            if replica is not None:
                kill_tree(replica.process)


async def _listed(replica: Replica, name: str) -> bool:
    return name in await replica.model_ids()
