"""Check a PEFT LoRA adapter folder against the served base model before the engine sees it.

vLLM 0.32 accepts many broken adapters silently: weights under a module prefix it does not
map, targets it does not adapt (the vision tower without tower LoRA) and all-zero `lora_B`
all load and change nothing. `validate_adapter` reads tensor names the way vLLM does (every
spelling its Gemma 4 mapper serves is accepted, see `adapters.names`), checks them against the
checkpoint's real shapes, and refuses what would be ignored or half-applied with a message a
client can act on. A tower part the server does not apply is dropped only when that is exact
(all its `lora_B` zero, or no media accepted) or when the client asks (`drop_tower_weights`);
`write_served_copy` then writes the weights without it. Only the safetensors header and the
`lora_B` tensors needed are read. Messages never hold file-system paths.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.base_model import (
    WRAPPED_LINEAR_SUFFIX,
    BaseModelSpec,
    LinearShape,
    ModuleGroup,
    base_name_key,
    last_path_component,
    module_group,
    module_kind,
)
from adapters.errors import AdapterNotFound, AdapterTooLarge, InvalidAdapter
from adapters.names import PEFT_PREFIX, checkpoint_module

if TYPE_CHECKING:
    import torch

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt")
MAX_CONFIG_BYTES = 1 << 20
_HASH_CHUNK_BYTES = 1 << 20
_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})  # safetensors' dtype names
_REGEX_TIMEOUT_SECONDS = 0.1  # CPU seconds one module name's match may take
_MAX_SHOWN_CHARS = 200  # room for a full tensor name

_LAYER_INDEX = re.compile(r"model\.language_model\.layers\.\d+\.")
_LORA_TENSOR = re.compile(r"(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight")
_LANGUAGE_TARGETS_REGEX = r".*language_model\..*"
# PEFT inits that only set the starting weights: the saved adapter is plain LoRA (vLLM's list).
_PLAIN_LORA_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
# Config switches for PEFT features that vLLM 0.32 refuses or ignores, with the reason.
_UNSUPPORTED_FEATURES: tuple[tuple[str, str], ...] = (
    ("use_dora", "DoRA (use_dora) is not supported by vLLM 0.32; retrain without DoRA"),
    ("lora_bias", "LoRA bias (lora_bias) is not supported by vLLM"),
    ("alora_invocation_tokens", "Activated LoRA (alora_invocation_tokens) is not supported"),
    ("layer_replication", "layer_replication is not supported by vLLM"),
    ("use_bdlora", "block-diagonal LoRA (use_bdlora) is not supported by vLLM"),
    ("use_qalora", "QALoRA (use_qalora) is not supported by vLLM"),
    (
        "trainable_token_indices",
        "trainable tokens (trainable_token_indices) change the embeddings, which vLLM 0.32 "
        "does not adapt",
    ),
    (
        "target_parameters",
        "LoRA on raw parameters (target_parameters) is not supported for this model",
    ),
)


@dataclass(frozen=True)
class ValidationLimits:
    """Server limits an adapter must fit."""

    max_rank: int  # the engine's max_lora_rank
    max_adapter_bytes: int
    allow_pickle: bool = False  # accept adapter_model.bin, read with torch.load(weights_only=True)
    tower_lora: bool = False  # the engine adapts the vision tower and embed_vision
    accepts_media: bool = True  # some request may carry an image or audio (the towers run)


class DropReason(enum.StrEnum):
    """Why a tower part of an adapter is not served; `meaning` says what requests get."""

    ZERO = "zero_lora_b"
    NO_MEDIA = "no_media"
    REQUESTED = "requested"

    @property
    def meaning(self) -> str:
        return _DROP_MEANINGS[self]


_DROP_MEANINGS = {
    DropReason.ZERO: "every lora_B of the dropped part is zero: exact for every request",
    DropReason.NO_MEDIA: "this server accepts no images or audio: exact for every request",
    DropReason.REQUESTED: (
        "dropped on request (drop_tower_weights): exact for text requests; image and audio "
        "requests get neither the base model nor the fine-tune"
    ),
}


@dataclass(frozen=True)
class AdapterManifest:
    """What validation learnt about an adapter: enough to register and describe it."""

    rank: int  # the largest rank of any module: `r`, or more through rank_pattern
    lora_alpha: float
    target_modules: list[str]  # kinds actually adapted, e.g. ["q_proj", "v_proj"], sorted
    module_count: int  # modules with a lora_A/lora_B pair
    weights_file: str  # file name inside the adapter folder
    weights_bytes: int
    sha256: str  # of the weights file
    base_model_name_or_path: str  # as the adapter declares it; "" when it does not
    dropped_modules: tuple[str, ...] = ()  # checkpoint names of the tower modules not served
    dropped_tensors: tuple[str, ...] = ()  # their tensors, as named in the weights file
    drop_reason: DropReason | None = None
    serves_towers: bool = False  # some served module is in the vision tower or embed_vision

    @property
    def drops(self) -> bool:
        """Whether the engine must get a copy of the weights without `dropped_tensors`."""
        return bool(self.dropped_tensors)


def validate_adapter(
    folder: Path,
    base: BaseModelSpec,
    limits: ValidationLimits,
    *,
    allow_base_mismatch: bool = False,
    drop_tower_weights: bool = False,
) -> AdapterManifest:
    """Check the adapter in `folder` against `base` and `limits`; return its manifest.

    A tower part the server does not apply is dropped (listed in the manifest) when all its
    `lora_B` are zero, when `limits.accepts_media` is off, or with `drop_tower_weights`;
    otherwise it is refused. Raises AdapterNotFound when the folder does not exist,
    AdapterTooLarge when the weights file exceeds `limits.max_adapter_bytes`, and
    InvalidAdapter for every other defect.
    """
    folder = Path(folder)
    if not folder.exists():
        raise AdapterNotFound("adapter folder not found")
    if not folder.is_dir():
        raise InvalidAdapter("adapter path is not a folder")

    config = _read_config(folder / CONFIG_FILE)
    _check_peft_type(config)
    _check_features(config)
    rank_pattern = _rank_pattern(config)
    rank = _check_rank(config, rank_pattern, limits)
    lora_alpha = _lora_alpha(config)
    declared_base = _check_base_model(config, base, allow_base_mismatch)
    is_targeted = _check_target_modules(config, base, limits)

    weights_path = _weights_path(folder, limits)
    weights_bytes = _file_size(weights_path)
    if weights_bytes > limits.max_adapter_bytes:
        raise AdapterTooLarge(
            f"adapter weights are {weights_bytes:,} bytes, above this server's limit of "
            f"{limits.max_adapter_bytes:,} bytes"
        )
    weights = _TensorFile.open(weights_path)
    modules = _check_tensors(weights, base, is_targeted)
    _check_shapes(modules, base, weights, config["r"], rank_pattern)
    dropped, reason = _tower_part_to_drop(weights, modules, limits, drop_tower_weights)
    served = {m: parts for m, parts in modules.items() if m not in dropped}
    _check_lora_b_not_all_zero(weights, served, dropped=bool(dropped))

    return AdapterManifest(
        rank=rank,
        lora_alpha=lora_alpha,
        target_modules=sorted({module_kind(m) for m in served}),
        module_count=len(served),
        weights_file=weights_path.name,
        weights_bytes=weights_bytes,
        sha256=_sha256(weights_path),
        base_model_name_or_path=declared_base,
        dropped_modules=tuple(sorted(dropped)),
        dropped_tensors=tuple(sorted(t for m in dropped for t in modules[m].values())),
        drop_reason=reason,
        serves_towers=any(module_group(m).is_tower for m in served),
    )


# --- adapter_config.json ---------------------------------------------------------------


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InvalidAdapter(f"adapter folder has no {CONFIG_FILE}")
    if _file_size(path) > MAX_CONFIG_BYTES:
        raise InvalidAdapter(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES:,} bytes")
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        raise InvalidAdapter(
            f"{CONFIG_FILE} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except (ValueError, OSError):
        raise InvalidAdapter(f"{CONFIG_FILE} could not be read as UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise InvalidAdapter(f"{CONFIG_FILE} must hold a JSON object, not {_json_type(data)}")
    return data


def _check_peft_type(config: dict[str, Any]) -> None:
    peft_type = config.get("peft_type")
    # PEFT always writes it; hand-made LoRA configs sometimes leave it out, as vLLM allows.
    if peft_type is not None and (not isinstance(peft_type, str) or peft_type.upper() != "LORA"):
        raise InvalidAdapter(
            f"adapter is peft_type {_shown(peft_type)}, not LORA; this server serves LoRA "
            "adapters only"
        )


def _check_features(config: dict[str, Any]) -> None:
    for key, reason in _UNSUPPORTED_FEATURES:
        if config.get(key):
            raise InvalidAdapter(reason)
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise InvalidAdapter(f"adapter trains biases (bias={_shown(bias)}); vLLM supports none")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _PLAIN_LORA_INITS:
        raise InvalidAdapter(
            f"init_lora_weights={_shown(init)} (PiSSA, OLoRA, CorDA or LoftQ) changes the base "
            "model's weights, which vLLM does not do; convert it to a plain LoRA adapter first"
        )
    modules_to_save = config.get("modules_to_save")
    if modules_to_save:
        raise InvalidAdapter(
            f"modules_to_save {_shown(modules_to_save)} trains full copies of modules; "
            "vLLM 0.32 serves LoRA on the language model's projections only"
        )


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _rank_pattern(config: dict[str, Any]) -> dict[str, int]:
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict) or not all(_is_positive_int(v) for v in pattern.values()):
        raise InvalidAdapter("rank_pattern must map module names to positive integer ranks")
    return pattern


def _check_rank(
    config: dict[str, Any], rank_pattern: dict[str, int], limits: ValidationLimits
) -> int:
    if "r" not in config:
        raise InvalidAdapter(f"{CONFIG_FILE} has no LoRA rank r")
    r = config["r"]
    if not _is_positive_int(r):
        raise InvalidAdapter(f"LoRA rank r must be a positive integer, not {_shown(r)}")
    rank = max([r, *rank_pattern.values()])
    if rank > limits.max_rank:
        raise InvalidAdapter(
            f"adapter has LoRA rank {rank}, above this server's limit of {limits.max_rank}; "
            "the server's max_lora_rank must be raised to load it"
        )
    return int(rank)


def _lora_alpha(config: dict[str, Any]) -> float:
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise InvalidAdapter(f"lora_alpha must be a number, not {_shown(alpha)}")
    if alpha == 0:
        raise InvalidAdapter("lora_alpha is 0, so the adapter would not change the model")
    return float(alpha)


def _check_base_model(config: dict[str, Any], base: BaseModelSpec, allow_mismatch: bool) -> str:
    declared = config.get("base_model_name_or_path") or ""
    if not isinstance(declared, str):
        raise InvalidAdapter("base_model_name_or_path must be a string")
    # Only the last component: it may be a path on the training machine, never to be echoed.
    trained_for = last_path_component(declared)
    accepted = base.accepted_base_names()
    if trained_for and not allow_mismatch and base_name_key(trained_for) not in accepted:
        raise InvalidAdapter(
            f"adapter was trained for {_shown(trained_for)}, this server serves "
            f"{_shown(base.served_name)}; pass allow_base_mismatch to load it anyway"
        )
    return declared


# --- target_modules ----------------------------------------------------------------------


def _regex_matcher(pattern_text: str, field: str) -> Callable[[str], bool]:
    """`fullmatch` for a regex from the adapter, refused if it is invalid or too slow."""
    import regex  # re has no timeout, and an adapter's regex could backtrack for hours

    try:
        pattern = regex.compile(pattern_text)
    except (regex.error, TypeError, ValueError):
        raise InvalidAdapter(f"{field} is not a valid regular expression") from None

    def fullmatch(name: str) -> bool:
        # `regex`'s timeout is wall-clock time: on a busy machine the thread can wait for a core
        # longer than the limit while the match itself costs microseconds. Only CPU time the
        # thread spent refuses the regex; time spent waiting doubles the wall limit and retries.
        cpu_started = time.thread_time()
        wall_limit = _REGEX_TIMEOUT_SECONDS
        while True:
            try:
                return pattern.fullmatch(name, timeout=wall_limit) is not None
            except TimeoutError:
                if time.thread_time() - cpu_started >= _REGEX_TIMEOUT_SECONDS:
                    raise InvalidAdapter(
                        f"{field} is a regular expression too slow to evaluate"
                    ) from None
                wall_limit *= 2

    return fullmatch


def _module_matcher(value: object, field: str) -> Callable[[str], bool]:
    """PEFT's rule: a string is a regex that must match the whole name; a list names suffixes."""
    if isinstance(value, str):
        return _regex_matcher(value, field)
    if isinstance(value, list) and value and all(isinstance(k, str) and k for k in value):
        keys = tuple(value)
        return lambda name: any(name == k or name.endswith("." + k) for k in keys)
    raise InvalidAdapter(f"{field} must be a non-empty list of module names or a regex string")


