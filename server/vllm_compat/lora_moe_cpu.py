"""Fix: with LoRA on, vLLM 0.32's CPU build crashes on every request to a MoE model (26B-A4B).

With LoRA enabled, vLLM picks the Triton MoE kernels for the routed experts
(`select_unquantized_moe_backend` returns TRITON whenever `is_lora_enabled`) and wraps each
`MoERunner` in `FusedMoEWithLoRA`, which runs them too, even for requests without an adapter.
The CPU build has no Triton backend: the first step kills the worker (`module 'triton.language'
has no attribute 'float32'`) and with it the engine. Here, on CPU only, the experts keep vLLM's
CPU MoE backend and are left unwrapped; every other layer (attention, dense MLP, router,
per-layer projections) keeps its LoRA wrapper. Consequence: LoRA on the experts themselves is
not applied on CPU; PEFT adapters for Gemma 4 do not target the experts (3-D parameters, not
Linear modules).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from server.vllm_compat.vllm_version import is_target_vllm

logger = logging.getLogger(__name__)

_FIX_MARK = "_gemma_server_no_moe_lora_on_cpu"


def _patch_backend_choice() -> None:
    from vllm.model_executor.layers.fused_moe import unquantized_fused_moe_method
    from vllm.model_executor.layers.fused_moe.oracle import unquantized

    chosen = unquantized.select_unquantized_moe_backend
    if getattr(chosen, _FIX_MARK, False):
        return

    def select_unquantized_moe_backend(moe_config: Any) -> Any:
        # The backend vLLM picks without LoRA: the CPU one here.
        return chosen(dataclasses.replace(moe_config, is_lora_enabled=False))

    setattr(select_unquantized_moe_backend, _FIX_MARK, True)
    unquantized.select_unquantized_moe_backend = select_unquantized_moe_backend
    unquantized_fused_moe_method.select_unquantized_moe_backend = select_unquantized_moe_backend


def apply() -> bool:
    """On a CPU platform with vLLM 0.32: CPU MoE backend, and no LoRA wrapper on `MoERunner`."""
    if not is_target_vllm():
        return False
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from vllm.lora import model_manager
    from vllm.model_executor.layers.fused_moe import MoERunner

    _patch_backend_choice()
    current = model_manager.is_supported_lora_module
    if getattr(current, _FIX_MARK, False):
        return True

    def is_supported_lora_module(module_name: str, module: Any, supported: list[str]) -> bool:
        if isinstance(module, MoERunner):
            return False
        return bool(current(module_name, module, supported))

    setattr(is_supported_lora_module, _FIX_MARK, True)
    model_manager.is_supported_lora_module = is_supported_lora_module  # type: ignore[assignment]
    return True
