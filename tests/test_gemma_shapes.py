"""Every Gemma 4 family, tiny: vLLM against transformers + PEFT, token for token, per adapter kind.

One engine per shape (E2B/E4B style, 31B-style dense, 26B-A4B-style MoE), adapters added at run
time: attention only, MLP only, and every language-model Linear (with the per-layer projections
and the router where the shape has them). Float32, greedy, short prompts and one longer than the
sliding window.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import torch
from transformers import AutoProcessor, Gemma4ForConditionalGeneration

from server.engine.protocol import AdapterRef, Prompt
from server.engine.vllm_engine import VllmEngine
from server.testbed.demo_adapters import SHAPE_ADAPTERS, load_base_model, write_demo_adapter
from server.testbed.tiny_model import SHAPES, build_tiny_model, main
from server.vllm_compat import gemma4_processor
from tests.conftest import engine_settings
from tests.hf_reference import ReferenceOutput, hf_greedy
from tests.media import seeded_audio, seeded_image
from tests.test_engine_correctness import (
    CASES,
    LOGPROB_TOLERANCE,
    MAX_TOKENS,
    Output,
    mismatch,
    run,
)

SHAPES_UNDER_TEST = ("e4b", "dense", "moe")
LM_ADAPTERS = tuple(spec for spec in SHAPE_ADAPTERS if spec.name.startswith("lm-"))
TEXT_CASES = ("short-text", "long-text")

# (shape, adapter, case) -> first-step top-5 log-prob difference; printed after the run.
SHAPE_DIFFERENCES: dict[tuple[str, str, str], float] = {}


@dataclass(frozen=True)
class ShapeBed:
    """One tiny model of a shape and its adapters, written by PEFT."""

    shape: str
    model_dir: Path
    adapters: dict[str, AdapterRef]


def build_bed(root: Path, shape: str, adapter_names: tuple[str, ...]) -> ShapeBed:
    """Build the tiny model of `shape` under `root` and the named `SHAPE_ADAPTERS` for it."""
    model_dir = build_tiny_model(root / "model", shape=shape)
    base = load_base_model(model_dir)
    specs = [spec for spec in SHAPE_ADAPTERS if spec.name in adapter_names]
    adapters = {
        spec.name: AdapterRef(
            name=spec.name,
            int_id=i,
            path=str(write_demo_adapter(model_dir, root / spec.name, spec, base=base)),
        )
        for i, spec in enumerate(specs, start=1)
    }
    return ShapeBed(shape, model_dir, adapters)


def render(model_dir: Path, case: str) -> Prompt:
    """The chat prompt of one case of `CASES`, rendered with the model's chat template."""
    gemma4_processor.apply()
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    messages = [{"role": "user", "content": CASES[case]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images = [seeded_image()] if case == "image" else []
    audios = [seeded_audio()] if case == "audio" else []
    return Prompt(text=text, images=images, audios=audios)


def reference(
    model_dir: Path, prompt: Prompt, adapter: AdapterRef | None, *, causal_images: bool = False
) -> ReferenceOutput:
    """transformers + PEFT greedy output for the prompt (see `hf_greedy` for `causal_images`)."""
    return hf_greedy(
        model_dir,
        adapter.path if adapter else None,
        prompt.text,
        images=prompt.images or None,
        audios=prompt.audios or None,
        max_tokens=MAX_TOKENS,
        causal_images=causal_images,
    )


def logprob_difference(got: Output | ReferenceOutput, want: Output | ReferenceOutput) -> float:
    """Largest first-step log-prob difference over the reference's top tokens (inf if missing)."""
    return max(
        abs(got.first_logprobs.get(token, float("inf")) - logprob)
        for token, logprob in want.first_logprobs.items()
    )


@pytest.fixture(scope="module", params=SHAPES_UNDER_TEST)
def bed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ShapeBed:
    shape: str = request.param
    names = tuple(spec.name for spec in LM_ADAPTERS)
    return build_bed(tmp_path_factory.mktemp(f"shape-{shape}"), shape, names)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def shape_engine(bed: ShapeBed) -> AsyncIterator[VllmEngine]:
    """The real vLLM engine on one shape (one start per shape)."""
    started = await VllmEngine.start(engine_settings(), str(bed.model_dir), bed.shape)
    yield started
    await started.shutdown()


def test_shapes_mirror_their_families(bed: ShapeBed) -> None:
    """The checkpoint has the structure of its family, and transformers runs it."""
    model: Any = Gemma4ForConditionalGeneration.from_pretrained(
        bed.model_dir, local_files_only=True
    )
    text = model.config.text_config
    names = {name for name, _ in model.named_modules()}
    spec = SHAPES[bed.shape]
    has = {
        "per_layer": any(n.endswith("per_layer_model_projection") for n in names),
        "router": any(n.endswith("router.proj") for n in names),
        "kv_shared": text.num_kv_shared_layers > 0,
        "k_eq_v": bool(text.attention_k_eq_v),
        "audio": model.config.audio_config is not None,
    }
    assert has == {
        "per_layer": spec.per_layer_input,
        "router": spec.moe,
        "kv_shared": spec.kv_shared_layers > 0,
        "k_eq_v": spec.attention_k_eq_v,
        "audio": spec.audio,
    }
    assert text.layer_types[-1] == "full_attention"
    assert text.final_logit_softcapping == 30.0
    if spec.attention_k_eq_v:  # full-attention layers have k_proj and no v_proj
        full = text.layer_types.index("full_attention")
        attention = model.model.language_model.layers[full].self_attn
        assert attention.v_proj is None and attention.k_proj is not None
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[2, 100, 200, 300]])).logits
    assert logits.shape == (1, 4, 4096) and torch.isfinite(logits).all()


