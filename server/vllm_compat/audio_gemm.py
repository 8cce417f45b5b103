"""Fix: "Expected a.stride(-1) == 1" from the Gemma 4 audio tower on vLLM 0.32's CPU build.

vLLM swaps the audio tower's linears for `ReplicatedLinear`, whose CPU GEMM
(`cpu_unquantized_gemm` in `vllm.model_executor.layers.utils`, picked by
`dispatch_unquantized_gemm` when a linear method is built) hands the input to oneDNN or
sgl kernels that need a row-contiguous input; `Gemma4AudioLightConv1d.linear_end` feeds a
transposed one. The fix wraps that GEMM so such an input is made contiguous first, a no-op
for the contiguous inputs every other layer passes.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable

import torch

from server.vllm_compat.vllm_version import is_target_vllm

logger = logging.getLogger(__name__)

_UTILS_MODULE = "vllm.model_executor.layers.utils"
_GEMM_NAME = "cpu_unquantized_gemm"
_FIX_MARK = "_gemma_server_row_contiguous"

Gemm = Callable[..., torch.Tensor]


def row_contiguous(gemm: Gemm) -> Gemm:
    """Wrap a `(layer, x, weight, bias)` GEMM so `x` reaches it with a last stride of 1."""

    @functools.wraps(gemm)
    def gemm_with_row_contiguous_input(
        layer: torch.nn.Module,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if x.stride(-1) != 1:
            x = x.contiguous()
        return gemm(layer, x, weight, bias)

    setattr(gemm_with_row_contiguous_input, _FIX_MARK, True)
    return gemm_with_row_contiguous_input


def _passes_strided_input(gemm: Gemm) -> bool:
    """True when `gemm` hands a transposed input on unchanged (the known bug)."""
    seen: list[torch.Tensor] = []

    def record(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        seen.append(x)
        return x

    probe = torch.nn.Module()
    # vLLM 0.32 calls the per-layer kernel chosen at load time through `layer.cpu_linear`.
    setattr(probe, "cpu_linear", record)  # noqa: B010
    try:
        gemm(probe, torch.zeros(2, 3).t(), torch.zeros(2, 2), None)
    except Exception:  # a GEMM of another shape: not the one this fix knows
        logger.warning("vLLM's CPU GEMM changed shape; audio_gemm fix not applied")
        return False
    return bool(seen) and seen[0].stride(-1) != 1


def apply() -> bool:
    """Make vLLM 0.32's CPU unquantized GEMM accept inputs whose last stride is not 1.

    Returns True when the fix is in place (also on a repeated call), False when this vLLM,
    platform or GEMM is not the one the fix targets.
    """
    if not is_target_vllm():
        return False
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    utils = importlib.import_module(_UTILS_MODULE)
    gemm = getattr(utils, _GEMM_NAME, None)
    if gemm is None:
        return False
    if getattr(gemm, _FIX_MARK, False):
        return True
    if not _passes_strided_input(gemm):
        return False
    # dispatch_unquantized_gemm reads this module global each time a linear method is built.
    setattr(utils, _GEMM_NAME, row_contiguous(gemm))
    return True
