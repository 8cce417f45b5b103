"""Fix: on CPU, the first request with log-probs compiles C++ (tens of seconds) or kills the engine.

vLLM 0.32's sampler ranks each sampled token with `batched_count_greater_than`
(`vllm.v1.sample.ops.logprobs`), wrapped in `torch.compile`; on CPU, inductor builds C++ at the
first call. Slim runtime images, the service's CPU image among them, have no g++: the first
request asking for log-probs (and the post-load effect probe) raised `InvalidCxxCompiler` in the
worker and took the engine down. Where g++ exists, that first call compiled for 20-53 s on a busy
2-core host (measured: the first effect probe after a start, i.e. the first hot load, waited for
it). Applied on the CPU platform: the sampler gets the same count, uncompiled.
"""

from __future__ import annotations

import importlib
import logging

import torch

from server.vllm_compat.vllm_version import is_target_vllm

logger = logging.getLogger(__name__)

_SAMPLER_MODULE = "vllm.v1.sample.sampler"
_NAME = "batched_count_greater_than"


def count_greater_or_equal(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per row of `x`, how many elements are >= that row's value (vLLM's function, eagerly)."""
    return (x >= values).sum(-1)


def apply() -> bool:
    """Give vLLM's sampler an uncompiled token-rank count on CPU."""
    if not is_target_vllm():
        return False
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    sampler = importlib.import_module(_SAMPLER_MODULE)
    if not hasattr(sampler, _NAME):
        return False
    # The sampler calls the name through its module globals at each step.
    setattr(sampler, _NAME, count_greater_or_equal)
    return True
