"""Build a tiny, seeded, randomly initialised Gemma 4 checkpoint for tests and local runs.

The checkpoint has the shape of a real Gemma 4 (`Gemma4ForConditionalGeneration` with text,
vision and optional audio towers, a byte-level BPE tokenizer with Gemma 4's special tokens, Google's
Gemma 4 chat template and processor configs) at about 1.7 M parameters, so vLLM and
transformers both load it offline in seconds. The same seed gives byte-identical files.

Shapes (`--shape`), each a scaled-down copy of one published Gemma 4 family (see `SHAPES`):
- `default`: the model `make run` serves: per-layer inputs, no KV sharing (4 layers).
- `e4b`: E2B/E4B style: per-layer inputs, KV-shared last layers, double-wide MLP in them.
- `dense`: 31B style: no per-layer inputs, `attention_k_eq_v` full-attention layers.
- `moe`: 26B-A4B style: as `dense`, plus a router and experts beside the MLP in every layer.

Usage: `python -m server.testbed.tiny_model OUT_DIR [--shape S] [--seed N] [--no-audio]
[--kv-shared-layers N]`
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Order fixes the ids: Gemma puts <pad>, <eos>, <bos> at 0, 1, 2.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<|turn>",
    "<turn|>",
    "<|think|>",
    "<|channel>",
    "<channel|>",
    "<|tool>",
    "<tool|>",
    "<|tool_call>",
    "<tool_call|>",
    "<|tool_response>",
    "<tool_response|>",
    '<|"|>',
    "<|image>",
    "<image|>",
    "<|image|>",
    "<|audio>",
    "<audio|>",
    "<|audio|>",
    "<|video|>",
)

# Attribute names under which Gemma 4's tokenizer exposes its special tokens (tokenizer_config).
NAMED_SPECIAL_TOKENS: dict[str, str] = {
    "image_token": "<|image|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "audio_token": "<|audio|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "sot_token": "<|turn>",
    "eot_token": "<turn|>",
    "soc_token": "<|channel>",
    "eoc_token": "<channel|>",
    "think_token": "<|think|>",
    "escape_token": '<|"|>',
    "std_token": "<|tool>",
    "etd_token": "<tool|>",
    "stc_token": "<|tool_call>",
    "etc_token": "<tool_call|>",
    "str_token": "<|tool_response>",
    "etr_token": "<tool_response|>",
}

VOCAB_SIZE = 4096
IMAGE_SOFT_TOKENS = 70
MEL_FEATURE_SIZE = 128
SAMPLING_RATE = 16_000

# Google's canonical Gemma 4 chat template (tools, tool calls and results, thinking), verbatim:
# the gemma-4-E2B-it revision published 2026-07-09, as vendored by ollama/ollama in
# model/renderers/testdata/gemma4_e2b_chat_template.jinja2 (commit 8a0016f8, 2026-07-14).
# It emits <bos> itself, as vLLM adds none for Gemma 4 when a template exists.
CHAT_TEMPLATE_FILE = Path(__file__).with_name("chat_template.jinja")


# Tokenizer training text: fixed prose plus seeded pseudo-words, enough to fill the vocabulary.
_TRAINING_PROSE = """\
The quick brown fox jumps over the lazy dog. A server answers many requests at once, and each
request may name a different adapter. Small models make fast tests: they load in seconds, use
little memory and still exercise every code path of the engine. Images become patches, patches
become soft tokens, and soft tokens sit in the prompt between the begin and end markers. Audio
is cut into frames of twenty milliseconds, turned into mel features and pooled by convolutions.
Hello! How are you today? I am fine, thank you. What is the weather like in Paris, London,
Tokyo, Nairobi or Lima? It is sunny, cloudy, rainy, windy or snowy. Numbers: 0 1 2 3 4 5 6 7 8
9 10 42 100 256 1024 2048 4096 65536. Code: def main(): return {"ok": True, "items": [1, 2, 3]}
"""
_SYLLABLES = tuple(c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou")


def _training_text() -> list[str]:
    words = random.Random(4096)
    lines = [_TRAINING_PROSE]
    for _ in range(400):
        line = " ".join(
            "".join(words.choice(_SYLLABLES) for _ in range(words.randint(1, 4)))
            for _ in range(words.randint(6, 14))
        )
        lines.append(line.capitalize() + ".")
    return lines


def _build_tokenizer() -> Any:
    """Train a byte-level BPE of exactly VOCAB_SIZE ids, special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_text(), trainer=trainer)
    # Fill any ids the text could not, so every id the model can emit decodes.
    missing = VOCAB_SIZE - tokenizer.get_vocab_size()
    if missing > 0:
        tokenizer.add_special_tokens([f"<unused{i}>" for i in range(missing)])
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {tokenizer.get_vocab_size()} ids, not {VOCAB_SIZE}")
    return tokenizer