def _spellings(module: str) -> tuple[str, ...]:
    """A checkpoint module's name as adapters trained on other Gemma 4 classes spell it."""
    if module.startswith("model.language_model."):
        rest = module.removeprefix("model.language_model.")
        return (module, f"language_model.model.{rest}", f"model.{rest}")
    return (module, module.removeprefix("model."))


def _check_target_modules(
    config: dict[str, Any], base: BaseModelSpec, limits: ValidationLimits
) -> Callable[[str], bool]:
    """Refuse targets that cannot adapt anything here; return PEFT's "is this module targeted"."""
    targets = config.get("target_modules")
    if targets is None:
        raise InvalidAdapter(f"{CONFIG_FILE} has no target_modules")
    if targets == "all-linear":  # PEFT's shorthand: every Linear but the output layer
        linear_names = {s for m in base.linear_modules for s in _spellings(m)}
        matches_target: Callable[[str], bool] = linear_names.__contains__
    else:
        matches_target = _module_matcher(targets, "target_modules")
    excluded = config.get("exclude_modules")
    matches_excluded = _module_matcher(excluded, "exclude_modules") if excluded else None

    def is_targeted(name: str) -> bool:
        return matches_target(name) and not (matches_excluded and matches_excluded(name))

    targeted = sorted(n for n in base.module_names if any(map(is_targeted, _spellings(n))))
    if not targeted:
        raise InvalidAdapter(
            f"target_modules {_shown(targets)} matches no module of the base model; "
            "Gemma 4's are named like model.language_model.layers.0.self_attn.q_proj"
        )
    embeddings = [n for n in targeted if module_group(n) is ModuleGroup.EMBEDDING]
    if embeddings:
        raise InvalidAdapter(
            f"target_modules names {_names(module_kind(n) for n in embeddings)}; vLLM 0.32 "
            "serves LoRA on the language model's Linear layers only, not on lm_head or "
            "embeddings"
        )
    # A list such as ["q_proj"] also matches the towers' wrapper modules, which PEFT cannot
    # adapt; the weights decide whether such an adapter touches a tower.
    if not any(module_group(n).adaptable(tower_lora=limits.tower_lora) for n in targeted):
        raise InvalidAdapter(_not_adaptable_message("target_modules", targeted, limits))
    return is_targeted


