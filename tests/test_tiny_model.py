"""The tiny Gemma 4 and its demo adapters: deterministic, loadable offline, and not no-ops.

Transformers and PEFT only; the vLLM engine is exercised in `test_engine_correctness.py`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoProcessor, Gemma4ForConditionalGeneration

from server.testbed.default_model import (
    BUILD_LOCK,
    BUILD_STAMP,
    BUILD_VERSION,
    DEMO_ADAPTERS_DIR,
    TINY_MODEL_DIR,
    DefaultModel,
    ensure_default_model,
)
from server.testbed.demo_adapters import DEMO_ADAPTERS, write_demo_adapters
from server.testbed.demo_training import trained_adapter_specs
from server.testbed.tiny_model import build_tiny_model, main
from server.vllm_compat import gemma4_processor
from tests.hf_reference import hf_greedy
from tests.media import seeded_audio, seeded_image

MAX_TOKENS = 8


def file_hashes(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder`."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def processor(tiny: DefaultModel) -> object:
    gemma4_processor.apply()
    return AutoProcessor.from_pretrained(tiny.model_dir, local_files_only=True)


def render(processor: object, content: object) -> str:
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(  # type: ignore[attr-defined]
        messages, tokenize=False, add_generation_prompt=True
    )


def test_same_seed_builds_the_same_bytes(tiny: DefaultModel, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again", seed=0)
    assert file_hashes(again) == file_hashes(tiny.model_dir)


def test_another_seed_changes_only_the_weights(tiny: DefaultModel, tmp_path: Path) -> None:
    other = file_hashes(build_tiny_model(tmp_path / "other", seed=1))
    same = file_hashes(tiny.model_dir)
    assert {name for name in same if other[name] != same[name]} == {"model.safetensors"}


def test_model_loads_offline_in_transformers(tiny: DefaultModel) -> None:
    model = Gemma4ForConditionalGeneration.from_pretrained(tiny.model_dir, local_files_only=True)
    config: Any = model.config
    assert config.text_config.vocab_size == 4096
    assert config.vision_config.default_output_length == 70
    assert config.audio_config.subsampling_conv_channels[0] == 128
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert 1_000_000 < sum(p.numel() for p in model.parameters()) < 3_000_000


def test_processor_loads_offline_with_matching_token_ids(
    tiny: DefaultModel, processor: object
) -> None:
    config = json.loads((tiny.model_dir / "config.json").read_text())
    tokenizer = processor.tokenizer  # type: ignore[attr-defined]
    ids = tokenizer.convert_tokens_to_ids
    assert ids(["<pad>", "<eos>", "<bos>"]) == [0, 1, 2]
    assert ids(tokenizer.image_token) == config["image_token_id"]
    assert ids(tokenizer.boi_token) == config["boi_token_id"]
    assert ids(tokenizer.eoi_token) == config["eoi_token_id"]
    assert ids(tokenizer.audio_token) == config["audio_token_id"]
    assert ids(tokenizer.boa_token) == config["boa_token_id"]
    assert ids(tokenizer.eoa_token) == config["eoa_token_index"]
    assert ids("<|video|>") == config["video_token_id"]
    generation = json.loads((tiny.model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == ids(["<eos>", "<turn|>", "<|tool_response>"])


def test_chat_template_renders_gemma4_turns(processor: object) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " Hi? "}]},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "And this?"}]},
    ]
    text = processor.apply_chat_template(  # type: ignore[attr-defined]
        messages, tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<bos><|turn>system\nBe brief.<turn|>\n"
        "<|turn>user\n<|image|>Hi?<turn|>\n"
        "<|turn>model\nHello<turn|>\n"
        "<|turn>user\n<|audio|>And this?<turn|>\n"
        "<|turn>model\n"
    )


def test_chat_template_is_googles_gemma4_template(tiny: DefaultModel) -> None:
    # Byte-identical to Google's 2026-07-09 gemma-4-E2B-it template (source: tiny_model.py).
    template = (tiny.model_dir / "chat_template.jinja").read_bytes()
    assert hashlib.sha256(template).hexdigest() == (
        "3beb16a140a78c7bf71cd86609f58e56f1594e670e95fe58bd6022f941d1cb1e"
    )


def test_an_old_cache_is_rebuilt(tiny: DefaultModel, tmp_path: Path) -> None:
    stale = tmp_path / TINY_MODEL_DIR
    stale.mkdir()
    (stale / "chat_template.jinja").write_text("{{ messages }}", encoding="utf-8")
    (tmp_path / DEMO_ADAPTERS_DIR).mkdir()
    rebuilt = ensure_default_model(tmp_path)
    assert (tmp_path / BUILD_STAMP).read_text().strip() == BUILD_VERSION
    assert file_hashes(rebuilt.model_dir) == file_hashes(tiny.model_dir)
    assert file_hashes(rebuilt.adapters_dir) == file_hashes(tiny.adapters_dir)
    # A current stamp keeps the cache as it is.
    marker = rebuilt.model_dir / "kept"
    marker.touch()
    ensure_default_model(tmp_path)
    assert marker.exists()


def test_a_complete_cache_is_used_without_writing(tiny: DefaultModel, tmp_path: Path) -> None:
    """The Docker image's cache is read-only to the service's user: using it writes nothing."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny.model_dir.parent, cache, ignore=shutil.ignore_patterns(BUILD_LOCK))
    before = {path: path.stat().st_mtime_ns for path in cache.rglob("*")}
    used = ensure_default_model(cache)
    assert used.model_dir == (cache / TINY_MODEL_DIR).resolve()
    assert not (cache / BUILD_LOCK).exists()
    assert {path: path.stat().st_mtime_ns for path in cache.rglob("*")} == before


