"""A vLLM worker extension that reports which LoRA adapters the worker holds, and where.

vLLM mixes the class named by its `worker_extension_cls` engine argument into the worker class,
in the worker's own process, so `AsyncLLM.collective_rpc(RESIDENCY_RPC)` runs the method there
(vLLM's supported way to call custom code in workers). The caches it reads live only in the
worker: vLLM 0.32's `list_loras` returns their ids but not which sit in an accelerator slot or
are pinned. No vLLM import here: the worker has it loaded already.
"""

from __future__ import annotations

from typing import Any

RESIDENCY_RPC = "gemma_server_lora_residency"


class LoraResidencyExtension:
    """Mixed into vLLM's worker: one method, named so it cannot clash with the worker's own."""

    def gemma_server_lora_residency(self) -> list[tuple[int, bool, bool]]:
        """(adapter id, holds an accelerator slot, pinned) for each adapter in the host cache."""
        worker: Any = self
        lora_manager = getattr(worker.model_runner, "lora_manager", None)
        if lora_manager is None:  # LoRA off, or not set up yet
            return []
        # vLLM's LRUCacheLoRAModelManager: `_registered_adapters` is the host cache
        # (max_cpu_loras), `_active_adapters` the accelerator slots (max_loras); an adapter in a
        # slot is always in the host cache too.
        models = lora_manager._adapter_manager
        host = models._registered_adapters
        slots = models._active_adapters
        return [(int(key), key in slots, key in host.pinned_items) for key in host]
