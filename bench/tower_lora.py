"""What tower LoRA (`--enable-tower-lora`) costs: the same engine with it off and on, side by side.

`python -m bench.tower_lora [--dtype auto] [--repeats 7]` starts two engines on the tiny Gemma 4
in one process (tower LoRA off and on), each with one vision-tower adapter written by PEFT, and
alternates every measurement between them, so a shared machine's load hits both alike. It
measures engine memory (resident bytes of each engine's processes once warm), the median
latency of image requests (a fresh image per request, so neither the encoder cache nor the
prefix cache hides the vision tower) for a small and a large image, with and without the
adapter, and text throughput (8 concurrent requests). It prints one table; BENCHMARKS.md
quotes it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from bench.measure import tree_rss

logger = logging.getLogger("bench.tower_lora")

IMAGE_SIZES = (64, 512)  # 16 patches, and the most a 70-soft-token image holds after resizing
IMAGE_TOKENS = 16
TEXT_TOKENS = 64
TEXT_CONCURRENCY = 8
_ids = itertools.count()


@dataclass
class ModeFigures:
    """One engine's measurements (seconds, bytes, tokens per second)."""

    rss_bytes: int
    image_latency: dict[tuple[int, bool], float]  # (image size, with adapter) -> median seconds
    text_tokens_per_second: float


