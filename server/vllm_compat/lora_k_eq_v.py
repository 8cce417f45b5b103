"""Fix: on Gemma 4 `attention_k_eq_v` layers (31B, 26B-A4B), a k_proj LoRA must adapt V too.

In those full-attention layers the checkpoint has no v_proj: transformers computes the values
with `k_proj` (`value_states = key_states` before the norms), so a PEFT adapter's k_proj LoRA
changes both keys and values. vLLM 0.32 builds the layer as a packed `qkv_proj` whose V shard
gets K's base weight at load time, but packs the adapter's q/k/v LoRA as `[q, k, None]`: the V
shard keeps the base weight and the adapter is only half applied (greedy tokens and log-probs
differ from transformers + PEFT, measured in `tests/test_gemma_shapes.py`). Here the k_proj LoRA
of each such layer is copied to its v_proj slot before vLLM packs the adapter, which is what the
model computes.
"""

from __future__ import annotations

import copy
import inspect
import logging
import re
from typing import Any

from server.vllm_compat.vllm_version import is_target_vllm

logger = logging.getLogger(__name__)

_FIX_MARK = "_gemma_server_k_eq_v_lora"
_QKV = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.qkv_proj$")


def k_eq_v_layers(text_config: Any) -> set[int]:
    """Indices of the layers whose values come from k_proj (as vLLM's Gemma 4 weight mapper)."""
    if not getattr(text_config, "attention_k_eq_v", False):
        return set()
    layer_types = list(getattr(text_config, "layer_types", None) or [])
    first_shared = len(layer_types) - int(getattr(text_config, "num_kv_shared_layers", 0) or 0)
    return {i for i, kind in enumerate(layer_types[:first_shared]) if kind == "full_attention"}


def _text_config(model: Any) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        return None
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def mirror_k_lora_into_v(manager: Any, lora_model: Any) -> int:
    """Give each k_eq_v layer's missing v_proj LoRA a copy of its k_proj LoRA; return the count.

    `manager` is vLLM's `LoRAModelManager` (its `packed_modules` maps each packed module name
    to its parts), `lora_model` the adapter before packing.
    """
    layers = k_eq_v_layers(_text_config(manager.model))
    if not layers:
        return 0
    mirrored = 0
    for packed_name, parts in manager.packed_modules.items():
        match = _QKV.search(packed_name)
        if match is None or int(match.group(1)) not in layers or len(parts) != 3:
            continue
        _, k_name, v_name = parts
        k_lora = lora_model.get_lora(k_name)
        if k_lora is None or lora_model.get_lora(v_name) is not None:
            continue
        v_lora = copy.copy(k_lora)
        v_lora.module_name = v_name
        # Own tensors: vLLM scales lora_b in place (`optimize`), which must not happen twice.
        v_lora.lora_a = k_lora.lora_a.clone()
        v_lora.lora_b = k_lora.lora_b.clone()
        lora_model.loras[v_name] = v_lora
        mirrored += 1
    return mirrored


def apply() -> bool:
    """Wrap `LoRAModelManager._add_adapter` on vLLM 0.32 (packing happens inside it)."""
    if not is_target_vllm():
        return False
    from vllm.lora.model_manager import LoRAModelManager

    current = LoRAModelManager._add_adapter
    if getattr(current, _FIX_MARK, False):
        return True
    if "_create_merged_loras_inplace" not in inspect.getsource(current):
        logger.warning("vLLM's _add_adapter changed; the lora_k_eq_v fix is not applied")
        return False

    def add_adapter(self: Any, lora: Any) -> Any:
        count = mirror_k_lora_into_v(self, lora)
        if count:
            logger.debug(
                "adapter %s: k_proj LoRA mirrored to V in %d k_eq_v layers", lora.id, count
            )
        return current(self, lora)

    setattr(add_adapter, _FIX_MARK, True)
    LoRAModelManager._add_adapter = add_adapter  # type: ignore[method-assign]
    return True
