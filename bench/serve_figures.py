"""Start-up, first-request latency, throughput at 8 concurrent requests and peak memory of the
service as `make run` starts it (tiny Gemma 4 unless --model is given). Prints a table.

    .venv/bin/python -m bench.serve_figures [--model PATH] [--requests 32] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import openai
import psutil

PROMPT = [{"role": "user", "content": "Tell me a story about a cat."}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PeakRss:
    """Samples the resident memory of a process and all its children."""

    def __init__(self, pid: int) -> None:
        self.peak = 0
        self._root = psutil.Process(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            total = 0
            for process in [self._root, *self._root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += process.memory_info().rss
            self.peak = max(self.peak, total)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


async def measure(base_url: str, requests: int, max_tokens: int) -> dict[str, float]:
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)

    async def ask(model: str) -> int:
        reply = await client.chat.completions.create(
            model=model,
            messages=PROMPT,  # type: ignore[arg-type]
            max_tokens=max_tokens,
            extra_body={"ignore_eos": True},
        )
        return reply.usage.completion_tokens if reply.usage else 0

    started = time.perf_counter()
    await ask("demo-attn")
    first = time.perf_counter() - started
    models = ["tiny-gemma4", "demo-attn", "demo-mlp", "demo-all"]
    semaphore = asyncio.Semaphore(8)

    async def limited(i: int) -> int:
        async with semaphore:
            return await ask(models[i % len(models)])

    started = time.perf_counter()
    tokens = sum(await asyncio.gather(*(limited(i) for i in range(requests))))
    elapsed = time.perf_counter() - started
    return {
        "first_request_s": first,
        "tokens_per_s": tokens / elapsed,
        "req_per_s": requests / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    port = free_port()
    state = tempfile.mkdtemp(prefix="serve-figures-")
    command = [sys.executable, "-m", "server", "--port", str(port), "--state-dir", state]
    if args.model:
        command += ["--model", args.model]
    started = time.perf_counter()
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rss = PeakRss(server.pid)
    base_url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None:
                raise SystemExit("the server exited during start-up")
            time.sleep(0.2)
        ready = time.perf_counter() - started
        figures = asyncio.run(measure(base_url, args.requests, args.max_tokens))
    finally:
        peak = rss.stop()
        server.terminate()
        server.wait(60)
    rows = [
        ("start-up to /ready", f"{ready:.1f} s"),
        (
            f"first request (demo-attn, {args.max_tokens} tokens)",
            f"{figures['first_request_s']:.2f} s",
        ),
        (
            f"throughput, 8 concurrent, {args.requests} requests",
            f"{figures['tokens_per_s']:.0f} tok/s",
        ),
        ("requests per second", f"{figures['req_per_s']:.2f}"),
        ("peak RSS, server + engine processes", f"{peak / 2**30:.2f} GiB"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"| {'figure'.ljust(width)} | value |\n|{'-' * (width + 2)}|-------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")


if __name__ == "__main__":
    main()