def _not_adaptable_message(subject: str, modules: list[str], limits: ValidationLimits) -> str:
    groups = sorted({module_group(m) for m in modules}, key=lambda g: g.value)
    towers = [g for g in groups if g.is_tower and not g.adaptable(tower_lora=limits.tower_lora)]
    if towers:
        where = " and the ".join(g.value for g in towers)
        example = next(m for m in modules if module_group(m) in towers)
        way_out = (
            "audio-tower LoRA is not served (unproven in vLLM 0.32)"
            if all(g.is_audio for g in towers)
            else "start the server with --enable-tower-lora for the vision tower"
        )
        return (
            f"{subject} targets the {where} (e.g. {example}), which this server does not adapt; "
            f"{way_out}, or target the language model (e.g. "
            f'target_modules="{_LANGUAGE_TARGETS_REGEX}")'
        )
    return (
        f"{subject} targets {modules[0]}, which this server does not adapt: it adapts the "
        "language model's Linear layers"
        + (", the vision tower and embed_vision" if limits.tower_lora else "")
    )


# --- weights -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _TensorInfo:
    shape: tuple[int, ...]
    is_float: bool


class _TensorFile:
    """The adapter's weights: names, shapes and dtypes up front, tensor data on demand."""

    def __init__(
        self, name: str, infos: dict[str, _TensorInfo], read: Callable[[list[str]], Iterator[Any]]
    ) -> None:
        self.name = name
        self.infos = infos
        self._read = read

    @classmethod
    def open(cls, path: Path) -> _TensorFile:
        """Read the header of a safetensors file, or all of a pickle with weights_only=True."""
        if path.name == SAFETENSORS_FILE:
            return cls._open_safetensors(path)
        return cls._open_pickle(path)

    @classmethod
    def _open_safetensors(cls, path: Path) -> _TensorFile:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                slices = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118
                infos = {
                    name: _TensorInfo(tuple(s.get_shape()), s.get_dtype() in _FLOAT_DTYPES)
                    for name, s in slices.items()
                }
        except Exception:  # safetensors raises its own error type, or OSError, on any damage
            raise InvalidAdapter(f"{SAFETENSORS_FILE} is not a readable safetensors file") from None

        def read(names: list[str]) -> Iterator[Any]:
            with safe_open(str(path), framework="pt") as f:
                for name in names:
                    yield f.get_tensor(name)

        return cls(path.name, infos, read)

    @classmethod
    def _open_pickle(cls, path: Path) -> _TensorFile:
        import torch

        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # weights_only refuses anything but plain tensors and containers
            raise InvalidAdapter(
                f"{path.name} could not be read as plain tensors (torch.load, weights_only)"
            ) from None
        if not isinstance(loaded, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
        ):
            raise InvalidAdapter(f"{path.name} must hold a mapping of names to tensors")
        infos = {k: _TensorInfo(tuple(v.shape), v.is_floating_point()) for k, v in loaded.items()}
        return cls(path.name, infos, lambda names: (loaded[n] for n in names))

    def tensors(self, names: Iterable[str]) -> Iterator[torch.Tensor]:
        """The named tensors' data, in order."""
        return self._read(list(names))


