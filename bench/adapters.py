"""The benchmark's adapters: seeded PEFT adapters of the demo kinds, cached on disk.

`registered-N/` holds the N adapters every target serves from start-up (a folder per N, so a
preload scan finds exactly them); `hot/` holds adapters loaded
at run time to measure hot-load latency (the service may load only from its adapter roots).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.workload import adapter_names, hot_adapter_names

logger = logging.getLogger(__name__)

REGISTERED = "registered"
HOT = "hot"
HOT_SEED_OFFSET = 5000


@dataclass(frozen=True)
class BenchAdapters:
    registered_dir: Path  # one sub-folder per registered adapter (the service's preload dir)
    hot_dir: Path  # one sub-folder per hot-load adapter (the service's adapter root)
    registered: dict[str, Path]
    hot: dict[str, Path]


def _complete(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file() and (
        folder / "adapter_model.safetensors"
    ).is_file()


def ensure_bench_adapters(
    model_dir: Path, cache_dir: Path, registered: int, hot: int
) -> BenchAdapters:
    """Write the adapters missing under `cache_dir` (one base model load for all of them)."""
    model_dir = Path(model_dir).resolve()
    cache_dir = Path(cache_dir).resolve()
    # The adapters depend on the model: one cache per model folder.
    root = cache_dir / model_dir.name
    registered_dir = root / f"{REGISTERED}-{registered}"
    hot_dir = root / HOT
    wanted = {registered_dir / name: 1000 + i for i, name in enumerate(adapter_names(registered))}
    wanted |= {hot_dir / name: HOT_SEED_OFFSET + i for i, name in enumerate(hot_adapter_names(hot))}
    missing = {folder: seed for folder, seed in wanted.items() if not _complete(folder)}
    if missing:
        from server.testbed.demo_adapters import DEMO_ADAPTERS, load_base_model, write_demo_adapter

        logger.info("writing %d bench adapters under %s", len(missing), root)
        base = load_base_model(model_dir)
        for folder, seed in sorted(missing.items()):
            spec = DEMO_ADAPTERS[seed % len(DEMO_ADAPTERS)]
            folder.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
            try:
                write_demo_adapter(model_dir, staging, spec, seed=seed, base=base)
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(staging, folder)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return BenchAdapters(
        registered_dir=registered_dir,
        hot_dir=hot_dir,
        registered={name: registered_dir / name for name in adapter_names(registered)},
        hot={name: hot_dir / name for name in hot_adapter_names(hot)},
    )
