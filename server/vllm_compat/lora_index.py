"""Fix: base-model tokens get the last LoRA slot on vLLM 0.32's CPU LoRA path.

On CPU, `PunicaWrapperCPU` runs the torch SGMV/BGMV ops of
`vllm.lora.ops.torch_ops.lora_ops`. They gather the stacked adapter weights with the per-token
LoRA index, where -1 means "no LoRA"; `weights[-1]` is the last slot, so once every slot is
occupied a base-model request batched with LoRA requests silently gets that adapter.
The replacements below are the originals with one change: they gather with clamped indices and
zero the rows whose index is negative, as the GPU kernels skip them.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from types import ModuleType

import torch

from server.vllm_compat import disabled_fixes
from server.vllm_compat.vllm_version import is_target_vllm

logger = logging.getLogger(__name__)

_OPS_MODULE = "vllm.lora.ops.torch_ops.lora_ops"
# Both import the ops by name, so each holds its own binding that must be replaced too.
_BINDING_MODULES = ("vllm.lora.ops.torch_ops", "vllm.lora.punica_wrapper.punica_cpu")
_CPU_PUNICA_WRAPPER = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"
# `GEMMA_SERVER_DISABLE_FIXES=lora_grouped` keeps vLLM's per-token products (same results up to
# float rounding; the grouped ones are faster: one product per adapter, no per-token copies).
GROUPED = "lora_grouped" not in disabled_fixes()


def _lora_outputs(
    inputs: torch.Tensor,
    lora_weights: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Per-token `inputs @ weights[index].T`, zero for tokens whose index is -1."""
    if GROUPED:
        return _grouped_lora_outputs(inputs, lora_weights, lora_indices_tensor, dtype)
    selected_loras = lora_weights[lora_indices_tensor.clamp_min(0)].to(dtype=dtype)
    if len(selected_loras.shape) == 4:
        selected_loras = selected_loras.squeeze(dim=1)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=dtype), selected_loras)
    # masked_fill, not a multiply: a non-finite product in a no-LoRA row must not leak as NaN.
    return outputs.masked_fill((lora_indices_tensor < 0).unsqueeze(-1), 0)


def _grouped_lora_outputs(
    inputs: torch.Tensor,
    lora_weights: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The same product, one matrix product per adapter over that adapter's tokens.

    vLLM's op gathers a copy of an adapter's weights for every token ([tokens, out, rank]) and
    multiplies token by token; on a LoRA mix that was most of the worker's time (BENCHMARKS.md,
    "Where LoRA batches lose time"). Rows of index -1 are never computed: they stay zero.
    """
    weights = lora_weights.squeeze(dim=1) if lora_weights.dim() == 4 else lora_weights
    x = inputs.to(dtype=dtype)
    outputs = x.new_zeros((x.shape[0], weights.shape[-2]))
    for index in torch.unique(lora_indices_tensor).tolist():
        if index < 0:
            continue
        rows = (lora_indices_tensor == index).nonzero().squeeze(1)
        outputs[rows] = x[rows] @ weights[index].to(dtype=dtype).T
    return outputs


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    """vLLM's `bgmv_expand`, with no contribution for tokens whose LoRA index is -1."""
    outputs = _lora_outputs(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)

    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1

    # LoRA adapter and model may add different amounts of padding to the output.
    common_len = min(outputs.shape[1], output_tensor.shape[1])

    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    """vLLM's `bgmv_shrink`, with zero output for tokens whose LoRA index is -1."""
    outputs = _lora_outputs(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    """vLLM's `bgmv_expand_slice`, with no contribution for tokens whose LoRA index is -1."""
    outputs = _lora_outputs(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs[:]


def sgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    add_inputs: bool = False,
) -> None:
    """vLLM's `sgmv_expand` (per-sequence indices), fixed through `bgmv_expand`."""
    exploded_indices = torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)
    bgmv_expand(inputs, lora_b_weights, output_tensor, exploded_indices, add_inputs)


def sgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    scaling: float,
) -> None:
    """vLLM's `sgmv_shrink` (per-sequence indices), fixed through `bgmv_shrink`."""
    exploded_indices = torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)
    bgmv_shrink(inputs, lora_a_weights, output_tensor, exploded_indices, scaling)


def sgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = False,
) -> None:
    """vLLM's `sgmv_expand_slice` (per-sequence indices), fixed through `bgmv_expand_slice`."""
    exploded_indices = torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)
    bgmv_expand_slice(
        inputs,
        lora_b_weights,
        output_tensor,
        exploded_indices,
        slice_offset,
        slice_size,
        add_inputs,
    )


REPLACEMENTS: dict[str, Callable[..., None]] = {
    "bgmv_expand": bgmv_expand,
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand_slice": bgmv_expand_slice,
    "sgmv_expand": sgmv_expand,
    "sgmv_shrink": sgmv_shrink,
    "sgmv_expand_slice": sgmv_expand_slice,
}


def _uses_torch_lora_ops() -> bool:
    """True when this platform's LoRA wrapper is the one that runs the torch ops."""
    from vllm.platforms import current_platform

    try:
        return bool(current_platform.get_punica_wrapper() == _CPU_PUNICA_WRAPPER)
    except NotImplementedError:  # platforms without LoRA support
        return False


def _last_slot_for_no_lora(ops: ModuleType) -> bool:
    """True when all three BGMV ops of `ops` apply the last slot to index -1 (the known bug)."""
    weights = torch.zeros(2, 1, 1, 1)
    weights[-1] = 1.0
    inputs = torch.ones(1, 1)
    no_lora = torch.tensor([-1])
    outputs = [torch.zeros(1, 1) for _ in range(3)]
    try:
        ops.bgmv_shrink(inputs, weights, outputs[0], no_lora, 1.0)
        ops.bgmv_expand(inputs, weights, outputs[1], no_lora, True)
        ops.bgmv_expand_slice(inputs, weights, outputs[2], no_lora, 0, 1, True)
    except Exception:  # ops of another signature: not the ones this fix replaces
        logger.warning("vLLM's torch LoRA ops changed signature; lora_index fix not applied")
        return False
    leaked = [bool(out.abs().sum() > 0) for out in outputs]
    if any(leaked) and not all(leaked):
        logger.warning("vLLM's torch LoRA ops changed shape; lora_index fix not applied")
    return all(leaked)


def apply() -> bool:
    """Replace the torch LoRA ops where vLLM 0.32's CPU LoRA path looks them up.

    Returns True when the fix is in place (also on a repeated call), False when this vLLM,
    platform or op implementation is not the one the fix targets.
    """
    if not is_target_vllm() or not _uses_torch_lora_ops():
        return False
    ops = importlib.import_module(_OPS_MODULE)
    bindings = [importlib.import_module(name) for name in _BINDING_MODULES]
    modules = [ops, *bindings]
    if all(getattr(m, n, None) is f for m in modules for n, f in REPLACEMENTS.items()):
        return True
    originals = {name: getattr(ops, name) for name in REPLACEMENTS}
    # Patch only bindings we know, all or nothing: another patcher's function is left alone.
    for module in bindings:
        for name, original in originals.items():
            if getattr(module, name, None) is not original:
                logger.warning("%s.%s is not vLLM's op; lora_index fix not applied", module, name)
                return False
    if not _last_slot_for_no_lora(ops):
        return False
    for module in modules:
        for name, replacement in REPLACEMENTS.items():
            setattr(module, name, replacement)
    return True
