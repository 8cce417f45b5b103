"""The real vLLM engine on the tiny Gemma 4 against transformers + PEFT, token for token."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass

import pytest
from transformers import AutoProcessor

from server.engine.protocol import AdapterRef, Prompt, Sampling
from server.engine.vllm_engine import VllmEngine
from server.testbed.default_model import DefaultModel
from server.testbed.demo_adapters import DEMO_ADAPTERS
from tests.conftest import engine_settings
from tests.hf_reference import hf_greedy
from tests.media import seeded_audio, seeded_image

MAX_TOKENS = 12
LOGPROB_TOLERANCE = 1e-4
TOP_LOGPROBS = 5
_request_ids = itertools.count()
RANDOM_ADAPTERS = {spec.name for spec in DEMO_ADAPTERS}

LONG_TEXT = " ".join(
    f"Line {i}: the quick brown fox jumps over the lazy dog near the river bank." for i in range(24)
)
CASES = {
    "short-text": [{"type": "text", "text": "Tell me a story about a cat."}],
    "long-text": [{"type": "text", "text": LONG_TEXT}],  # longer than the sliding window (64)
    "image": [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}],
    "audio": [{"type": "audio"}, {"type": "text", "text": "What do you hear?"}],
}


@dataclass(frozen=True)
class Output:
    token_ids: list[int]
    first_logprobs: dict[int, float]


def render(tiny: DefaultModel, case: str) -> Prompt:
    """The chat prompt of one case, rendered with the model's own chat template."""
    processor = AutoProcessor.from_pretrained(tiny.model_dir)
    messages = [{"role": "user", "content": CASES[case]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images = [seeded_image()] if case == "image" else []
    audios = [seeded_audio()] if case == "audio" else []
    return Prompt(text=text, images=images, audios=audios)


async def run(engine: VllmEngine, prompt: Prompt, adapter: AdapterRef | None) -> Output:
    """Greedy generation through the bridge, with the first step's top log-probs."""
    sampling = Sampling(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=TOP_LOGPROBS)
    tokens: list[int] = []
    first: dict[int, float] = {}
    async for chunk in engine.generate(f"test-{next(_request_ids)}", prompt, sampling, adapter):
        (completion,) = chunk.completions
        tokens.extend(completion.token_ids)
        if not first and completion.logprobs:
            first = {tid: lp for tid, _, lp in completion.logprobs[0].top}
    return Output(tokens, first)


def adapter_refs(tiny: DefaultModel) -> dict[str, AdapterRef]:
    return {
        name: AdapterRef(name=name, int_id=i, path=str(path))
        for i, (name, path) in enumerate(tiny.adapter_dirs().items(), start=1)
    }


def reference(tiny: DefaultModel, prompt: Prompt, adapter: AdapterRef | None) -> Output:
    ref = hf_greedy(
        tiny.model_dir,
        adapter.path if adapter else None,
        prompt.text,
        images=prompt.images or None,
        audios=prompt.audios or None,
        max_tokens=MAX_TOKENS,
    )
    return Output(list(ref.token_ids), dict(ref.first_logprobs))


# Largest first-step log-prob difference seen against the reference; printed after the run.
REFERENCE_DIFFERENCES: list[float] = []


def assert_logprobs_close(got: dict[int, float], want: dict[int, float]) -> float:
    top = sorted(want, key=want.__getitem__, reverse=True)[:TOP_LOGPROBS]
    assert set(top) <= set(got), f"top tokens differ: {top} vs {sorted(got)}"
    worst = max(abs(got[t] - want[t]) for t in top)
    assert worst <= LOGPROB_TOLERANCE, f"first-step log-prob difference {worst:.2e}"
    return worst


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("adapter_name", ["base", "demo-attn", "demo-mlp", "demo-all"])
async def test_engine_matches_transformers_peft(
    engine: VllmEngine, tiny: DefaultModel, case: str, adapter_name: str
) -> None:
    adapter = adapter_refs(tiny).get(adapter_name)
    assert adapter_name == "base" or adapter is not None, f"no demo adapter {adapter_name}"
    prompt = render(tiny, case)
    got = await run(engine, prompt, adapter)
    want = reference(tiny, prompt, adapter)
    assert len(got.token_ids) == MAX_TOKENS
    assert got.token_ids == want.token_ids
    REFERENCE_DIFFERENCES.append(assert_logprobs_close(got.first_logprobs, want.first_logprobs))


@pytest.mark.parametrize("case", ["short-text", "image"])
async def test_every_adapter_changes_the_output(
    engine: VllmEngine, tiny: DefaultModel, case: str
) -> None:
    prompt = render(tiny, case)
    base = await run(engine, prompt, None)
    refs = adapter_refs(tiny)
    assert len(refs) >= 3
    for name, adapter in refs.items():
        tuned = await run(engine, prompt, adapter)
        assert tuned.token_ids != base.token_ids, f"{name} does not change the output"


async def batch_with_full_slots(engine: VllmEngine, tiny: DefaultModel) -> tuple[Output, Output]:
    """(base alone, base batched with one request per LoRA slot, all slots occupied)."""
    prompt = render(tiny, "short-text")
    refs = [ref for name, ref in adapter_refs(tiny).items() if name in RANDOM_ADAPTERS]
    assert len(refs) == engine_settings().max_loras, "every slot must be occupied"
    alone = await run(engine, prompt, None)
    *_, batched = await asyncio.gather(
        *(run(engine, prompt, adapter) for adapter in refs), run(engine, prompt, None)
    )
    return alone, batched


async def test_base_request_batched_with_full_lora_slots(
    engine: VllmEngine, tiny: DefaultModel
) -> None:
    alone, batched = await batch_with_full_slots(engine, tiny)
    assert batched.token_ids == alone.token_ids
    assert_logprobs_close(batched.first_logprobs, alone.first_logprobs)


async def test_full_lora_slots_corrupt_base_requests_without_the_fix(
    tiny: DefaultModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bug the plugin fixes is real in this vLLM: without the fix the check above fails."""
    monkeypatch.setenv("GEMMA_SERVER_DISABLE_FIXES", "lora_index")  # inherited by vLLM's processes
    unfixed = await VllmEngine.start(engine_settings(), str(tiny.model_dir), "tiny-gemma4")
    try:
        alone, batched = await batch_with_full_slots(unfixed, tiny)
    finally:
        await unfixed.shutdown()
    assert batched.first_logprobs != pytest.approx(alone.first_logprobs, abs=LOGPROB_TOLERANCE)
