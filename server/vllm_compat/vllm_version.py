"""The vLLM release the compat fixes were written against."""

from __future__ import annotations

from typing import Any

TARGET = (0, 32)


def is_target_vllm() -> bool:
    """True on vLLM 0.32.x, the only release whose bugs these fixes are known to match."""
    import vllm

    version: tuple[Any, ...] = getattr(vllm, "__version_tuple__", ())
    return tuple(version[:2]) == TARGET
