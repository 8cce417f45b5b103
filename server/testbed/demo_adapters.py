"""Demo LoRA adapters for the tiny Gemma 4: PEFT format, seeded, and visibly different.

Each adapter is made by PEFT itself (`get_peft_model` on the transformers model, then
`save_pretrained`), so its files are exactly what PEFT writes: `adapter_config.json` and
`adapter_model.safetensors`. `target_modules` is a regex restricted to the language model; the
vision and audio towers are left alone. `base_model_name_or_path` is the model folder's name
(e.g. `tiny-gemma4`), never its absolute path, so the files do not depend on where the model
lives and the same seed always gives the same bytes.

Usage: `python -m server.testbed.demo_adapters MODEL_DIR OUT_DIR [--seed N]`
writes `OUT_DIR/<name>/`.
"""

from __future__ import annotations

import argparse
import copy
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_LAYER = r".*language_model\.layers\.\d+\."

# Size of each adapter's weight change relative to the spread of the weight it adapts: large
# enough that greedy outputs differ from the base model, small enough to stay well-conditioned.
DELTA_TO_WEIGHT_STD = 0.5


@dataclass(frozen=True)
class DemoAdapterSpec:
    """One demo adapter: its name, LoRA rank and the language-model projections it adapts."""

    name: str
    rank: int
    target_modules: str  # a regex over module names, as PEFT accepts it

    @property
    def alpha(self) -> int:
        """`lora_alpha`; equal to the rank, so PEFT's scaling is 1."""
        return self.rank


DEMO_ADAPTERS: tuple[DemoAdapterSpec, ...] = (
    DemoAdapterSpec("demo-attn", 4, _LAYER + r"self_attn\.(q|k|v|o)_proj"),
    DemoAdapterSpec("demo-mlp", 8, _LAYER + r"mlp\.(gate|up|down)_proj"),
    DemoAdapterSpec("demo-all", 16, _LAYER + r"(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"),
)


# Adapters of every kind people publish for Gemma 4, for the shape tests (`tests/test_gemma_shapes`)
# and the tower-LoRA benchmark. Regexes name modules a shape may lack (per-layer projections,
# router); PEFT simply adapts what exists.
_LM = r".*language_model\."
_VISION = r".*vision_tower\."
SHAPE_ADAPTERS: tuple[DemoAdapterSpec, ...] = (
    DemoAdapterSpec("lm-attn", 4, _LM + r"layers\.\d+\.self_attn\.(q|k|v|o)_proj"),
    DemoAdapterSpec("lm-mlp", 8, _LM + r"layers\.\d+\.mlp\.(gate|up|down)_proj"),
    # Every language-model Linear but lm_head: what `all-linear` gives the language model,
    # including E2B/E4B's per-layer projections and the 26B-A4B router.
    DemoAdapterSpec(
        "lm-all",
        16,
        _LM + r"(layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj"
        r"|per_layer_input_gate|per_layer_projection|router\.proj)|per_layer_model_projection)",
    ),
    # The vision tower (the `.linear` inside each Gemma4ClippableLinear), its patch embedder
    # and the vision connector: served only with tower LoRA on.
    DemoAdapterSpec(
        "vision-tower",
        8,
        _VISION + r"(encoder\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
        r"\.linear|patch_embedder\.input_proj)|.*embed_vision\.embedding_projection",
    ),
    # Every audio-tower Linear (incl. relative_k_proj) and the audio connector.
    DemoAdapterSpec(
        "audio-tower",
        8,
        r".*audio_tower\..*(\.linear|relative_k_proj|output_proj|input_proj_linear)"
        r"|.*embed_audio\.embedding_projection",
    ),
)


def _generator(seed: int, spec: DemoAdapterSpec) -> Any:
    import torch

    # Seeded per adapter, so one adapter's weights do not depend on the others.
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(spec.name.encode()))


def _fill_lora_weights(peft_model: Any, spec: DemoAdapterSpec, seed: int) -> None:
    """Give every LoRA pair random A and B with `B @ A` scaled to the adapted weight."""
    import torch

    generator = _generator(seed, spec)
    scaling = spec.alpha / spec.rank
    with torch.no_grad():
        for _, module in sorted(peft_model.named_modules(), key=lambda item: item[0]):
            if not hasattr(module, "lora_A") or "default" not in module.lora_A:
                continue
            lora_a = module.lora_A["default"].weight  # (rank, in_features)
            lora_b = module.lora_B["default"].weight  # (out_features, rank)
            base_std = float(module.get_base_layer().weight.float().std())
            a = torch.randn(lora_a.shape, generator=generator) / lora_a.shape[1] ** 0.5
            b = torch.randn(lora_b.shape, generator=generator)
            # std(B @ A) = std(b) * sqrt(rank) * std(a) * sqrt(in) = sqrt(rank) with these draws.
            b *= DELTA_TO_WEIGHT_STD * base_std / (scaling * spec.rank**0.5)
            lora_a.copy_(a)
            lora_b.copy_(b)


def load_base_model(model_dir: Path) -> Any:
    import torch
    from transformers import Gemma4ForConditionalGeneration

    return Gemma4ForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, local_files_only=True
    )


def write_demo_adapter(
    model_dir: Path, out_dir: Path, spec: DemoAdapterSpec, *, seed: int = 0, base: Any = None
) -> Path:
    """Write one demo adapter for the model in `model_dir` to `out_dir`; return `out_dir`.

    `base` may hold the model already loaded from `model_dir`; it is not modified.
    """
    from peft import LoraConfig, get_peft_model

    model_dir = Path(model_dir)
    out_dir = Path(out_dir)
    base = copy.deepcopy(base) if base is not None else load_base_model(model_dir)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=0.0,
        target_modules=spec.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, config)
    _fill_lora_weights(peft_model, spec, seed)
    peft_model.peft_config["default"].base_model_name_or_path = model_dir.resolve().name
    # No embedding layer is adapted; saying so skips PEFT's look-up of the base model by name.
    peft_model.save_pretrained(str(out_dir), save_embedding_layers=False)
    # PEFT also writes a model card naming the local path; the adapter is the two other files.
    (out_dir / "README.md").unlink(missing_ok=True)
    return out_dir


def write_demo_adapters(model_dir: Path, out_dir: Path, *, seed: int = 0) -> dict[str, Path]:
    """Write every adapter of `DEMO_ADAPTERS` to `out_dir/<name>/`; return name -> folder."""
    base = load_base_model(Path(model_dir))
    written: dict[str, Path] = {}
    for spec in DEMO_ADAPTERS:
        written[spec.name] = write_demo_adapter(
            model_dir, Path(out_dir) / spec.name, spec, seed=seed, base=base
        )
        logger.info("demo adapter %s (rank %d) written", spec.name, spec.rank)
    return written


def write_adapter_variants(
    template: Path, out_dir: Path, names: list[str], *, seed: int = 0
) -> dict[str, Path]:
    """Copies of the adapter in `template` as `out_dir/<name>/`, each a different adapter.

    Each copy's `lora_B` is scaled element by element by a seeded factor in [0.5, 1.5), so every
    copy has its own weights (and sha256) and changes the output as much as the template does.
    No model is loaded: a thousand take seconds, for tests and benchmarks of many adapters.
    """
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(Path(template) / "adapter_model.safetensors"))
    config = (Path(template) / "adapter_config.json").read_bytes()
    generator = torch.Generator().manual_seed(seed)
    written: dict[str, Path] = {}
    for name in names:
        folder = Path(out_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        varied = {
            key: value * (0.5 + torch.rand(value.shape, generator=generator))
            if "lora_B" in key
            else value
            for key, value in tensors.items()
        }
        save_file(varied, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        (folder / "adapter_config.json").write_bytes(config)
        written[name] = folder
    return written


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description="Write the demo LoRA adapters of the tiny model.")
    parser.add_argument("model_dir", type=Path, help="the tiny Gemma 4 checkpoint")
    parser.add_argument("out_dir", type=Path, help="folder to write one sub-folder per adapter to")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_demo_adapters(args.model_dir, args.out_dir, seed=args.seed)


if __name__ == "__main__":
    main()
