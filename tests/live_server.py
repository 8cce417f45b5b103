"""The service on a real socket, in the test's event loop, sharing the session's engine."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import uvicorn
from fastapi import FastAPI

from adapters.persistence import REGISTRY_FILE, RegistryStore
from server.app import create_app
from server.engine.protocol import InferenceEngine
from server.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class LiveServer:
    app: FastAPI
    base_url: str  # http://127.0.0.1:PORT

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"


async def wait_ready(base_url: str, timeout: float = 300.0) -> None:
    """Poll /ready until it answers 200."""
    deadline = asyncio.get_running_loop().time() + timeout
    async with httpx.AsyncClient() as client:
        while True:
            try:
                if (await client.get(f"{base_url}/ready")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{base_url} not ready after {timeout} s")
            await asyncio.sleep(0.2)


def seed_registry(state_dir: Path, first_adapter_id: int) -> None:
    """Start a registry whose ids begin at `first_adapter_id`.

    Apps that share one engine must not give two adapters the same engine id; a production
    server owns its engine, so this only matters in tests.
    """
    if not (state_dir / REGISTRY_FILE).exists():
        RegistryStore(state_dir).save([], first_adapter_id)


@asynccontextmanager
async def live_server(
    settings: Settings, engine: InferenceEngine, *, first_adapter_id: int
) -> AsyncIterator[LiveServer]:
    """Serve `create_app(settings, engine)` with uvicorn on a free loopback port."""
    seed_registry(settings.state_dir, first_adapter_id)
    port = free_port()
    app = create_app(settings, engine=engine)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    base_url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(base_url)
        yield LiveServer(app, base_url)
    finally:
        server.should_exit = True
        await task


def server_command(tiny_cache: Path, port: int, *flags: str) -> list[str]:
    """`python -m server` on the tiny model with small test settings, plus `flags`."""
    return [
        sys.executable,
        "-m",
        "server",
        "--cache-dir",
        str(tiny_cache),
        "--port",
        str(port),
        "--max-model-len",
        "1024",
        "--kv-cache-memory-bytes",
        str(64 * 2**20),
        *flags,
    ]


@contextlib.contextmanager
def server_process(
    tiny_cache: Path, *flags: str, log: Path | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`server_command` started on a free port: the process and its base URL; killed (with its
    engine processes) on leaving. With `log`, the server's stderr (its log) goes to that file."""
    port = free_port()
    with contextlib.ExitStack() as files:
        stderr = files.enter_context(log.open("wb")) if log is not None else None
        process = subprocess.Popen(server_command(tiny_cache, port, *flags), stderr=stderr)
        try:
            yield process, f"http://127.0.0.1:{port}"
        finally:
            kill_tree(process)


def kill_tree(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a server and its engine processes, as a crash or an OOM kill would."""
    if process.poll() is None:
        children = psutil.Process(process.pid).children(recursive=True)
        process.kill()
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    process.wait(30)