def _image(seed: int, size: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def _render(model_dir: Path, content: list[dict[str, str]]) -> str:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    messages = [{"role": "user", "content": content}]
    return str(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


async def _generate(engine: object, prompt: object, max_tokens: int, adapter: object) -> int:
    from server.engine.protocol import Sampling

    sampling = Sampling(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True)
    tokens = 0
    stream = engine.generate(f"tower-{next(_ids)}", prompt, sampling, adapter)  # type: ignore[attr-defined]
    async for chunk in stream:
        tokens += sum(len(delta.token_ids) for delta in chunk.completions)
    return tokens


def _engine_rss(pids: set[int]) -> int:
    """Resident bytes of one engine's processes (its engine core and worker, and their children)."""
    total = 0
    for pid in pids:
        try:
            total += tree_rss(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    return total


async def _start(model_dir: Path, *, tower: bool, dtype: str) -> tuple[object, set[int]]:
    """Start one engine; return it with the ids of the processes it started."""
    from server.engine.vllm_engine import VllmEngine
    from server.settings import Settings

    settings = Settings(
        dtype=dtype,
        enable_tower_lora=tower,
        max_model_len=1024,
        max_loras=2,
        max_lora_rank=16,
        kv_cache_memory_bytes=64 * 2**20,
    )
    before = {child.pid for child in psutil.Process().children()}
    engine = await VllmEngine.start(settings, str(model_dir), "tiny-gemma4")
    started = {child.pid for child in psutil.Process().children()} - before
    return engine, started


async def measure(
    model_dir: Path, adapter_dir: Path, *, dtype: str, repeats: int
) -> dict[bool, ModeFigures]:
    """Both engines up at once; every measurement alternates off / on, so load noise hits both."""
    from server.engine.protocol import AdapterRef, Prompt

    engines: dict[bool, object] = {}
    pids: dict[bool, set[int]] = {}
    try:
        for tower in (False, True):
            engines[tower], pids[tower] = await _start(model_dir, tower=tower, dtype=dtype)
        adapter = AdapterRef(name="vision-tower", int_id=1, path=str(adapter_dir))
        image_text = _render(model_dir, [{"type": "image"}, {"type": "text", "text": "What?"}])
        seeds = itertools.count(1000)
        for engine in engines.values():
            await engine.add_adapter(adapter)  # type: ignore[attr-defined]
            warm = Prompt(text=image_text, images=[_image(next(seeds), 64)])
            await _generate(engine, warm, IMAGE_TOKENS, adapter)
            await _generate(engine, warm, IMAGE_TOKENS, None)
        runs: dict[tuple[bool, int, bool], list[float]] = {}
        for size, with_adapter in itertools.product(IMAGE_SIZES, (False, True)):
            for _ in range(repeats):
                for tower, engine in engines.items():
                    prompt = Prompt(text=image_text, images=[_image(next(seeds), size)])
                    started = time.perf_counter()
                    await _generate(engine, prompt, IMAGE_TOKENS, adapter if with_adapter else None)
                    elapsed = time.perf_counter() - started
                    runs.setdefault((tower, size, with_adapter), []).append(elapsed)
        text = Prompt(text=_render(model_dir, [{"type": "text", "text": "Tell me a story."}]))
        rates: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(3):
            for tower, engine in engines.items():
                started = time.perf_counter()
                counts = await asyncio.gather(
                    *(_generate(engine, text, TEXT_TOKENS, None) for _ in range(TEXT_CONCURRENCY))
                )
                rates[tower].append(sum(counts) / (time.perf_counter() - started))
        return {
            tower: ModeFigures(
                _engine_rss(pids[tower]),
                {
                    (size, with_adapter): statistics.median(runs[(tower, size, with_adapter)])
                    for size, with_adapter in itertools.product(IMAGE_SIZES, (False, True))
                },
                statistics.median(rates[tower]),
            )
            for tower in engines
        }
    finally:
        for engine in engines.values():
            await engine.shutdown()  # type: ignore[attr-defined]


def table(off: ModeFigures, on: ModeFigures, *, dtype: str, repeats: int) -> str:
    """The figures side by side, as a Markdown table."""
    rows = [
        "| measure | tower LoRA off | tower LoRA on | on / off |",
        "|---|---:|---:|---:|",
        _row("engine RSS, engine core + worker (MiB)", off.rss_bytes / 2**20, on.rss_bytes / 2**20),
    ]
    for size, with_adapter in itertools.product(IMAGE_SIZES, (False, True)):
        label = (
            f"image {size}x{size}, {IMAGE_TOKENS} tokens, {'adapter' if with_adapter else 'base'}"
        )
        rows.append(
            _row(
                f"{label}: median latency (ms)",
                1000 * off.image_latency[(size, with_adapter)],
                1000 * on.image_latency[(size, with_adapter)],
            )
        )
    rows.append(
        _row(
            f"text, {TEXT_CONCURRENCY} concurrent x {TEXT_TOKENS} tokens (tok/s)",
            off.text_tokens_per_second,
            on.text_tokens_per_second,
        )
    )
    rows.append(f"\n(dtype {dtype}; image latency median of {repeats}, text median of 3)")
    return "\n".join(rows)


def _row(label: str, off: float, on: float) -> str:
    return f"| {label} | {off:.0f} | {on:.0f} | {on / off:.2f} |"


async def _main(args: argparse.Namespace) -> str:
    from server.testbed.demo_adapters import SHAPE_ADAPTERS, write_demo_adapter
    from server.testbed.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="tower-lora-") as tmp:
        model_dir = build_tiny_model(Path(tmp) / "tiny-gemma4")
        (spec,) = [s for s in SHAPE_ADAPTERS if s.name == "vision-tower"]
        adapter_dir = write_demo_adapter(model_dir, Path(tmp) / spec.name, spec)
        figures = await measure(model_dir, adapter_dir, dtype=args.dtype, repeats=args.repeats)
    return table(figures[False], figures[True], dtype=args.dtype, repeats=args.repeats)


def main(argv: list[str] | None = None) -> None:
    """Command line entry point: print the table."""
    parser = argparse.ArgumentParser(description="Cost of --enable-tower-lora, off vs on.")
    parser.add_argument("--dtype", default="auto", help="engine dtype (default auto, as make run)")
    parser.add_argument("--repeats", type=int, default=7, help="image requests per cell")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = asyncio.run(_main(args))
    print(result)


if __name__ == "__main__":
    main()