def _weights_path(folder: Path, limits: ValidationLimits) -> Path:
    safetensors_path = folder / SAFETENSORS_FILE
    if safetensors_path.is_file():
        return safetensors_path
    pickles = [folder / name for name in PICKLE_FILES if (folder / name).is_file()]
    if not pickles:
        raise InvalidAdapter(f"adapter folder has no {SAFETENSORS_FILE}")
    if not limits.allow_pickle:
        raise InvalidAdapter(
            f"adapter weights are only in {pickles[0].name}, a pickle; loading a pickle can run "
            f"code, so this server accepts {SAFETENSORS_FILE} only (convert the weights)"
        )
    return pickles[0]


def _expected_tensor_name(base: BaseModelSpec) -> str:
    modules = sorted(base.modules_in(ModuleGroup.LANGUAGE_MODEL))
    preferred = [m for m in modules if m.endswith("layers.0.self_attn.q_proj")]
    module = (preferred or modules or ["model.language_model.layers.0.self_attn.q_proj"])[0]
    return f"{PEFT_PREFIX}{module}.lora_A.weight"


def _check_tensors(
    weights: _TensorFile, base: BaseModelSpec, is_targeted: Callable[[str], bool]
) -> dict[str, dict[str, str]]:
    """Map every tensor to its checkpoint module: module -> {"lora_A"/"lora_B": tensor name}.

    Names are read as vLLM reads them (`adapters.names`), so every spelling it serves maps to
    the same checkpoint module; a name vLLM would load and never apply is refused.
    """
    if not weights.infos:
        raise InvalidAdapter(f"{weights.name} holds no tensors")
    expected = _expected_tensor_name(base)
    modules: dict[str, dict[str, str]] = {}
    for name in sorted(weights.infos):
        if "lora_magnitude_vector" in name:
            raise InvalidAdapter(
                f"tensor {_shown(name)} is a DoRA magnitude; vLLM 0.32 does not support DoRA"
            )
        if "lora_embedding_A" in name or "lora_embedding_B" in name:
            raise InvalidAdapter(
                f"tensor {_shown(name)} adapts an embedding; vLLM 0.32 serves LoRA on the "
                "language model's Linear layers only"
            )
        match = _LORA_TENSOR.fullmatch(name)
        if match is None:
            raise InvalidAdapter(
                f"tensor {_shown(name)} is not a PEFT LoRA weight; expected names like {expected!r}"
            )
        own_name = match.group("module").removeprefix(PEFT_PREFIX)  # PEFT's module name
        module = checkpoint_module(own_name)
        if module is None:
            raise InvalidAdapter(_ignored_name_message(name, own_name, expected))
        group = module_group(module)
        if group is ModuleGroup.EMBEDDING:
            raise InvalidAdapter(
                f"tensor {_shown(name)} adapts {module_kind(module)}; vLLM 0.32 serves LoRA on "
                "the language model's Linear layers only, not on lm_head or embeddings"
            )
        if module not in base.linear_modules:
            raise InvalidAdapter(_unknown_module_message(name, module, group, base, expected))
        if group is ModuleGroup.OTHER:
            raise InvalidAdapter(
                f"tensor {_shown(name)} adapts {module}, which this server does not adapt"
            )
        if not (is_targeted(own_name) or is_targeted(module)):
            raise InvalidAdapter(
                f"tensor {_shown(name)} adapts {module}, which target_modules does not name; "
                "PEFT would ignore it while vLLM applies it"
            )
        if not weights.infos[name].is_float:
            raise InvalidAdapter(f"tensor {_shown(name)} is not a floating-point tensor")
        parts = modules.setdefault(module, {})
        part = match.group("part")
        if part in parts:
            raise InvalidAdapter(
                f"tensors {_shown(parts[part])} and {_shown(name)} are both the {part} of "
                f"{module} (two spellings of one module)"
            )
        parts[part] = name
    for module, parts in modules.items():
        for part, other in (("lora_A", "lora_B"), ("lora_B", "lora_A")):
            if part not in parts:
                raise InvalidAdapter(f"module {module} has {other} but no {part}")
    return modules


