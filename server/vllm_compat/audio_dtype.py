"""Fix: "expected scalar type Float but found BFloat16" from the Gemma 4 audio tower.

vLLM 0.32 builds the audio tower with transformers' `AutoModel.from_config(audio_config)`,
which creates it in the checkpoint's dtype (`audio_config.dtype`), not in the dtype the
model is served in. vLLM then swaps the tower's linears for `ReplicatedLinear`, built in the
served dtype. Served in another dtype than the checkpoint's (`--dtype auto` runs a float32
checkpoint in bfloat16 on CPU; `--dtype float32` a bfloat16 one), the tower's own convolutions
and norms keep the checkpoint's dtype: the subsampling convolution casts activations to it,
and the first linear that meets them (`output_proj` through oneDNN) raises, which kills the
worker and the engine. The fix builds the tower in the served dtype, as transformers does
when a model is loaded with `dtype=`, so every tower weight has the same dtype.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch

from server.vllm_compat.vllm_version import is_target_vllm

logger = logging.getLogger(__name__)

_MODEL_MODULE = "vllm.model_executor.models.gemma4_mm"
_FIX_MARK = "_gemma_server_audio_tower_dtype"

Init = Callable[..., None]


def _as_dtype(value: object) -> torch.dtype | None:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        found = getattr(torch, value, None)
        return found if isinstance(found, torch.dtype) else None
    return None


def audio_tower_in_served_dtype(init: Init) -> Init:
    """Wrap the model's `__init__` so its audio tower is created in the served dtype."""

    @functools.wraps(init)
    def init_with_served_audio_dtype(self: Any, *, vllm_config: Any, prefix: str = "") -> None:
        model_config = vllm_config.model_config
        audio_config = getattr(model_config.hf_config, "audio_config", None)
        served = _as_dtype(model_config.dtype)
        if audio_config is None or served is None or _as_dtype(audio_config.dtype) == served:
            init(self, vllm_config=vllm_config, prefix=prefix)
            return
        checkpoint_dtype = audio_config.dtype
        audio_config.dtype = served  # read by AutoModel.from_config while the tower is built
        try:
            init(self, vllm_config=vllm_config, prefix=prefix)
        finally:
            audio_config.dtype = checkpoint_dtype

    setattr(init_with_served_audio_dtype, _FIX_MARK, True)
    return init_with_served_audio_dtype


def apply() -> bool:
    """Build vLLM 0.32's Gemma 4 audio tower in the served dtype.

    Returns True when the fix is in place (also on a repeated call), False when this vLLM or
    its Gemma 4 model is not the one the fix targets.
    """
    if not is_target_vllm():
        return False
    import importlib

    model_class = importlib.import_module(_MODEL_MODULE).Gemma4ForConditionalGeneration
    current = model_class.__init__
    if getattr(current, _FIX_MARK, False):
        return True
    if "AutoModel.from_config(config=config.audio_config)" not in inspect.getsource(current):
        logger.warning("vLLM's Gemma 4 audio tower construction changed; audio_dtype not applied")
        return False
    model_class.__init__ = audio_tower_in_served_dtype(current)
    return True
