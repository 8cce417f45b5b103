"""What the post-load effect probe sees and costs, on the real engine (tiny Gemma 4 by default).

For the demo adapters and scaled copies of demo-all (lora_B times 1e-2 down to 1e-30), prints
the probe's largest log-prob change and whether it counts as an effect, how long loading into
the engine takes and how long the probe takes; and the base-vs-base noise of the probe.

    .venv/bin/python -m bench.adapter_probe [--dtype auto|float32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file, save_file

from server.admin.effect_probe import (
    DEFAULT_TOLERANCE,
    largest_difference,
    probe_effect,
    probe_steps,
)
from server.engine.protocol import AdapterRef
from server.settings import Settings
from server.testbed.default_model import ensure_default_model

SCALES = (1e-2, 1e-3, 1e-4, 1e-6, 1e-30)


def _scaled_copy(folder: Path, scale: float, out: Path) -> Path:
    shutil.copytree(folder, out)
    weights = out / "adapter_model.safetensors"
    tensors = {k: v * scale if "lora_B" in k else v for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    return out


async def _run(dtype: str, repeats: int) -> None:
    from server.engine.vllm_engine import VllmEngine

    work = Path(tempfile.mkdtemp(prefix="adapter-probe-"))
    tiny = ensure_default_model(work / "cache")
    adapters = dict(tiny.adapter_dirs())
    for scale in SCALES:
        adapters[f"demo-all x{scale:g}"] = _scaled_copy(
            adapters["demo-all"], scale, work / f"scaled-{scale:g}"
        )
    settings = Settings(dtype=dtype, kv_cache_memory_bytes=64 * 2**20, max_lora_rank=16)
    engine = await VllmEngine.start(settings, str(tiny.model_dir), "tiny-gemma4")
    try:
        await probe_steps(engine, None)  # warm-up
        noise = 0.0
        for _ in range(repeats):
            first, second = await asyncio.gather(
                probe_steps(engine, None), probe_steps(engine, None)
            )
            noise = max(noise, largest_difference(first, second))
        print(f"dtype {dtype}; tolerance {DEFAULT_TOLERANCE:g}; base vs base: {noise:.3g}")
        print(f"{'adapter':<22} {'max change':>11} {'effect':>7} {'add (s)':>8} {'probe (s)':>10}")
        next_id = 1
        for name, folder in adapters.items():
            adds, probes, changes = [], [], []
            for _ in range(repeats):
                ref = AdapterRef(name=f"{name}-{next_id}", int_id=next_id, path=str(folder))
                next_id += 1
                started = time.perf_counter()
                await engine.add_adapter(ref)
                adds.append(time.perf_counter() - started)
                result = await probe_effect(engine, ref)
                probes.append(result.seconds)
                changes.append(result.max_logprob_difference)
                await engine.remove_adapter(ref.int_id)
            change = min(changes)
            print(
                f"{name:<22} {change:>11.3g} {'yes' if change > DEFAULT_TOLERANCE else 'no':>7} "
                f"{statistics.median(adds):>8.2f} {statistics.median(probes):>10.2f}"
            )
    finally:
        await engine.shutdown()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="auto", help="engine dtype (default auto, as make run)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per adapter (median time)")
    args = parser.parse_args()
    asyncio.run(_run(args.dtype, args.repeats))


if __name__ == "__main__":
    main()