def _token_ids(tokenizer: Any) -> dict[str, int]:
    def token_id(token: str) -> int:
        value = tokenizer.token_to_id(token)
        if value is None:
            raise RuntimeError(f"special token {token!r} missing from the tokenizer")
        return int(value)

    return {
        "pad": token_id("<pad>"),
        "eos": token_id("<eos>"),
        "bos": token_id("<bos>"),
        "end_of_turn": token_id("<turn|>"),
        "tool_response": token_id("<|tool_response>"),
        "image": token_id("<|image|>"),
        "boi": token_id("<|image>"),
        "eoi": token_id("<image|>"),
        "audio": token_id("<|audio|>"),
        "boa": token_id("<|audio>"),
        "eoa": token_id("<audio|>"),
        "video": token_id("<|video|>"),
    }


# Sources of the real-family values below (public copies of the checkpoints' config.json, found
# with code search; the hub itself is out of reach here):
# - 31B: a dump of google/gemma-4-31B-it's config (transformers 5.7.0): 60 layers, pattern of
#   5 sliding + 1 full, sliding_window 1024, head_dim 256, global_head_dim 512, 32 heads,
#   16 KV heads, num_global_key_value_heads 4, attention_k_eq_v true,
#   hidden_size_per_layer_input 0, num_kv_shared_layers 0, final_logit_softcapping 30.0,
#   use_bidirectional_attention "vision", use_double_wide_mlp false.
# - 26B-A4B: text_config fields quoted in other projects' tests: 30 layers, hidden 2816,
#   intermediate 2112, moe_intermediate_size 704, 128 experts, top 8, 16 heads, 8 KV heads,
#   num_global_key_value_heads 2, head_dim 256, global_head_dim 512, attention_k_eq_v true,
#   enable_moe_block true, hidden_size_per_layer_input 0. Its sliding window and
#   use_bidirectional_attention were not found in a source we could read; we assume the 31B's.
# - E2B/E4B: E2B 35 layers, hidden 1536, 8 heads, 1 KV head, head_dim 256, global_head_dim 512,
#   sliding_window 512, hidden_size_per_layer_input 256, num_kv_shared_layers 20, pattern 4
#   sliding + 1 full, double-wide MLP in the KV-shared layers (FFN 6144 / 12288); E4B 42 layers,
#   5 sliding + 1 full, num_kv_shared_layers 18, uniform FFN. attention_k_eq_v false; softcap 30.
# Scaled down: sizes shrink, ratios and flags stay (global_head_dim = 2 x head_dim, KV heads
# fewer than query heads, full attention last, sliding window shorter than the long test prompt).


@dataclass(frozen=True)
class TinyShape:
    """The text-model knobs that differ between the Gemma 4 families."""

    name: str
    own_layer_types: tuple[str, ...]  # layers with their own KV
    kv_shared_layers: int  # appended layers reusing earlier layers' KV (E2B/E4B)
    per_layer_input: bool  # E2B/E4B per-layer embeddings and projections
    num_key_value_heads: int
    num_global_key_value_heads: int | None
    attention_k_eq_v: bool  # 31B / 26B-A4B: full-attention layers have k_proj only
    double_wide_mlp: bool = False
    intermediate_size: int = 256
    moe: bool = False
    bidirectional_vision: bool = False
    audio: bool = True  # E2B/E4B have an audio tower; 31B and 26B-A4B (audio_config null) do not

    @property
    def layer_types(self) -> list[str]:
        # Shared layers reuse the last own layer of their type; the last layer must be full.
        shared = ["sliding_attention"] * self.kv_shared_layers
        if shared:
            shared[-1] = "full_attention"
        return [*self.own_layer_types, *shared]


