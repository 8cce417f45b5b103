"""The engine alone, as the upper bound: the service's `VllmEngine` in-process, no HTTP.

Run by the harness as its own process (`python -m bench.engine_alone PLAN.json OUT.json`), so
its process tree (this process, vLLM's engine core and worker) is measured like a server's.
Prompts are rendered and images decoded before each timed run: only the engine is timed.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.http_client import HotLoad
from bench.measure import RequestRecord, RssSampler, event_loop_factory, now
from bench.rounds import Plan, run_round
from bench.workload import BenchRequest, PromptFactory, to_json

logger = logging.getLogger("bench.engine_alone")


class EngineDriver:
    """Requests straight into the engine, with the same closed-loop concurrency as the client."""

    def __init__(self, engine: object, plan: Plan, factory: PromptFactory) -> None:
        from server.engine.protocol import Sampling

        self._engine = engine
        self._factory = factory
        self._served = plan.engine.served_name
        self._adapters: dict[str, object] = {}
        self._ids = itertools.count(1)
        self._request_ids = itertools.count()
        tokens = plan.workload.output_tokens
        self._sampling = Sampling(
            max_tokens=tokens, min_tokens=tokens, ignore_eos=True, temperature=0.0
        )

    async def register(self, name: str, path: str) -> None:
        from server.engine.protocol import AdapterRef

        ref = AdapterRef(name=name, int_id=next(self._ids), path=path)
        await self._engine.add_adapter(ref)  # type: ignore[attr-defined]
        self._adapters[name] = ref

    def _prepare(self, request: BenchRequest) -> tuple[object, object]:
        from PIL import Image

        from server.engine.protocol import Prompt

        with_image = request.image_png is not None
        images = []
        if with_image:
            images.append(Image.open(io.BytesIO(request.image_png or b"")).convert("RGB"))
        prompt = Prompt(text=self._factory.render(request.text, with_image), images=images)
        adapter = None if request.model == self._served else self._adapters[request.model]
        return prompt, adapter

    async def _one(self, prompt: object, adapter: object) -> RequestRecord:
        record = RequestRecord(started=now())
        request_id = f"bench-{next(self._request_ids)}"
        try:
            stream = self._engine.generate(  # type: ignore[attr-defined]
                request_id, prompt, self._sampling, adapter
            )
            async for chunk in stream:
                arrived = now()
                record.prompt_tokens = chunk.prompt_token_count
                count = sum(len(delta.token_ids) for delta in chunk.completions)
                if count:
                    if record.first_token is None:
                        record.first_token = arrived
                    record.token_times.append(arrived)
                    record.completion_tokens += count
        except Exception as exc:
            record.error = f"{type(exc).__name__}: {exc}"[:200]
        record.finished = now()
        return record

    async def run(
        self, requests: Sequence[BenchRequest], concurrency: int
    ) -> tuple[list[RequestRecord], float]:
        prepared = [self._prepare(r) for r in requests]
        records: list[RequestRecord | None] = [None] * len(prepared)
        next_index = 0

        async def worker() -> None:
            nonlocal next_index
            while next_index < len(prepared):
                index = next_index
                next_index += 1
                records[index] = await self._one(*prepared[index])

        started = now()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prepared)))))
        return [r for r in records if r is not None], now() - started

    async def hot_load(self, name: str, path: str, request: BenchRequest) -> HotLoad:
        started = now()
        try:
            await self.register(name, path)
        except Exception as exc:
            return HotLoad(now() - started, None, f"{type(exc).__name__}: {exc}"[:200])
        loaded = now()
        record = await self._one(*self._prepare(request))
        if record.error or record.first_token is None:
            return HotLoad(loaded - started, None, record.error or "no token")
        return HotLoad(loaded - started, record.first_token - started)


async def _main(plan: Plan, out: Path) -> None:
    from server.engine.vllm_engine import VllmEngine
    from server.settings import Settings

    engine_config = plan.engine
    settings = Settings(
        dtype=engine_config.dtype,
        max_model_len=engine_config.max_model_len,
        max_num_seqs=engine_config.max_num_seqs,
        seed=engine_config.seed,
        max_loras=engine_config.max_loras,
        max_cpu_loras=engine_config.max_cpu_loras,
        max_lora_rank=engine_config.max_lora_rank,
        kv_cache_memory_bytes=engine_config.kv_cache_memory_bytes,
        max_images_per_prompt=engine_config.max_images_per_prompt,
        max_audios_per_prompt=engine_config.max_audios_per_prompt,
    )
    started = time.perf_counter()
    factory = PromptFactory(engine_config.model_dir)
    with RssSampler(os.getpid()) as sampler:
        engine = await VllmEngine.start(
            settings, engine_config.model_dir, engine_config.served_name
        )
        try:
            driver = EngineDriver(engine, plan, factory)
            for name, path in plan.registered.items():  # as both servers do at start-up
                await driver.register(name, path)
            startup = time.perf_counter() - started
            logger.info("engine alone ready in %.1f s", startup)
            result = await run_round(driver, plan, factory, sampler, "engine")
            result.startup_seconds = round(startup, 1)
        finally:
            await engine.shutdown()
    out.write_text(json.dumps(to_json(result), indent=1))


def main(argv: list[str] | None = None) -> None:
    """`python -m bench.engine_alone PLAN.json OUT.json`: one round, results to OUT.json."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        raise SystemExit("usage: python -m bench.engine_alone PLAN.json OUT.json")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    plan = Plan.from_json(json.loads(Path(args[0]).read_text()))
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(_main(plan, Path(args[1])))


if __name__ == "__main__":  # vLLM spawns processes: this module must not start one on import
    main()
