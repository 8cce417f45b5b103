"""Fix: pinning an adapter in vLLM 0.32 can crash the engine; pin it in host memory only.

`LRUCacheLoRAModelManager.pin_adapter` pins the adapter in the host (CPU) cache and also in an
accelerator slot. The scheduler does not know about that slot: it still admits `max_loras`
other adapters into one batch, and activating them then fails (`KeyError` in
`convert_mapping`), which kills the engine. Pinned here means what it should: the adapter never
leaves host memory, and takes a batch slot only while its requests run, like any other.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from server.vllm_compat.vllm_version import is_target_vllm

logger = logging.getLogger(__name__)

_FIX_MARK = "_gemma_server_host_only_pin"


def pin_in_host_memory(self: Any, lora_id: int) -> bool:
    """Pin an adapter in the host cache only (vLLM 0.32's CPU-cache half of pinning)."""
    self._pin_lora_in_cpu_cache(lora_id)
    return True


def apply() -> bool:
    """Replace `pin_adapter` on vLLM 0.32 when it still pins an accelerator slot."""
    if not is_target_vllm():
        return False
    from vllm.lora.model_manager import LRUCacheLoRAModelManager

    current = LRUCacheLoRAModelManager.pin_adapter
    if getattr(current, _FIX_MARK, False):
        return True
    if "_pin_lora_in_gpu_cache" not in inspect.getsource(current):
        logger.warning("vLLM's pin_adapter changed; the lora_pin fix is not applied")
        return False
    setattr(pin_in_host_memory, _FIX_MARK, True)
    LRUCacheLoRAModelManager.pin_adapter = pin_in_host_memory  # type: ignore[method-assign]
    return True
