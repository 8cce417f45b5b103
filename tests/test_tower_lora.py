"""Tower LoRA (`--enable-tower-lora`): vision-tower adapters against transformers + PEFT.

One engine with tower LoRA on, on the tiny Gemma 4 (it has both towers). A vision-tower adapter
(every `.linear` of the tower's Gemma4ClippableLinears, `patch_embedder.input_proj`,
`embed_vision`) must match PEFT on image prompts and change them, and leave text prompts alone
(the tower never runs on text). Audio-tower LoRA is probed, not enabled by the service.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from server.engine.vllm_engine import VllmEngine
from server.settings import Settings
from tests.conftest import engine_settings
from tests.test_engine_correctness import mismatch, run
from tests.test_gemma_shapes import ShapeBed, build_bed, logprob_difference, reference, render


@pytest.fixture(scope="module")
def tower_bed(tmp_path_factory: pytest.TempPathFactory) -> ShapeBed:
    return build_bed(
        tmp_path_factory.mktemp("tower"), "default", ("lm-attn", "vision-tower", "audio-tower")
    )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def tower_engine(tower_bed: ShapeBed) -> AsyncIterator[VllmEngine]:
    started = await VllmEngine.start(
        engine_settings(enable_tower_lora=True), str(tower_bed.model_dir), "tiny-gemma4"
    )
    yield started
    await started.shutdown()


def test_setting_defaults_off_and_reaches_vllm(tmp_path: Path) -> None:
    from server.engine.vllm_engine import engine_args

    assert Settings().enable_tower_lora is False
    on = Settings(_cli_parse_args=["--enable-tower-lora"])  # type: ignore[call-arg]
    assert on.enable_tower_lora is True
    assert engine_args(on, str(tmp_path), "m").enable_tower_connector_lora is True
    assert engine_args(Settings(), str(tmp_path), "m").enable_tower_connector_lora is False


@pytest.mark.parametrize("adapter_name", ["base", "vision-tower", "lm-attn"])
async def test_image_prompts_match_peft_with_tower_lora(
    tower_engine: VllmEngine, tower_bed: ShapeBed, adapter_name: str
) -> None:
    adapter = tower_bed.adapters.get(adapter_name)
    prompt = render(tower_bed.model_dir, "image")
    got = await run(tower_engine, prompt, adapter)
    want = reference(tower_bed.model_dir, prompt, adapter)
    assert mismatch("float32", got, want, record=True) is None


async def test_vision_tower_adapter_changes_images_not_text(
    tower_engine: VllmEngine, tower_bed: ShapeBed
) -> None:
    adapter = tower_bed.adapters["vision-tower"]
    image = render(tower_bed.model_dir, "image")
    tuned, base = await run(tower_engine, image, adapter), await run(tower_engine, image, None)
    assert tuned.token_ids != base.token_ids
    text = render(tower_bed.model_dir, "short-text")
    tuned, base = await run(tower_engine, text, adapter), await run(tower_engine, text, None)
    assert tuned.token_ids == base.token_ids
    assert logprob_difference(tuned, base) < 1e-5


@pytest.mark.parametrize("adapter_name", ["base", "lm-attn"])
async def test_audio_prompts_with_adapters_match_peft_with_tower_lora(
    tower_engine: VllmEngine, tower_bed: ShapeBed, adapter_name: str
) -> None:
    """Unfixed (`lora_audio_tower`), the adapter request kills the engine (relative_k_proj)."""
    adapter = tower_bed.adapters.get(adapter_name)
    prompt = render(tower_bed.model_dir, "audio")
    got = await run(tower_engine, prompt, adapter)
    want = reference(tower_bed.model_dir, prompt, adapter)
    assert mismatch("float32", got, want, record=True) is None


async def test_audio_tower_lora_is_not_applied(
    tower_engine: VllmEngine, tower_bed: ShapeBed
) -> None:
    """vLLM 0.32 cannot apply audio-tower LoRA (see `lora_audio_tower`): the service refuses it.

    PEFT's output changes with the adapter; the engine's stays the base output.
    """
    adapter = tower_bed.adapters["audio-tower"]
    prompt = render(tower_bed.model_dir, "audio")
    tuned, base = await run(tower_engine, prompt, adapter), await run(tower_engine, prompt, None)
    assert reference(tower_bed.model_dir, prompt, adapter).token_ids != base.token_ids
    assert tuned.token_ids == base.token_ids
