"""Unit test of the `lora_k_eq_v` fix's rewrite (no engine; the engine-level proof is in
`tests/test_gemma_shapes.py`, whose 31B- and 26B-A4B-style attention adapters fail without it)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from vllm.lora.lora_model import LoRAModel
from vllm.lora.lora_weights import LoRALayerWeights

from server.vllm_compat.lora_k_eq_v import k_eq_v_layers, mirror_k_lora_into_v

LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def _name(layer: int, part: str) -> str:
    return f"language_model.model.layers.{layer}.self_attn.{part}"


def _manager(k_eq_v: bool, kv_shared: int = 0) -> SimpleNamespace:
    config = SimpleNamespace(
        attention_k_eq_v=k_eq_v, layer_types=LAYER_TYPES, num_kv_shared_layers=kv_shared
    )
    packed = {
        _name(i, "qkv_proj"): [_name(i, f"{p}_proj") for p in "qkv"]
        for i in range(len(LAYER_TYPES) - kv_shared)
    }
    return SimpleNamespace(model=SimpleNamespace(config=config), packed_modules=packed)


def _adapter() -> LoRAModel:
    generator = torch.Generator().manual_seed(0)
    loras = {}
    for layer, kind in enumerate(LAYER_TYPES):
        parts = ("q", "k") if kind == "full_attention" else ("q", "k", "v")
        for part in parts:
            name = _name(layer, f"{part}_proj")
            loras[name] = LoRALayerWeights(
                name,
                4,
                8,
                torch.randn(4, 16, generator=generator),
                torch.randn(8, 4, generator=generator),
            )
    return LoRAModel(1, 4, loras)


def test_k_eq_v_layers_are_the_own_kv_full_attention_layers() -> None:
    assert k_eq_v_layers(_manager(True).model.config) == {1, 3}
    assert k_eq_v_layers(_manager(True, kv_shared=1).model.config) == {1}
    assert k_eq_v_layers(_manager(False).model.config) == set()


def test_k_lora_is_copied_to_v_only_where_values_come_from_k() -> None:
    adapter = _adapter()
    sliding_v = adapter.get_lora(_name(0, "v_proj"))
    assert mirror_k_lora_into_v(_manager(True), adapter) == 2
    for layer in (1, 3):
        k, v = adapter.get_lora(_name(layer, "k_proj")), adapter.get_lora(_name(layer, "v_proj"))
        assert k is not None and v is not None and v.module_name == _name(layer, "v_proj")
        assert torch.equal(v.lora_a, k.lora_a) and torch.equal(v.lora_b, k.lora_b)
        assert v.lora_b.data_ptr() != k.lora_b.data_ptr()  # vLLM scales lora_b in place
        assert v.scaling == k.scaling == 2.0
    assert adapter.get_lora(_name(0, "v_proj")) is sliding_v  # a real v_proj LoRA is kept


def test_nothing_changes_without_k_eq_v() -> None:
    adapter = _adapter()
    before = dict(adapter.loras)
    assert mirror_k_lora_into_v(_manager(False), adapter) == 0
    assert adapter.loras == before
