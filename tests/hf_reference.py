"""The reference side of correctness tests: greedy generation with transformers + PEFT.

vLLM's output is compared with what `Gemma4ForConditionalGeneration` (and `PeftModel` for an
adapter) produce for the same prompt text, images and audio, on CPU, in the dtype the engine
under test runs in (float32, or bfloat16 as vLLM serves with `--dtype auto` on CPU).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

TOP_LOGPROBS = 5


@dataclass(frozen=True)
class ReferenceOutput:
    """Greedy tokens and, for each generated token, its step's log-probs over the vocabulary."""

    token_ids: list[int]
    step_logprobs: list[np.ndarray]  # one float32 row of vocabulary size per generated token

    @property
    def first_logprobs(self) -> dict[int, float]:
        """The top `TOP_LOGPROBS` log-probs of the first step (token id -> log-prob)."""
        row = self.step_logprobs[0]
        return {int(i): float(row[i]) for i in np.argsort(-row, kind="stable")[:TOP_LOGPROBS]}


@functools.lru_cache(maxsize=8)
def _load(model_dir: str, adapter_dir: str | None, dtype: str) -> tuple[Any, Any]:
    """(model, processor) for one base model, optional adapter and dtype, loaded once."""
    from transformers import AutoProcessor, Gemma4ForConditionalGeneration

    from server.vllm_compat import gemma4_processor

    gemma4_processor.apply()  # transformers' Gemma 4 processor needs it without torchvision
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    model: Any = Gemma4ForConditionalGeneration.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), local_files_only=True
    )
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    return model.eval(), processor


def hf_greedy(
    model_dir: str | Path,
    adapter_dir: str | Path | None,
    prompt: str,
    *,
    images: Sequence[Image.Image] | None = None,
    audios: Sequence[np.ndarray] | None = None,
    max_tokens: int,
    causal_images: bool = False,
    dtype: str = "float32",
) -> ReferenceOutput:
    """Greedy-decode `prompt` (already rendered by the chat template) with transformers.

    `images` are PIL images and `audios` 16 kHz mono float32 arrays, one per placeholder in
    the prompt, in order. Generation stops after `max_tokens` or at an end-of-sequence token of
    the model's generation config (kept, as vLLM keeps it). `step_logprobs` are the
    `log_softmax` of each step's final (soft-capped) logits, computed in float32 from logits of
    `dtype` (the model's dtype: `float32` or `bfloat16`). `causal_images=True` drops
    `mm_token_type_ids`, so models with `use_bidirectional_attention="vision"` (31B, 26B-A4B)
    attend causally within images too.
    """
    model, processor = _load(
        str(Path(model_dir).resolve()),
        str(Path(adapter_dir).resolve()) if adapter_dir is not None else None,
        dtype,
    )
    inputs = processor(
        text=[prompt],
        images=[list(images)] if images else None,
        audio=list(audios) if audios else None,
        return_tensors="pt",
    )
    if causal_images:
        inputs.pop("mm_token_type_ids", None)
    prompt_length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    token_ids = out.sequences[0, prompt_length:].tolist()
    stop_ids = _stop_ids(model)
    for position, token_id in enumerate(token_ids):
        if token_id in stop_ids:
            token_ids = token_ids[: position + 1]  # drop the padding generate adds after a stop
            break
    steps = [
        torch.log_softmax(logits[0].float(), dim=-1).numpy()
        for logits in out.logits[: len(token_ids)]
    ]
    return ReferenceOutput(token_ids=token_ids, step_logprobs=steps)


def _stop_ids(model: Any) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)
