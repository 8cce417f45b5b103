"""vLLM plugin: narrow fixes for vLLM 0.32 gaps, applied in every vLLM process.

vLLM loads the entry point `vllm.general_plugins` in the API process, the engine core and each
worker (all started with `spawn`), so a fix applied here reaches the model wherever it runs.
Every fix checks the version and condition it targets and does nothing elsewhere.
Set `GEMMA_SERVER_DISABLE_FIXES=name,...` to switch fixes off (used by tests to show the bug).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

logger = logging.getLogger(__name__)

_applied: set[str] = set()


def _fixes() -> dict[str, Callable[[], bool]]:
    from server.vllm_compat import (
        audio_dtype,
        audio_gemm,
        gemma4_processor,
        logprob_ranks,
        lora_audio_tower,
        lora_index,
        lora_k_eq_v,
        lora_moe_cpu,
        lora_pin,
    )

    return {
        "gemma4_processor": gemma4_processor.apply,
        "lora_index": lora_index.apply,
        "lora_pin": lora_pin.apply,
        "audio_gemm": audio_gemm.apply,
        "lora_k_eq_v": lora_k_eq_v.apply,
        "lora_moe_cpu": lora_moe_cpu.apply,
        "lora_audio_tower": lora_audio_tower.apply,
        "audio_dtype": audio_dtype.apply,
        "logprob_ranks": logprob_ranks.apply,
    }


def disabled_fixes() -> set[str]:
    """Names of fixes switched off through the environment."""
    raw = os.environ.get("GEMMA_SERVER_DISABLE_FIXES", "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def register() -> None:
    """Apply every enabled fix once per process; each logs once when it takes effect."""
    off = disabled_fixes()
    for name, apply in _fixes().items():
        if name in _applied or name in off:
            continue
        if apply():
            _applied.add(name)
            logger.info("gemma-adapter-server compat fix applied: %s", name)