def _ignored_name_message(name: str, own_name: str, expected: str) -> str:
    if own_name.startswith("language_model.layers.") or own_name.startswith(
        "language_model.per_layer"
    ):
        # PEFT on Gemma4Model (no `model.` level): vLLM maps it to no module.
        return (
            f"tensor {_shown(name)} is named after Gemma4Model (language_model.layers...); vLLM "
            f"0.32 would load it and never apply it; rename it like {expected!r} (insert "
            "`model.` before `language_model`)"
        )
    return (
        f"tensor {_shown(name)} names no module of the base model; vLLM 0.32 would load it and "
        f"never apply it; expected names like {expected!r}: was the adapter saved with another "
        "module prefix?"
    )


def _unknown_module_message(
    name: str, module: str, group: ModuleGroup, base: BaseModelSpec, expected: str
) -> str:
    wrapped = module + WRAPPED_LINEAR_SUFFIX
    if group.is_tower and wrapped in base.linear_modules:
        return (
            f"tensor {_shown(name)} names the Gemma4ClippableLinear wrapper {module}; vLLM 0.32 "
            f"would load it and never apply it; the Linear inside is {wrapped} (tensor names "
            f"like '{PEFT_PREFIX}{wrapped}.lora_A.weight')"
        )
    if group is ModuleGroup.LANGUAGE_MODEL and module in base.module_names:
        return f"tensor {_shown(name)} adapts {module}, which is not a Linear layer"
    if group is ModuleGroup.LANGUAGE_MODEL and _LAYER_INDEX.match(module):
        return (
            f"tensor {_shown(name)} adapts {module}, which the base model does not have (its "
            f"language model has {base.language_layer_count} layers); was it trained for "
            "another model?"
        )
    return (
        f"tensor {_shown(name)} names no module of the base model; vLLM 0.32 would load it and "
        f"never apply it; expected names like {expected!r}: was the adapter saved with another "
        "module prefix?"
    )