_FIVE_TO_ONE = ("sliding_attention",) * 5 + ("full_attention",)
SHAPES: dict[str, TinyShape] = {
    # The model `make run` serves (unchanged bytes): per-layer inputs, no KV sharing.
    "default": TinyShape(
        "default",
        ("sliding_attention",) * 3 + ("full_attention",),
        kv_shared_layers=0,
        per_layer_input=True,
        num_key_value_heads=1,
        num_global_key_value_heads=None,
        attention_k_eq_v=False,
    ),
    # E2B/E4B: 4 own layers (sliding, full, sliding, full keeps both types before the shared
    # ones) + 2 KV-shared layers with E2B's double-wide MLP.
    "e4b": TinyShape(
        "e4b",
        ("sliding_attention", "full_attention", "sliding_attention", "full_attention"),
        kv_shared_layers=2,
        per_layer_input=True,
        num_key_value_heads=1,
        num_global_key_value_heads=None,
        attention_k_eq_v=False,
        double_wide_mlp=True,
    ),
    # 31B: 5 sliding + 1 full, k_eq_v full attention with fewer global KV heads.
    "dense": TinyShape(
        "dense",
        _FIVE_TO_ONE,
        kv_shared_layers=0,
        per_layer_input=False,
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        bidirectional_vision=True,
        audio=False,
    ),
    # 26B-A4B: as dense, plus router + experts; dense MLP narrower than hidden (2112/2816).
    "moe": TinyShape(
        "moe",
        _FIVE_TO_ONE,
        kv_shared_layers=0,
        per_layer_input=False,
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        intermediate_size=96,
        moe=True,
        bidirectional_vision=True,
        audio=False,
    ),
}


def _text_config(shape: TinyShape, kv_shared_layers: int | None) -> dict[str, Any]:
    if kv_shared_layers is not None:
        shape = replace(shape, kv_shared_layers=kv_shared_layers)
    layer_types = shape.layer_types
    config: dict[str, Any] = {
        "vocab_size": VOCAB_SIZE,
        "vocab_size_per_layer_input": VOCAB_SIZE,
        "hidden_size": 128,
        "hidden_size_per_layer_input": 16 if shape.per_layer_input else 0,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": len(layer_types),
        "layer_types": layer_types,
        "num_kv_shared_layers": shape.kv_shared_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": 32,
        "global_head_dim": 64,
        "sliding_window": 64,
        "max_position_embeddings": 2048,
        "final_logit_softcapping": 30.0,
    }
    if shape.attention_k_eq_v:
        config["attention_k_eq_v"] = True
        config["num_global_key_value_heads"] = shape.num_global_key_value_heads
    if shape.double_wide_mlp:
        config["use_double_wide_mlp"] = True
    if shape.moe:
        # 128 experts, top 8, expert width 704/2816 of hidden in 26B-A4B; 8, top 2, 32 here.
        config |= {
            "enable_moe_block": True,
            "num_experts": 8,
            "top_k_experts": 2,
            "moe_intermediate_size": 32,
        }
    if shape.bidirectional_vision:
        config["use_bidirectional_attention"] = "vision"
    return config


def tiny_config(
    *,
    audio: bool = True,
    kv_shared_layers: int | None = None,
    token_ids: dict[str, int],
    shape: str = "default",
) -> Any:
    """The `Gemma4Config` of the tiny model of one shape (`SHAPES`; sizes from ENGINE-NOTES).

    `kv_shared_layers` overrides the shape's number of KV-shared layers.
    """
    from transformers.models.gemma4.configuration_gemma4 import Gemma4Config

    text_config = {
        **_text_config(SHAPES[shape], kv_shared_layers),
        "pad_token_id": token_ids["pad"],
        "eos_token_id": token_ids["eos"],
        "bos_token_id": token_ids["bos"],
        "dtype": "float32",
    }
    vision_config = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "patch_size": 16,
        "pooling_kernel_size": 3,
        "position_embedding_size": 1024,
        # vLLM sizes image placeholders from it; transformers' config class does not define it.
        "default_output_length": IMAGE_SOFT_TOKENS,
        "dtype": "float32",
    }
    audio_config = {
        "hidden_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        # The first conv's channels must equal the mel feature size, or vLLM's worker hangs.
        "subsampling_conv_channels": [MEL_FEATURE_SIZE, 8],
        "output_proj_dims": 64,
        "dtype": "float32",
    }
    # vLLM reads `eoa_token_id` before transformers' `eoa_token_index`; real configs have both.
    extra: dict[str, Any] = {"eoa_token_id": token_ids["eoa"]}
    return Gemma4Config(
        text_config=text_config,
        vision_config=vision_config,
        audio_config=audio_config if audio else None,
        boi_token_id=token_ids["boi"],
        eoi_token_id=token_ids["eoi"],
        image_token_id=token_ids["image"],
        video_token_id=token_ids["video"],
        boa_token_id=token_ids["boa"],
        eoa_token_index=token_ids["eoa"],
        audio_token_id=token_ids["audio"],
        architectures=["Gemma4ForConditionalGeneration"],
        dtype="float32",
        **extra,
    )