def test_processor_expands_image_and_audio_placeholders(processor: object) -> None:
    text = render(processor, [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "?"}])
    inputs = processor(  # type: ignore[operator]
        text=[text], images=[[seeded_image()]], audio=[seeded_audio()], return_tensors="pt"
    )
    tokenizer = processor.tokenizer  # type: ignore[attr-defined]
    ids = inputs["input_ids"][0].tolist()
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids.count(tokenizer.image_token_id) == 64  # 64x64 pixels at 70 soft tokens at most
    assert ids.count(tokenizer.audio_token_id) == 25  # 1 s at 40 ms per token


def test_processor_fix_applies_only_without_torchvision_and_is_idempotent(
    processor: object,
) -> None:
    if importlib.util.find_spec("torchvision") is not None:
        assert gemma4_processor.apply() is False  # a GPU host keeps transformers' own classes
        return
    stand_in = sys.modules["transformers.models.gemma4.image_processing_gemma4"]
    assert gemma4_processor.apply() is True
    assert gemma4_processor.apply() is True
    assert sys.modules["transformers.models.gemma4.image_processing_gemma4"] is stand_in
    assert type(processor.image_processor).__name__ == "Gemma4ImageProcessorPil"  # type: ignore[attr-defined]


def test_processor_refuses_video_clearly(processor: object) -> None:
    frames = np.zeros((2, 64, 64, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="video input is not supported on this build"):
        processor(text=["<|video|>"], videos=[frames])  # type: ignore[operator]


def test_kv_shared_variant_without_audio_loads(tmp_path: Path) -> None:
    main([str(tmp_path), "--seed", "3", "--no-audio", "--kv-shared-layers", "2"])
    model = Gemma4ForConditionalGeneration.from_pretrained(tmp_path, local_files_only=True)
    text_config: Any = model.config.text_config
    assert model.config.audio_config is None
    assert text_config.num_kv_shared_layers == 2
    assert text_config.layer_types[-1] == "full_attention"
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[2, 100, 200, 300]])).logits
    assert logits.shape == (1, 4, 4096) and torch.isfinite(logits).all()


def test_demo_adapters_are_deterministic(tiny: DefaultModel, tmp_path: Path) -> None:
    write_demo_adapters(tiny.model_dir, tmp_path)
    random_ones = {spec.name for spec in DEMO_ADAPTERS}
    built = file_hashes(tiny.adapters_dir)
    assert file_hashes(tmp_path) == {
        path: digest for path, digest in built.items() if path.split("/")[0] in random_ones
    }


def test_demo_adapters_differ_and_have_nonzero_b(tiny: DefaultModel) -> None:
    dirs = tiny.adapter_dirs()
    random_ones = [spec.name for spec in DEMO_ADAPTERS]
    trained = [spec.name for spec in trained_adapter_specs()]
    assert sorted(dirs) == sorted(random_ones + trained)
    configs = {
        name: json.loads((d / "adapter_config.json").read_text()) for name, d in dirs.items()
    }
    assert len({configs[name]["r"] for name in random_ones}) == len(random_ones)
    assert len({configs[name]["target_modules"] for name in random_ones}) == len(random_ones)
    for name, folder in dirs.items():
        assert sorted(p.name for p in folder.iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
        assert configs[name]["peft_type"] == "LORA"
        assert configs[name]["base_model_name_or_path"] == tiny.model_dir.name
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as weights:
            keys = list(weights.keys())
            assert keys and all(".language_model.layers." in key for key in keys)
            lora_b = [weights.get_tensor(key) for key in keys if "lora_B" in key]
            assert lora_b and all(bool(t.abs().max() > 0) for t in lora_b)


@pytest.mark.parametrize("adapter_name", [spec.name for spec in DEMO_ADAPTERS])
def test_each_demo_adapter_changes_greedy_output(
    tiny: DefaultModel, processor: object, adapter_name: str
) -> None:
    prompt = render(processor, "Tell me a story about a cat.")
    base = hf_greedy(tiny.model_dir, None, prompt, max_tokens=MAX_TOKENS)
    tuned = hf_greedy(
        tiny.model_dir, tiny.adapter_dirs()[adapter_name], prompt, max_tokens=MAX_TOKENS
    )
    assert len(base.token_ids) == len(tuned.token_ids) == MAX_TOKENS
    assert tuned.token_ids != base.token_ids
    assert all(np.isfinite(list(tuned.first_logprobs.values())))


def test_hf_reference_accepts_image_and_audio(tiny: DefaultModel, processor: object) -> None:
    prompt = render(
        processor, [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "?"}]
    )
    out = hf_greedy(
        tiny.model_dir,
        None,
        prompt,
        images=[seeded_image()],
        audios=[seeded_audio()],
        max_tokens=MAX_TOKENS,
    )
    assert len(out.token_ids) == MAX_TOKENS
    assert len(out.first_logprobs) == 5 and max(out.first_logprobs.values()) < 0