def _module_rank(module: str, r: int, rank_pattern: dict[str, int]) -> int:
    # vLLM's and PEFT's rule: the first key that is a dotted suffix of the module name wins.
    for key, rank in rank_pattern.items():
        if _regex_matcher(rf"(.*\.)?({key})", "a rank_pattern key")(module):
            return rank
    return r


def _check_shapes(
    modules: dict[str, dict[str, str]],
    base: BaseModelSpec,
    weights: _TensorFile,
    r: int,
    rank_pattern: dict[str, int],
) -> None:
    for module, parts in sorted(modules.items()):
        shape: LinearShape = base.linear_modules[module]
        rank = _module_rank(module, r, rank_pattern)
        expected = {
            "lora_A": (rank, shape.in_features),
            "lora_B": (shape.out_features, rank),
        }
        for part, tensor_name in sorted(parts.items()):
            actual = weights.infos[tensor_name].shape
            if actual != expected[part]:
                raise InvalidAdapter(
                    f"{part} of {module} has shape {list(actual)}, expected "
                    f"{list(expected[part])} (rank {rank}, the module is "
                    f"{shape.in_features} -> {shape.out_features})"
                )


def _tower_part_to_drop(
    weights: _TensorFile,
    modules: dict[str, dict[str, str]],
    limits: ValidationLimits,
    requested: bool,
) -> tuple[set[str], DropReason | None]:
    """The tower modules this server does not apply, and why dropping them is allowed.

    vLLM would load such a part and never apply it: an adapter half-applied in silence. It is
    dropped when that is exact, or when the client asks; otherwise the adapter is refused.
    """
    unserved = {m for m in modules if not module_group(m).adaptable(tower_lora=limits.tower_lora)}
    if not unserved:
        return set(), None
    b_names = [modules[m]["lora_B"] for m in sorted(unserved)]
    nonzero = next(
        (n for n, t in zip(b_names, weights.tensors(b_names), strict=True) if bool(t.any())),
        None,
    )
    if nonzero is None:
        return unserved, DropReason.ZERO
    if not limits.accepts_media:
        return unserved, DropReason.NO_MEDIA
    if requested:
        return unserved, DropReason.REQUESTED
    groups = sorted({module_group(m) for m in unserved}, key=lambda g: g.value)
    names = [g.value for g in groups]
    where = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    why = []
    if any(not g.is_audio for g in groups):
        why.append("tower LoRA is off")
    if any(g.is_audio for g in groups):
        why.append("audio-tower LoRA is not served: unproven in vLLM 0.32")
    enable = (
        ", or start the server with --enable-tower-lora (vision tower and embed_vision)"
        if any(not g.is_audio for g in groups)
        else ""
    )
    # The way out comes first: error messages are cut at 500 characters.
    raise InvalidAdapter(
        f"the adapter's {where} part has non-zero lora_B, which this server does not apply "
        f"({'; '.join(why)}): send drop_tower_weights=true to serve the adapter without that "
        "part (exact for text requests; image and audio requests then get neither the base "
        f"model nor the fine-tune){enable}. First such tensor: {_shown(nonzero)}"
    )


