"""Fix: with tower LoRA on, any adapter request with audio kills vLLM 0.32's engine (Gemma 4).

`enable_tower_connector_lora` wraps every Linear of the audio tower for LoRA, including
`relative_k_proj`, which runs on the relative-position table (13 rows here), not on the audio
tokens (25 for one second). The per-token LoRA mapping has one row per audio token, so the
first audio request that runs with any adapter, even a language-only one, fails in the LoRA
shrink (`einsum(): subscript b has size 25 ... size 13`) and the engine dies. Measured in
`tests/test_tower_lora.py`. Here the audio tower and `embed_audio` are left unwrapped: audio
runs on the base tower, language LoRA still applies, and audio-tower LoRA is not applied (the
service refuses adapters that carry it). Vision-tower LoRA is unaffected.
"""

from __future__ import annotations

import logging
from typing import Any

from server.vllm_compat.vllm_version import is_target_vllm

logger = logging.getLogger(__name__)

_FIX_MARK = "_gemma_server_no_audio_tower_lora"
AUDIO_PREFIXES = ("audio_tower.", "embed_audio.")


def apply() -> bool:
    """On vLLM 0.32, keep LoRA wrappers off Gemma 4's audio tower and audio connector."""
    if not is_target_vllm():
        return False
    from vllm.lora import model_manager

    current = model_manager.is_supported_lora_module
    if getattr(current, _FIX_MARK, False):
        return True

    def is_supported_lora_module(module_name: str, module: Any, supported: list[str]) -> bool:
        if module_name.startswith(AUDIO_PREFIXES):
            return False
        return bool(current(module_name, module, supported))

    setattr(is_supported_lora_module, _FIX_MARK, True)
    model_manager.is_supported_lora_module = is_supported_lora_module  # type: ignore[assignment]
    return True