def _tokenizer_config() -> dict[str, Any]:
    return {
        "backend": "tokenizers",
        "tokenizer_class": "TokenizersBackend",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        **NAMED_SPECIAL_TOKENS,
        "extra_special_tokens": ["<|video|>"],
        "padding_side": "left",
        "processor_class": "Gemma4Processor",
    }


def _processor_config() -> dict[str, Any]:
    """Processor config as transformers writes it for Gemma 4 (names of the torchvision classes)."""
    image_processor = {
        "image_processor_type": "Gemma4ImageProcessor",
        "do_convert_rgb": True,
        "do_normalize": False,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.0, 0.0, 0.0],
        "image_std": [1.0, 1.0, 1.0],
        "image_seq_length": IMAGE_SOFT_TOKENS,
        "max_soft_tokens": IMAGE_SOFT_TOKENS,
        "patch_size": 16,
        "pooling_kernel_size": 3,
        "resample": 3,
        "rescale_factor": 1 / 255,
    }
    video_processor = {
        "video_processor_type": "Gemma4VideoProcessor",
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "do_sample_frames": True,
        "image_mean": [0.0, 0.0, 0.0],
        "image_std": [1.0, 1.0, 1.0],
        "max_soft_tokens": 70,
        "num_frames": 32,
        "patch_size": 16,
        "pooling_kernel_size": 3,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "return_metadata": False,
    }
    # Gemma4Processor always takes a feature extractor, even for a model without audio tower.
    feature_extractor = {
        "feature_extractor_type": "Gemma4AudioFeatureExtractor",
        "feature_size": MEL_FEATURE_SIZE,
        "sampling_rate": SAMPLING_RATE,
        "frame_length_ms": 20.0,
        "hop_length_ms": 10.0,
        "min_frequency": 0.0,
        "max_frequency": 8000.0,
        "mel_floor": 0.001,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": True,
    }
    return {
        "processor_class": "Gemma4Processor",
        "image_seq_length": IMAGE_SOFT_TOKENS,
        "audio_seq_length": 750,
        "audio_ms_per_token": 40,
        "image_processor": image_processor,
        "video_processor": video_processor,
        "feature_extractor": feature_extractor,
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_tiny_model(
    out_dir: Path,
    *,
    seed: int = 0,
    audio: bool | None = None,
    kv_shared_layers: int | None = None,
    shape: str = "default",
) -> Path:
    """Write the tiny Gemma 4 checkpoint to `out_dir` (created if needed) and return it.

    The weights are float32, drawn from transformers' own initialisation under `torch`'s
    generator seeded with `seed`; the tokenizer does not depend on the seed. `shape` picks the
    family (`SHAPES`). `audio` overrides the shape's audio tower; `kv_shared_layers=N` sets the
    number of layers that reuse the KV cache of earlier layers, as E2B/E4B do.
    """
    import torch
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ForConditionalGeneration

    if kv_shared_layers is not None and kv_shared_layers < 0:
        raise ValueError("kv_shared_layers must be >= 0")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; one of {sorted(SHAPES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer()
    token_ids = _token_ids(tokenizer)
    config = tiny_config(
        audio=SHAPES[shape].audio if audio is None else audio,
        kv_shared_layers=kv_shared_layers,
        token_ids=token_ids,
        shape=shape,
    )

    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(config).eval()  # float32, torch's default dtype
    model.save_pretrained(out_dir, safe_serialization=True)

    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config())
    _write_json(out_dir / "processor_config.json", _processor_config())
    shutil.copyfile(CHAT_TEMPLATE_FILE, out_dir / "chat_template.jinja")
    _write_json(
        out_dir / "generation_config.json",
        {
            "bos_token_id": token_ids["bos"],
            # As Gemma 4's own: a model turn that called tools ends on <|tool_response>.
            "eos_token_id": [
                token_ids["eos"],
                token_ids["end_of_turn"],
                token_ids["tool_response"],
            ],
            "pad_token_id": token_ids["pad"],
        },
    )
    logger.info("tiny Gemma 4 (%s) written to %s (seed %d)", shape, out_dir, seed)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out_dir", type=Path, help="directory to write the checkpoint to")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument("--no-audio", action="store_true", help="leave the audio tower out")
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), default="default", help="model family (default: default)"
    )
    parser.add_argument(
        "--kv-shared-layers", type=int, default=None, help="layers that reuse earlier layers' KV"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_tiny_model(
        args.out_dir,
        seed=args.seed,
        audio=False if args.no_audio else None,
        kv_shared_layers=args.kv_shared_layers,
        shape=args.shape,
    )


if __name__ == "__main__":
    main()
