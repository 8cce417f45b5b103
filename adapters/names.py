"""Adapter tensor names as vLLM 0.32 reads them for Gemma 4, mapped back to checkpoint names.

vLLM strips `base_model.model.` from a LoRA tensor name, then applies
`Gemma4ForConditionalGeneration.hf_to_vllm_mapper` (its prefix rules, in order, each applied to
the result of the one before). A name that lands on a module of vLLM's model is served; any
other is loaded and silently never applied. `checkpoint_module` replays that mapping and turns
a served name back into the checkpoint's own module name (`model.language_model.layers.0...`),
so validation checks every spelling vLLM serves against the checkpoint's real shapes. The
replay is tested against vLLM's own mapper (tests/test_adapter_validation.py).
"""

from __future__ import annotations

PEFT_PREFIX = "base_model.model."

# Gemma4ForConditionalGeneration.hf_to_vllm_mapper.orig_to_new_prefix in vLLM 0.32, in order.
_HF_TO_VLLM_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.vision_tower", "vision_tower"),
    ("model.embed_vision", "embed_vision"),
    ("model.audio_tower.", "audio_tower."),
    ("model.embed_audio.", "embed_audio."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model", "language_model.model"),
)
# vLLM module prefix -> checkpoint module prefix: the inverse for the names vLLM's model has.
_VLLM_TO_CHECKPOINT_PREFIXES: tuple[tuple[str, str], ...] = (
    ("language_model.model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("embed_vision.", "model.embed_vision."),
    ("audio_tower.", "model.audio_tower."),
    ("embed_audio.", "model.embed_audio."),
)
_VLLM_LM_HEAD = "language_model.lm_head"


def vllm_module_name(module: str) -> str:
    """The module name vLLM gives an adapter's module name (with or without `base_model.model.`)."""
    # vLLM maps whole tensor names (`<module>.lora_A.weight`); the dot stands for the tail.
    key = module.removeprefix(PEFT_PREFIX) + "."
    for prefix, replacement in _HF_TO_VLLM_PREFIXES:
        if key.startswith(prefix):
            key = replacement + key[len(prefix) :]
    return key.removesuffix(".")


def checkpoint_module(module: str) -> str | None:
    """The checkpoint module an adapter's module name reaches in vLLM; None if it reaches none.

    `model.language_model.layers.0.mlp.up_proj`, `language_model.model.layers.0.mlp.up_proj`
    and `model.layers.0.mlp.up_proj` all give the first; `language_model.layers.0.mlp.up_proj`
    (PEFT on `Gemma4Model`) gives None, as vLLM never applies it.
    """
    served = vllm_module_name(module)
    if served == _VLLM_LM_HEAD:
        return "lm_head"
    for prefix, replacement in _VLLM_TO_CHECKPOINT_PREFIXES:
        if served.startswith(prefix):
            return replacement + served[len(prefix) :]
    return None
