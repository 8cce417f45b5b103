"""The one client for both servers: httpx streaming chat completions, SSE parsed by hand.

Bodies are serialized before a run starts, and each event is parsed with `json.loads` only, so
the client (which shares the two cores with the server) costs as little as possible and the
same for either server.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from bench.measure import RequestRecord, now

HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer unused"}
TIMEOUT = httpx.Timeout(600.0, connect=30.0)


def client(concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(timeout=TIMEOUT, limits=limits, headers=HEADERS)


async def stream_chat(http: httpx.AsyncClient, url: str, body: bytes) -> RequestRecord:
    """Send one streamed chat request; record first-event and per-output-event times."""
    record = RequestRecord(started=now())
    try:
        async with http.stream("POST", url, content=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                record.error = f"HTTP {response.status_code}: {text[:200]}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                arrived = now()
                event = json.loads(data)
                if "error" in event:
                    record.error = f"error event: {json.dumps(event['error'])[:200]}"
                    continue
                choices = event.get("choices") or []
                if choices:
                    if record.first_token is None:
                        record.first_token = arrived
                    if any(
                        c.get("delta", {}).get("content") or c.get("finish_reason") for c in choices
                    ):
                        record.token_times.append(arrived)
                usage = event.get("usage")
                if usage:
                    record.completion_tokens = usage.get("completion_tokens", 0)
                    record.prompt_tokens = usage.get("prompt_tokens", 0)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        record.finished = now()
    return record


async def run_requests(
    base_url: str, bodies: Sequence[bytes], concurrency: int
) -> tuple[list[RequestRecord], float]:
    """Closed loop: `concurrency` workers each send the next body as soon as theirs ends."""
    url = f"{base_url}/v1/chat/completions"
    records: list[RequestRecord | None] = [None] * len(bodies)
    next_index = 0

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < len(bodies):
            index = next_index
            next_index += 1
            records[index] = await stream_chat(http, url, bodies[index])

    async with client(concurrency) as http:
        started = now()
        await asyncio.gather(*(worker(http) for _ in range(min(concurrency, len(bodies)))))
        seconds = now() - started
    return [r for r in records if r is not None], seconds


@dataclass(frozen=True)
class HotLoad:
    """One hot load: the load call's own time, and from the call to the first token."""

    load_seconds: float
    first_token_seconds: float | None
    error: str | None = None


async def hot_load(
    base_url: str, load_path: str, load_body: dict[str, object], admin_key: str, body: bytes
) -> HotLoad:
    """Load an adapter through the server's API, then stream one request to it."""
    async with client(1) as http:
        started = now()
        response = await http.post(
            f"{base_url}{load_path}",
            json=load_body,
            headers={"Authorization": f"Bearer {admin_key}"},
        )
        loaded = now()
        if response.status_code not in (200, 201):
            return HotLoad(
                loaded - started, None, f"HTTP {response.status_code}: {response.text[:200]}"
            )
        record = await stream_chat(http, f"{base_url}/v1/chat/completions", body)
    if record.error or record.first_token is None:
        return HotLoad(loaded - started, None, record.error or "no token")
    return HotLoad(loaded - started, record.first_token - started)
