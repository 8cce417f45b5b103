"""The model served when none is given: the tiny Gemma 4 and its demo adapters, built on demand."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

TINY_MODEL_DIR = "tiny-gemma4"
DEMO_ADAPTERS_DIR = "demo-adapters"
# Bump when the builders' output changes (weights, tokenizer, template, adapters): a cache
# stamped with another version is rebuilt, so an old `.cache/` never serves stale files.
BUILD_VERSION = "3-trained-demo-adapters"
BUILD_STAMP = "build-version"
BUILD_LOCK = ".build-lock"


@dataclass(frozen=True)
class DefaultModel:
    """Where the tiny model and the demo adapters live."""

    model_dir: Path
    adapters_dir: Path

    def adapter_dirs(self) -> dict[str, Path]:
        """Demo adapter name -> folder."""
        return {p.name: p for p in sorted(self.adapters_dir.iterdir()) if p.is_dir()}


def _build_atomically(target: Path, build: Callable[[Path], object]) -> None:
    # Build beside the target and rename, so an interrupted build never looks finished.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_all_demo_adapters(model_dir: Path, out_dir: Path) -> None:
    from server.testbed.demo_adapters import write_demo_adapters
    from server.testbed.demo_training import write_trained_adapters

    write_demo_adapters(model_dir, out_dir)
    write_trained_adapters(model_dir, out_dir)


def ensure_default_model(cache_dir: Path) -> DefaultModel:
    """Return the tiny model and demo adapters under `cache_dir`, building what is missing.

    Processes sharing `cache_dir` (a test session and `make run`, say) build it once: the
    first takes a file lock and builds, the others wait for it and find it built.
    """
    built = _already_built(cache_dir)
    if built is not None:  # no lock needed: a read-only cache (the Docker image's) works too
        return built
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / BUILD_LOCK).open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_default_model(cache_dir)


def _already_built(cache_dir: Path) -> DefaultModel | None:
    """The cache when it is complete and from this builder version, else None."""
    model_dir = cache_dir / TINY_MODEL_DIR
    adapters_dir = cache_dir / DEMO_ADAPTERS_DIR
    stamp = cache_dir / BUILD_STAMP
    if not (stamp.is_file() and model_dir.is_dir() and adapters_dir.is_dir()):
        return None
    if stamp.read_text(encoding="utf-8").strip() != BUILD_VERSION:
        return None
    return DefaultModel(model_dir=model_dir.resolve(), adapters_dir=adapters_dir.resolve())


def _ensure_default_model(cache_dir: Path) -> DefaultModel:
    from server.testbed.tiny_model import build_tiny_model

    model_dir = cache_dir / TINY_MODEL_DIR
    adapters_dir = cache_dir / DEMO_ADAPTERS_DIR
    stamp = cache_dir / BUILD_STAMP
    built = stamp.read_text(encoding="utf-8").strip() if stamp.is_file() else None
    if built != BUILD_VERSION and (model_dir.exists() or adapters_dir.exists()):
        logger.info("the cache in %s is from another builder version; rebuilding", cache_dir)
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.rmtree(adapters_dir, ignore_errors=True)
    if not model_dir.is_dir():
        logger.info("building the tiny Gemma 4 in %s", model_dir)
        _build_atomically(model_dir, build_tiny_model)
    if not adapters_dir.is_dir():
        logger.info("writing and training the demo adapters in %s", adapters_dir)
        _build_atomically(adapters_dir, lambda out: _write_all_demo_adapters(model_dir, out))
    if built != BUILD_VERSION:
        stamp.write_text(BUILD_VERSION + "\n", encoding="utf-8")
    return DefaultModel(model_dir=model_dir.resolve(), adapters_dir=adapters_dir.resolve())
