"""`python -m server` as a user runs it: a real process, its engine, and a graceful SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from server.testbed.default_model import DefaultModel
from tests.live_server import server_process, wait_ready


@pytest.fixture
def server(tiny: DefaultModel, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    flags = ["--state-dir", str(tmp_path / "state"), "--drain-timeout-seconds", "60"]
    flags += ["--engine-max-restarts", "1"]
    with server_process(tiny.model_dir.parent, *flags, log=tmp_path / "server.log") as started:
        yield started


async def test_sigterm_lets_in_flight_requests_finish_then_stops_everything(
    server: tuple[subprocess.Popen[bytes], str], tmp_path: Path
) -> None:
    process, base_url = server
    await wait_ready(base_url)
    # Start-up's heap is frozen before readiness, as `vllm serve` does (no full collections of it).
    log = (tmp_path / "server.log").read_text()
    frozen = re.search(r"start-up heap frozen: (\d+) objects", log)
    assert frozen is not None and int(frozen.group(1)) > 100_000
    assert "vLLM environment variables cached" in log  # as its engine core and workers do
    children = psutil.Process(process.pid).children(recursive=True)
    assert children, "the engine runs in child processes"
    body = {
        "model": "demo-attn",
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 300,
        "ignore_eos": True,
        "stream": True,
    }
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=120) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        lines = response.aiter_lines()
        assert (await anext(lines)).startswith("data: ")
        process.send_signal(signal.SIGTERM)
        rest = [line async for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in rest[-2]
    assert process.wait(60) == 0
    await asyncio.sleep(1)
    assert not [child for child in children if child.is_running() and child.status() != "zombie"]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base_url}/ready", timeout=2)


async def test_ready_is_false_while_starting_and_the_server_exits_when_the_engine_keeps_dying(
    server: tuple[subprocess.Popen[bytes], str],
) -> None:
    process, base_url = server  # started with --engine-max-restarts 1
    seen: list[int] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        while not seen or seen[-1] != 200:
            with contextlib.suppress(httpx.TransportError):
                seen.append((await http.get("/ready")).status_code)
            await asyncio.sleep(0.1)
        assert seen[0] == 503, "readiness answers 503 while the engine starts"
        for child in psutil.Process(process.pid).children(recursive=True):
            child.kill()  # the engine dies under the server: it is restarted once
        while (await http.get("/ready")).status_code == 200:
            await asyncio.sleep(0.01)  # until vLLM's monitor thread has seen the death (ms)
        await wait_ready(base_url, timeout=600)
        for child in psutil.Process(process.pid).children(recursive=True):
            child.kill()  # and dies again: past the limit, the service gives up
        answers: list[int] = []
        while process.poll() is None and len(answers) < 300:
            with contextlib.suppress(httpx.TransportError):
                chat = await http.post(
                    "/v1/chat/completions",
                    json={"model": "demo-attn", "messages": [{"role": "user", "content": "Hi"}]},
                )
                answers.append(chat.status_code)
            await asyncio.sleep(0.1)
    # Requests get 503 from the moment the engine is gone, then the process exits for a restart.
    assert process.wait(60) == 1
    assert 200 not in answers, answers