def _check_lora_b_not_all_zero(
    weights: _TensorFile, modules: dict[str, dict[str, str]], *, dropped: bool
) -> None:
    if not modules:
        raise InvalidAdapter(
            "without its tower part the adapter adapts nothing this server applies"
        )
    # Stops at the first non-zero lora_B, so a working adapter costs one tensor read.
    b_names = [parts["lora_B"] for _, parts in sorted(modules.items())]
    if not any(bool(tensor.any()) for tensor in weights.tensors(b_names)):
        raise InvalidAdapter(
            "every lora_B"
            + (" outside the dropped tower part" if dropped else "")
            + " is all zeros (as PEFT initialises them), so the adapter would not change the "
            "model; was it saved before training?"
        )


def write_served_copy(folder: Path, manifest: AdapterManifest, dest: Path) -> Path:
    """Write the adapter in `folder` without `manifest.dropped_tensors` to `dest`; return it.

    The original is never modified; the copy is always safetensors (also for a pickle
    original, read with weights_only) and its config is the original's.
    """
    from safetensors.torch import save_file

    weights = _TensorFile.open(folder / manifest.weights_file)
    kept = sorted(set(weights.infos) - set(manifest.dropped_tensors))
    tensors = {name: t.contiguous() for name, t in zip(kept, weights.tensors(kept), strict=True)}
    dest.mkdir(parents=True, exist_ok=True)
    (dest / CONFIG_FILE).write_bytes((folder / CONFIG_FILE).read_bytes())
    save_file(tensors, str(dest / SAFETENSORS_FILE), metadata={"format": "pt"})
    return dest


# --- helpers -----------------------------------------------------------------------------


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        raise InvalidAdapter(f"{path.name} could not be read") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
    except OSError:
        raise InvalidAdapter(f"{path.name} could not be read") from None
    return digest.hexdigest()


def _shown(value: object) -> str:
    """A client-safe rendering of a value from the adapter: repr, capped in length."""
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN_CHARS else text[: _MAX_SHOWN_CHARS - 3] + "..."


def _names(names: Iterable[str]) -> str:
    return ", ".join(sorted(set(names)))


def _json_type(value: object) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )
