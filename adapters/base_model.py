"""What an adapter can adapt in the served base model, read from its safetensors headers only.

`BaseModelSpec.from_model_dir` lists every Linear weight of the checkpoint with its
(in_features, out_features) and sorts modules into groups: the language model's Linears (every
one vLLM 0.32 wraps for LoRA: attention and MLP projections, E2B/E4B's per-layer projections,
the MoE router), the vision tower and its embedder (adaptable only with tower LoRA), the audio
tower and its embedder (not served: unproven in vLLM 0.32), and embeddings / `lm_head`, which
are never adapted. No tensor data is read.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"


class ModuleGroup(enum.Enum):
    """Where a module sits in Gemma 4, which decides whether this server can adapt it."""

    LANGUAGE_MODEL = "language model"
    VISION_TOWER = "vision tower"
    VISION_EMBEDDER = "vision embedder (embed_vision)"
    AUDIO_TOWER = "audio tower"
    AUDIO_EMBEDDER = "audio embedder (embed_audio)"
    EMBEDDING = "embedding or lm_head"
    OTHER = "other"

    @property
    def is_tower(self) -> bool:
        """True for the towers and their embedders (vLLM's tower and connector modules)."""
        return self in _VISION_GROUPS or self in _AUDIO_GROUPS

    @property
    def is_audio(self) -> bool:
        """True for the audio tower and `embed_audio`: never adapted here (unproven in vLLM)."""
        return self in _AUDIO_GROUPS

    def adaptable(self, *, tower_lora: bool) -> bool:
        """Whether a LoRA on a module of this group takes effect on this server."""
        return self is ModuleGroup.LANGUAGE_MODEL or (tower_lora and self in _VISION_GROUPS)


_LANGUAGE_MODEL_PREFIX = "model.language_model."
_LANGUAGE_LAYER = re.compile(r"model\.language_model\.layers\.(\d+)\.")
# nn.Embedding weights are 2-D like Linear ones; only the name tells them apart.
_EMBEDDING_NAME = re.compile(r"(^|\.)(lm_head|[a-z_]*embed_tokens[a-z_]*|[a-z_]*embeddings?)$")
# Gemma 4's vision/audio towers wrap each Linear as `<name>.linear` (Gemma4ClippableLinear).
WRAPPED_LINEAR_SUFFIX = ".linear"
_VISION_GROUPS = frozenset({ModuleGroup.VISION_TOWER, ModuleGroup.VISION_EMBEDDER})
_AUDIO_GROUPS = frozenset({ModuleGroup.AUDIO_TOWER, ModuleGroup.AUDIO_EMBEDDER})
_TOWER_PREFIXES = (
    ("model.vision_tower.", ModuleGroup.VISION_TOWER),
    ("model.audio_tower.", ModuleGroup.AUDIO_TOWER),
    ("model.embed_vision.", ModuleGroup.VISION_EMBEDDER),
    ("model.embed_audio.", ModuleGroup.AUDIO_EMBEDDER),
)
# How Unsloth names a quantised copy of the same base model (`unsloth/<name>-unsloth-bnb-4bit`).
_QUANTISED_COPY_SUFFIXES = ("-unsloth-bnb-4bit", "-bnb-4bit")


def module_group(module_name: str) -> ModuleGroup:
    """The group of a checkpoint module name such as `model.language_model.layers.0.mlp.up_proj`."""
    if _EMBEDDING_NAME.search(module_name):
        return ModuleGroup.EMBEDDING
    if module_name.startswith(_LANGUAGE_MODEL_PREFIX):
        return ModuleGroup.LANGUAGE_MODEL
    for prefix, group in _TOWER_PREFIXES:
        if module_name.startswith(prefix):
            return group
    return ModuleGroup.OTHER


def module_kind(module_name: str) -> str:
    """The short kind of a module (`q_proj`), looking through Gemma 4's `.linear` wrappers."""
    parts = module_name.split(".")
    if len(parts) > 1 and parts[-1] == "linear":
        return parts[-2]
    return parts[-1]


class LinearShape(NamedTuple):
    """A Linear layer's sizes; its weight is stored as (out_features, in_features)."""

    in_features: int
    out_features: int


@dataclass(frozen=True)
class BaseModelSpec:
    """The served base model as adapter validation needs it; built from file headers only."""

    served_name: str
    model_folder_name: str
    name_or_path: str  # the config's `_name_or_path`, "" when it has none
    model_type: str
    architectures: tuple[str, ...]
    linear_modules: Mapping[str, LinearShape]  # every Linear weight: module name -> shape
    module_names: frozenset[str]  # every module a PEFT target could name (Linear or not)

    @classmethod
    def from_model_dir(cls, model_dir: Path, served_name: str) -> BaseModelSpec:
        """Read `config.json` and the safetensors headers (single file or sharded) of a model."""
        model_dir = Path(model_dir)
        config = _read_json_object(model_dir / "config.json")
        shapes = _checkpoint_shapes(model_dir)
        linear: dict[str, LinearShape] = {}
        module_names = {"lm_head"}  # Gemma ties lm_head to embed_tokens, so it has no weight
        for tensor_name, shape in shapes.items():
            module_name, _, leaf = tensor_name.rpartition(".")
            if not module_name:
                continue
            module_names.add(module_name)
            if module_name.endswith(WRAPPED_LINEAR_SUFFIX):
                module_names.add(module_name.removesuffix(WRAPPED_LINEAR_SUFFIX))
            is_linear = leaf == "weight" and len(shape) == 2
            if is_linear and module_group(module_name) is not ModuleGroup.EMBEDDING:
                linear[module_name] = LinearShape(in_features=shape[1], out_features=shape[0])
        architectures = config.get("architectures") or ()
        return cls(
            served_name=served_name,
            model_folder_name=model_dir.resolve().name,
            name_or_path=str(config.get("_name_or_path") or ""),
            model_type=str(config.get("model_type") or ""),
            architectures=tuple(str(a) for a in architectures),
            linear_modules=dict(sorted(linear.items())),
            module_names=frozenset(module_names),
        )

    def modules_in(self, group: ModuleGroup) -> dict[str, LinearShape]:
        """The Linear modules of one group, by name."""
        return {n: s for n, s in self.linear_modules.items() if module_group(n) is group}

    def adaptable_modules(self, *, tower_lora: bool) -> dict[str, LinearShape]:
        """The Linear modules a LoRA can adapt on this server."""
        return {
            n: s
            for n, s in self.linear_modules.items()
            if module_group(n).adaptable(tower_lora=tower_lora)
        }

    @property
    def language_layer_count(self) -> int:
        """How many decoder layers hold adaptable projections."""
        layers = {
            match.group(1) for name in self.linear_modules if (match := _LANGUAGE_LAYER.match(name))
        }
        return len(layers)

    def accepted_base_names(self) -> tuple[str, ...]:
        """Names an adapter's `base_model_name_or_path` may carry for this model, lower case."""
        candidates = (self.served_name, self.model_folder_name, self.name_or_path)
        return tuple(dict.fromkeys(base_name_key(c) for c in candidates if c))


def base_name_key(name_or_path: str) -> str:
    """What two names of one base model share: last path component, lower case, no quant suffix.

    `unsloth/gemma-4-E4B-it-unsloth-bnb-4bit`, `google/gemma-4-e4b-it` and `gemma-4-E4B-it` give
    the same key; another family or size does not.
    """
    key = last_path_component(name_or_path).lower()
    for suffix in _QUANTISED_COPY_SUFFIXES:
        if key.endswith(suffix):
            return key.removesuffix(suffix)
    return key


def last_path_component(name_or_path: str) -> str:
    """`google/gemma-4-E2B-it` -> `gemma-4-E2B-it`; also for Windows paths and trailing slashes."""
    return re.split(r"[/\\]", name_or_path.strip().rstrip("/\\"))[-1]


def _read_json_object(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def _checkpoint_files(model_dir: Path) -> list[Path]:
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    index = model_dir / SHARD_INDEX
    if index.is_file():
        weight_map = _read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map")
        return [model_dir / shard for shard in sorted(set(weight_map.values()))]
    raise FileNotFoundError(f"no {SINGLE_FILE} or {SHARD_INDEX} in {model_dir}")


def _checkpoint_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for path in _checkpoint_files(model_dir):
        shapes.update(read_tensor_shapes(path))
    return shapes


def read_tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a safetensors file, from its header (no tensor data is read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