@pytest.mark.parametrize("shape", SHAPES_UNDER_TEST)
def test_same_seed_builds_the_same_bytes(shape: str, tmp_path: Path) -> None:
    first = build_tiny_model(tmp_path / "a", shape=shape, seed=5)
    main([str(tmp_path / "b"), "--shape", shape, "--seed", "5"])
    files = sorted(p.name for p in first.iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        assert (first / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    config = json.loads((first / "config.json").read_text())
    assert config["text_config"]["hidden_size_per_layer_input"] == (
        16 if SHAPES[shape].per_layer_input else 0
    )


@pytest.mark.parametrize("case", [*TEXT_CASES, "image"])
@pytest.mark.parametrize("adapter_name", ["base", *(spec.name for spec in LM_ADAPTERS)])
async def test_shape_matches_transformers_peft(
    shape_engine: VllmEngine, bed: ShapeBed, adapter_name: str, case: str
) -> None:
    adapter = bed.adapters.get(adapter_name)
    prompt = render(bed.model_dir, case)
    got = await run(shape_engine, prompt, adapter)
    # vLLM's CPU attention has no bidirectional image attention: compare like with like (the
    # gap itself is measured in test_cpu_engine_attends_causally_within_images).
    want = reference(bed.model_dir, prompt, adapter, causal_images=case == "image")
    SHAPE_DIFFERENCES[(bed.shape, adapter_name, case)] = logprob_difference(got, want)
    assert mismatch("float32", got, want, record=True) is None


async def test_cpu_engine_attends_causally_within_images(
    shape_engine: VllmEngine, bed: ShapeBed
) -> None:
    """31B and 26B-A4B attend bidirectionally within an image (`use_bidirectional_attention`
    "vision"); vLLM 0.32's CPU attention backend does not implement it (no `mm_prefix` support),
    so on CPU image prompts of those shapes follow the causal mask, not the trained one.
    E2B/E4B (no bidirectional attention) are exact either way. GPU backends are not affected.
    """
    prompt = render(bed.model_dir, "image")
    got = await run(shape_engine, prompt, None)
    bidirectional = reference(bed.model_dir, prompt, None)
    causal = reference(bed.model_dir, prompt, None, causal_images=True)
    assert got.token_ids == causal.token_ids
    if SHAPES[bed.shape].bidirectional_vision:
        assert bidirectional.token_ids != causal.token_ids
    else:
        assert bidirectional.token_ids == causal.token_ids
        assert bidirectional.first_logprobs == causal.first_logprobs


async def test_every_adapter_changes_the_output_on_every_shape(
    shape_engine: VllmEngine, bed: ShapeBed
) -> None:
    """No silent no-op (vllm #41754): each adapter changes vLLM's output, as it changes PEFT's."""
    prompt = render(bed.model_dir, "short-text")
    base = await run(shape_engine, prompt, None)
    base_ref = reference(bed.model_dir, prompt, None)
    for name, adapter in bed.adapters.items():
        tuned = await run(shape_engine, prompt, adapter)
        assert reference(bed.model_dir, prompt, adapter).token_ids != base_ref.token_ids, name
        assert tuned.token_ids != base.token_ids, f"{name} does not change vLLM's output"
        assert logprob_difference(tuned, base) > 100 * LOGPROB_TOLERANCE, name


async def test_k_eq_v_attention_lora_is_half_applied_without_the_fix(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bug `lora_k_eq_v` fixes is real: unfixed, a 31B-style attention adapter is inexact."""
    unfixed_bed = build_bed(tmp_path_factory.mktemp("k-eq-v"), "dense", ("lm-attn",))
    monkeypatch.setenv("GEMMA_SERVER_DISABLE_FIXES", "lora_k_eq_v")  # inherited by vLLM's processes
    unfixed = await VllmEngine.start(engine_settings(), str(unfixed_bed.model_dir), "dense")
    try:
        prompt = render(unfixed_bed.model_dir, "short-text")
        adapter = unfixed_bed.adapters["lm-attn"]
        got = await run(unfixed, prompt, adapter)
        base = await run(unfixed, prompt, None)
    finally:
        await unfixed.shutdown()
    want = reference(unfixed_bed.model_dir, prompt, adapter)
    assert got.token_ids != base.token_ids  # applied, so not the no-op of vllm #41754 ...
    assert logprob_difference(got, want) > 10 * LOGPROB_TOLERANCE  # ... but only half of it
