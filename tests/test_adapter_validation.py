"""Unit tests of adapter validation: each test breaks one thing in a copy of a demo adapter."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapters.base_model import BaseModelSpec, ModuleGroup, module_group
from adapters.errors import AdapterError, AdapterNotFound, AdapterTooLarge, InvalidAdapter
from adapters.validation import (
    AdapterManifest,
    DropReason,
    ValidationLimits,
    validate_adapter,
    write_served_copy,
)
from server.testbed.default_model import DefaultModel
from server.testbed.demo_adapters import DemoAdapterSpec, load_base_model, write_demo_adapter

SERVED_NAME = "tiny-gemma4"
LIMITS = ValidationLimits(max_rank=16, max_adapter_bytes=10 * 2**20)
BLOCK_OF_KIND = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
KINDS = tuple(BLOCK_OF_KIND)
LAYER_COUNT = 4
PREFIX = "base_model.model."
VISION_Q = "model.vision_tower.encoder.layers.0.self_attn.q_proj.linear"
PER_LAYER_MODEL_PROJECTION = "model.language_model.per_layer_model_projection"
LIMITS_RANK_8 = ValidationLimits(max_rank=8, max_adapter_bytes=LIMITS.max_adapter_bytes)
_DELETE = object()  # edit_config: remove the key

Tensors = dict[str, torch.Tensor]


class CopyAdapter(Protocol):
    def __call__(self, name: str = "demo-attn") -> Path: ...


@pytest.fixture(scope="module")
def base(tiny: DefaultModel) -> BaseModelSpec:
    return BaseModelSpec.from_model_dir(tiny.model_dir, SERVED_NAME)


@pytest.fixture
def copy_adapter(tiny: DefaultModel, tmp_path: Path) -> CopyAdapter:
    """Copy a demo adapter into this test's tmp_path, to break it there."""

    def copy(name: str = "demo-attn") -> Path:
        return Path(shutil.copytree(tiny.adapter_dirs()[name], tmp_path / name))

    return copy


def edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def edit_tensors(folder: Path, edit: Callable[[Tensors], Tensors]) -> None:
    path = folder / "adapter_model.safetensors"
    save_file(edit(load_file(path)), path, metadata={"format": "pt"})


def refused(
    folder: Path,
    base: BaseModelSpec,
    error: type[AdapterError],
    phrase: str,
    limits: ValidationLimits = LIMITS,
    **kwargs: Any,
) -> str:
    """Assert validation fails with `error` naming `phrase`, without any absolute path."""
    with pytest.raises(error) as caught:
        validate_adapter(folder, base, limits, **kwargs)
    message = caught.value.message
    assert type(caught.value) is error, message
    assert phrase in message, message
    assert str(folder.parent) not in message and "/tmp" not in message, message
    assert not re.search(r"(^|[\s'\"(])/[\w.]", message), message
    return message


def test_base_model_lists_every_projection_with_checkpoint_shapes(
    tiny: DefaultModel, base: BaseModelSpec
) -> None:
    with safe_open(str(tiny.model_dir / "model.safetensors"), framework="pt") as f:
        file_shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    projections = base.modules_in(ModuleGroup.LANGUAGE_MODEL)
    expected_names = {
        f"model.language_model.layers.{layer}.{block}.{kind}"
        for layer in range(LAYER_COUNT)
        for kind, block in BLOCK_OF_KIND.items()
    } | {
        f"model.language_model.layers.{layer}.{kind}"
        for layer in range(LAYER_COUNT)
        for kind in ("per_layer_input_gate", "per_layer_projection")
    }
    assert set(projections) == expected_names | {PER_LAYER_MODEL_PROJECTION}
    for name, shape in projections.items():
        out_features, in_features = file_shapes[f"{name}.weight"]
        assert (shape.in_features, shape.out_features) == (in_features, out_features)
    # The full-attention layer has the wider heads: a check that shapes are per layer.
    assert projections["model.language_model.layers.3.self_attn.q_proj"] == (128, 256)
    assert base.adaptable_modules(tower_lora=False) == projections
    assert base.language_layer_count == LAYER_COUNT
    assert base.architectures == ("Gemma4ForConditionalGeneration",)
    assert base.model_type == "gemma4"


def test_base_model_groups_towers_and_never_adapts_embeddings(base: BaseModelSpec) -> None:
    assert base.linear_modules[VISION_Q] == (64, 64)
    assert module_group(VISION_Q) is ModuleGroup.VISION_TOWER
    assert module_group("model.embed_vision.embedding_projection").is_tower
    assert base.modules_in(ModuleGroup.AUDIO_TOWER)
    with_towers = base.adaptable_modules(tower_lora=True)
    assert VISION_Q in with_towers and "model.embed_vision.embedding_projection" in with_towers
    assert "model.embed_audio.embedding_projection" not in with_towers
    assert "model.language_model.embed_tokens" not in base.linear_modules
    assert module_group("model.language_model.embed_tokens") is ModuleGroup.EMBEDDING
    assert module_group("lm_head") is ModuleGroup.EMBEDDING
    gate = "model.language_model.layers.0.per_layer_input_gate"
    assert gate in base.linear_modules and module_group(gate) is ModuleGroup.LANGUAGE_MODEL
    assert module_group("model.embed_audio.embedding_projection") is ModuleGroup.AUDIO_EMBEDDER
    assert not ModuleGroup.AUDIO_TOWER.adaptable(tower_lora=True)


def test_base_model_reads_a_sharded_checkpoint(
    tiny: DefaultModel, base: BaseModelSpec, tmp_path: Path
) -> None:
    sharded = tmp_path / "tiny-gemma4"
    sharded.mkdir()
    shutil.copy(tiny.model_dir / "config.json", sharded)
    tensors = load_file(tiny.model_dir / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2]}
    shards["model-00002-of-00002.safetensors"] = names[1::2]
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, sharded / shard)
        weight_map.update(dict.fromkeys(shard_names, shard))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert BaseModelSpec.from_model_dir(sharded, SERVED_NAME) == base


@pytest.mark.parametrize(
    ("name", "rank", "kinds"),
    [
        ("demo-attn", 4, ["k_proj", "o_proj", "q_proj", "v_proj"]),
        ("demo-mlp", 8, ["down_proj", "gate_proj", "up_proj"]),
        ("demo-all", 16, sorted(KINDS)),
    ],
)
def test_demo_adapters_validate(
    tiny: DefaultModel, base: BaseModelSpec, name: str, rank: int, kinds: list[str]
) -> None:
    folder = tiny.adapter_dirs()[name]
    weights = folder / "adapter_model.safetensors"
    manifest = validate_adapter(folder, base, LIMITS)
    assert manifest == AdapterManifest(
        rank=rank,
        lora_alpha=float(rank),
        target_modules=kinds,
        module_count=LAYER_COUNT * len(kinds),
        weights_file="adapter_model.safetensors",
        weights_bytes=weights.stat().st_size,
        sha256=hashlib.sha256(weights.read_bytes()).hexdigest(),
        base_model_name_or_path=SERVED_NAME,
    )


def test_target_modules_as_a_list_of_names_is_accepted(
    copy_adapter: CopyAdapter, base: BaseModelSpec
) -> None:
    folder = copy_adapter("demo-attn")
    # Such a list also matches the towers' wrapper modules; the weights show it adapts none.
    edit_config(folder, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    assert validate_adapter(folder, base, LIMITS).module_count == 16


# --- the folder and its config ----------------------------------------------------------


def test_missing_folder_is_not_found(base: BaseModelSpec, tmp_path: Path) -> None:
    refused(tmp_path / "nowhere", base, AdapterNotFound, "adapter folder not found")


def test_a_file_is_not_an_adapter_folder(base: BaseModelSpec, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    refused(tmp_path / "file", base, InvalidAdapter, "not a folder")


def test_missing_config(copy_adapter: CopyAdapter, base: BaseModelSpec) -> None:
    folder = copy_adapter()
    (folder / "adapter_config.json").unlink()
    refused(folder, base, InvalidAdapter, "has no adapter_config.json")


def test_config_not_json(copy_adapter: CopyAdapter, base: BaseModelSpec) -> None:
    folder = copy_adapter()
    (folder / "adapter_config.json").write_text('{"r": 4,')
    refused(folder, base, InvalidAdapter, "adapter_config.json is not valid JSON")


def test_config_not_an_object(copy_adapter: CopyAdapter, base: BaseModelSpec) -> None:
    folder = copy_adapter()
    (folder / "adapter_config.json").write_text("[1, 2]")
    refused(folder, base, InvalidAdapter, "must hold a JSON object, not an array")


@pytest.mark.parametrize("peft_type", ["IA3", "LOHA", "LOKR"])
def test_peft_type_other_than_lora(
    copy_adapter: CopyAdapter, base: BaseModelSpec, peft_type: str
) -> None:
    folder = copy_adapter()
    edit_config(folder, peft_type=peft_type)
    refused(folder, base, InvalidAdapter, f"peft_type '{peft_type}', not LORA")


def test_rank_above_the_limit(copy_adapter: CopyAdapter, base: BaseModelSpec) -> None:
    folder = copy_adapter("demo-all")
    message = refused(
        folder, base, InvalidAdapter, "rank 16, above this server's limit of 8", LIMITS_RANK_8
    )
    assert "max_lora_rank must be raised" in message


def test_rank_pattern_above_the_limit(copy_adapter: CopyAdapter, base: BaseModelSpec) -> None:
    folder = copy_adapter("demo-attn")
    edit_config(folder, rank_pattern={"q_proj": 32})
    refused(folder, base, InvalidAdapter, "rank 32, above this server's limit of 16")


@pytest.mark.parametrize(
    ("r", "phrase"),
    [
        (_DELETE, "has no LoRA rank r"),
        (0, "positive integer, not 0"),
        (-4, "positive integer, not -4"),
        ("4", "positive integer, not '4'"),
        (4.0, "positive integer, not 4.0"),
        (True, "positive integer, not True"),
    ],
)
def test_rank_missing_or_not_a_positive_int(
    copy_adapter: CopyAdapter, base: BaseModelSpec, r: object, phrase: str
) -> None:
    folder = copy_adapter()
    edit_config(folder, r=r)
    refused(folder, base, InvalidAdapter, phrase)


def test_lora_alpha_zero_changes_nothing(copy_adapter: CopyAdapter, base: BaseModelSpec) -> None:
    folder = copy_adapter()
    edit_config(folder, lora_alpha=0)
    refused(folder, base, InvalidAdapter, "would not change the model")


def test_dora_config(copy_adapter: CopyAdapter, base: BaseModelSpec) -> None:
    folder = copy_adapter()
    edit_config(folder, use_dora=True)
    refused(folder, base, InvalidAdapter, "DoRA (use_dora) is not supported by vLLM 0.32")


def test_dora_magnitude_tensor(copy_adapter: CopyAdapter, base: BaseModelSpec) -> None:
    folder = copy_adapter()
    module = f"{PREFIX}model.language_model.layers.0.self_attn.q_proj"
    edit_tensors(folder, lambda t: {**t, f"{module}.lora_magnitude_vector": torch.ones(128)})
    refused(folder, base, InvalidAdapter, "is a DoRA magnitude")


def test_bias_training(copy_adapter: CopyAdapter, base: BaseModelSpec) -> None:
    folder = copy_adapter()
    edit_config(folder, bias="all")
    refused(folder, base, InvalidAdapter, "adapter trains biases (bias='all')")


def test_modules_to_save(copy_adapter: CopyAdapter, base: BaseModelSpec) -> None:
    folder = copy_adapter()
    edit_config(folder, modules_to_save=["lm_head"])
    refused(folder, base, InvalidAdapter, "modules_to_save ['lm_head'] trains full copies")


# --- target_modules ---------------------------------------------------------------------


def test_target_modules_missing(copy_adapter: CopyAdapter, base: BaseModelSpec) -> None:
    folder = copy_adapter()
    edit_config(folder, target_modules=None)
    refused(folder, base, InvalidAdapter, "has no target_modules")


def test_target_modules_matching_nothing(copy_adapter: CopyAdapter, base: BaseModelSpec) -> None:
    folder = copy_adapter()
    edit_config(folder, target_modules=["query_key_value"])
    refused(folder, base, InvalidAdapter, "matches no module of the base model")


def test_target_modules_bad_regex(copy_adapter: CopyAdapter, base: BaseModelSpec) -> None:
    folder = copy_adapter()
    edit_config(folder, target_modules=r".*(q_proj")
    refused(folder, base, InvalidAdapter, "not a valid regular expression")


def test_target_modules_regex_too_slow(copy_adapter: CopyAdapter, base: BaseModelSpec) -> None:
    folder = copy_adapter()
    edit_config(folder, target_modules=r"(\w|\w\w|\.)+\d\d")  # backtracks for hours under re
    started = time.perf_counter()
    refused(folder, base, InvalidAdapter, "regular expression too slow to evaluate")
    assert time.perf_counter() - started < 5


def test_target_modules_regex_waiting_for_a_core_is_not_too_slow(
    copy_adapter: CopyAdapter, base: BaseModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A busy machine: the first match times out on the wall clock with no CPU spent."""
    import regex

    compile_regex = regex.compile
    starved = []

    class StarvedOnce:
        def __init__(self, pattern: Any) -> None:
            self._pattern = pattern

        def fullmatch(self, name: str, timeout: float) -> Any:
            if not starved:
                starved.append(name)
                time.sleep(timeout)  # waiting for a core: wall time passes, CPU time does not
                raise TimeoutError("regex timed out")
            return self._pattern.fullmatch(name, timeout=timeout)

    monkeypatch.setattr(regex, "compile", lambda text: StarvedOnce(compile_regex(text)))
    folder = copy_adapter()
    config = json.loads((folder / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], str)  # a regex, so the matcher runs
    assert validate_adapter(folder, base, LIMITS).rank > 0
    assert starved, "the wrapper was not used"


def test_targets_only_the_vision_tower(copy_adapter: CopyAdapter, base: BaseModelSpec) -> None:
    folder = copy_adapter()
    edit_config(folder, target_modules=r".*vision_tower.*\.(q|k|v|o)_proj")
    message = refused(folder, base, InvalidAdapter, "targets the vision tower")
    assert "which this server does not adapt; start the server with --enable-tower-lora" in message


def _add_vision_lora(tensors: Tensors, rank: int = 4) -> Tensors:
    seeded = torch.Generator().manual_seed(0)
    a = torch.randn(rank, 64, generator=seeded)
    b = torch.randn(64, rank, generator=seeded)
    return {
        **tensors,
        f"{PREFIX}{VISION_Q}.lora_A.weight": a,
        f"{PREFIX}{VISION_Q}.lora_B.weight": b,
    }


def test_vision_tower_weights_need_tower_lora_or_a_drop(
    copy_adapter: CopyAdapter, base: BaseModelSpec
) -> None:
    folder = copy_adapter()
    edit_config(folder, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "linear"])
    edit_tensors(folder, _add_vision_lora)
    message = refused(folder, base, InvalidAdapter, "vision tower part has non-zero lora_B")
    assert "send drop_tower_weights=true" in message.lower() and VISION_Q in message
    assert "--enable-tower-lora" in message
    with_towers = ValidationLimits(max_rank=16, max_adapter_bytes=2**24, tower_lora=True)
    manifest = validate_adapter(folder, base, with_towers)
    assert manifest.module_count == 17 and manifest.serves_towers and not manifest.drops
    dropped = validate_adapter(folder, base, LIMITS, drop_tower_weights=True)
    assert dropped.module_count == 16 and dropped.dropped_modules == (VISION_Q,)
    assert dropped.drop_reason is DropReason.REQUESTED and not dropped.serves_towers
    assert dropped.dropped_tensors == (
        f"{PREFIX}{VISION_Q}.lora_A.weight",
        f"{PREFIX}{VISION_Q}.lora_B.weight",
    )
    no_media = ValidationLimits(max_rank=16, max_adapter_bytes=2**24, accepts_media=False)
    assert validate_adapter(folder, base, no_media).drop_reason is DropReason.NO_MEDIA


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_lm_head_or_embeddings_in_target_modules(
    copy_adapter: CopyAdapter, base: BaseModelSpec, target: str
) -> None:
    folder = copy_adapter()
    edit_config(folder, target_modules=["q_proj", target])
    refused(folder, base, InvalidAdapter, f"target_modules names {target}; vLLM 0.32 serves")


def test_embedding_tensors(copy_adapter: CopyAdapter, base: BaseModelSpec) -> None:
    folder = copy_adapter()
    module = f"{PREFIX}model.language_model.embed_tokens"
    edit_tensors(folder, lambda t: {**t, f"{module}.lora_A.weight": torch.ones(4, 4096)})
    refused(folder, base, InvalidAdapter, "adapts embed_tokens; vLLM 0.32 serves LoRA")


def test_embedding_lora_tensors(copy_adapter: CopyAdapter, base: BaseModelSpec) -> None:
    folder = copy_adapter()
    module = f"{PREFIX}model.language_model.embed_tokens"
    edit_tensors(folder, lambda t: {**t, f"{module}.lora_embedding_A": torch.ones(4, 4096)})
    refused(folder, base, InvalidAdapter, "adapts an embedding")


def test_tensor_that_target_modules_does_not_name(
    copy_adapter: CopyAdapter, base: BaseModelSpec
) -> None:
    folder = copy_adapter("demo-mlp")
    attn = load_file(copy_adapter("demo-attn") / "adapter_model.safetensors")
    edit_tensors(folder, lambda t: {**t, **attn})
    refused(folder, base, InvalidAdapter, "which target_modules does not name")


# --- weights files ------------------------------------------------------------------------


def _to_pickle(folder: Path) -> Path:
    weights = folder / "adapter_model.safetensors"
    torch.save(load_file(weights), folder / "adapter_model.bin")
    weights.unlink()
    return folder / "adapter_model.bin"


def test_pickle_only_is_refused(copy_adapter: CopyAdapter, base: BaseModelSpec) -> None:
    folder = copy_adapter()
    _to_pickle(folder)
    message = refused(folder, base, InvalidAdapter, "only in adapter_model.bin, a pickle")
    assert "loading a pickle can run code" in message


def test_pickle_with_allow_pickle_is_checked_without_running_code(
    copy_adapter: CopyAdapter, base: BaseModelSpec
) -> None:
    folder = copy_adapter()
    pickle_path = _to_pickle(folder)
    allow = ValidationLimits(max_rank=16, max_adapter_bytes=2**24, allow_pickle=True)
    manifest = validate_adapter(folder, base, allow)
    assert manifest.weights_file == "adapter_model.bin" and manifest.module_count == 16
    assert manifest.sha256 == hashlib.sha256(pickle_path.read_bytes()).hexdigest()

    marker = folder / "pwned"
    torch.save({"x": _RunsCode(str(marker))}, pickle_path)
    refused(folder, base, InvalidAdapter, "could not be read as plain tensors", allow)
    assert not marker.exists()


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.marker),))


def test_no_weights_file(copy_adapter: CopyAdapter, base: BaseModelSpec) -> None:
    folder = copy_adapter()
    (folder / "adapter_model.safetensors").unlink()
    refused(folder, base, InvalidAdapter, "has no adapter_model.safetensors")


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: b"\x00garbage" * 64, id="garbage"),
        pytest.param(lambda data: (2**40).to_bytes(8, "little") + data[8:], id="header-size"),
    ],
)
def test_corrupt_safetensors(
    copy_adapter: CopyAdapter, base: BaseModelSpec, damage: Callable[[bytes], bytes]
) -> None:
    folder = copy_adapter()
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    refused(folder, base, InvalidAdapter, "is not a readable safetensors file")


def test_weights_too_large(copy_adapter: CopyAdapter, base: BaseModelSpec) -> None:
    folder = copy_adapter()
    small = ValidationLimits(max_rank=16, max_adapter_bytes=1000)
    refused(folder, base, AdapterTooLarge, "above this server's limit of 1,000 bytes", small)


# --- tensor names, pairs, shapes, values ---------------------------------------------------


def test_unknown_tensor_name(copy_adapter: CopyAdapter, base: BaseModelSpec) -> None:
    folder = copy_adapter()
    name = f"{PREFIX}model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight"
    edit_tensors(folder, lambda t: {**t, name: torch.ones(4, 128)})
    refused(folder, base, InvalidAdapter, "lora_A.default.weight' is not a PEFT LoRA weight")


@pytest.mark.parametrize(
    ("offending", "phrase"),
    [
        # PEFT on Gemma4Model: vLLM maps it to no module and never applies it.
        ("language_model.", "is named after Gemma4Model (language_model.layers...)"),
        ("model.model.language_model.", "names no module of the base model"),
        ("model.text_model.", "names no module of the base model"),
    ],
)
def test_module_prefix_vllm_would_ignore(
    copy_adapter: CopyAdapter, base: BaseModelSpec, offending: str, phrase: str
) -> None:
    """The real-world "loads and does nothing" bug: weights under a prefix vLLM does not map."""
    folder = copy_adapter()
    replace = "model.language_model."
    edit_tensors(folder, lambda t: {k.replace(replace, offending): v for k, v in t.items()})
    message = refused(folder, base, InvalidAdapter, phrase)
    assert f"'{PREFIX}{offending}layers.0.self_attn.k_proj.lora_A.weight'" in message
    assert "would load it and never apply it" in message
    expected = f"'{PREFIX}model.language_model.layers.0.self_attn.q_proj.lora_A.weight'"
    assert expected in message


def test_layer_the_base_model_does_not_have(copy_adapter: CopyAdapter, base: BaseModelSpec) -> None:
    folder = copy_adapter()
    edit_tensors(folder, lambda t: {k.replace("layers.3.", "layers.30."): v for k, v in t.items()})
    refused(folder, base, InvalidAdapter, "which the base model does not have")


def test_wrong_shape(copy_adapter: CopyAdapter, base: BaseModelSpec) -> None:
    folder = copy_adapter()
    name = f"{PREFIX}model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
    edit_tensors(folder, lambda t: {**t, name: torch.ones(4, 64)})
    refused(folder, base, InvalidAdapter, "has shape [4, 64], expected [4, 128]")


def test_rank_pattern_sets_the_expected_shape(
    copy_adapter: CopyAdapter, base: BaseModelSpec
) -> None:
    folder = copy_adapter()
    edit_config(folder, rank_pattern={"q_proj": 8})
    refused(
        folder, base, InvalidAdapter, "lora_A of model.language_model.layers.0.self_attn.q_proj"
    )


def test_missing_lora_b(copy_adapter: CopyAdapter, base: BaseModelSpec) -> None:
    folder = copy_adapter()
    name = f"{PREFIX}model.language_model.layers.1.self_attn.v_proj.lora_B.weight"
    edit_tensors(folder, lambda t: {k: v for k, v in t.items() if k != name})
    refused(folder, base, InvalidAdapter, "layers.1.self_attn.v_proj has lora_A but no lora_B")


def test_all_zero_lora_b(copy_adapter: CopyAdapter, base: BaseModelSpec) -> None:
    folder = copy_adapter()
    edit_tensors(
        folder,
        lambda t: {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in t.items()},
    )
    refused(folder, base, InvalidAdapter, "would not change the model")


def test_some_zero_lora_b_is_accepted(copy_adapter: CopyAdapter, base: BaseModelSpec) -> None:
    folder = copy_adapter()
    first_b = f"{PREFIX}model.language_model.layers.0.self_attn.k_proj.lora_B.weight"
    edit_tensors(folder, lambda t: {**t, first_b: torch.zeros_like(t[first_b])})
    assert validate_adapter(folder, base, LIMITS).module_count == 16


# --- base model name ------------------------------------------------------------------------


@pytest.mark.parametrize("declared", ["google/gemma-2-9b", "/home/alice/models/llama-3-8b"])
def test_base_model_mismatch(copy_adapter: CopyAdapter, base: BaseModelSpec, declared: str) -> None:
    folder = copy_adapter()
    edit_config(folder, base_model_name_or_path=declared)
    trained_for = declared.rsplit("/", 1)[-1]
    message = refused(folder, base, InvalidAdapter, f"trained for '{trained_for}'")
    assert "this server serves 'tiny-gemma4'; pass allow_base_mismatch" in message
    assert "alice" not in message
    manifest = validate_adapter(folder, base, LIMITS, allow_base_mismatch=True)
    assert manifest.base_model_name_or_path == declared


@pytest.mark.parametrize("declared", ["", None, "TINY-Gemma4", "/srv/models/tiny-gemma4/"])
def test_base_model_name_accepted(
    copy_adapter: CopyAdapter, base: BaseModelSpec, declared: str | None
) -> None:
    folder = copy_adapter()
    edit_config(folder, base_model_name_or_path=declared)
    validate_adapter(folder, base, LIMITS)


@pytest.mark.parametrize(
    "declared",
    [
        "unsloth/tiny-gemma4",
        "unsloth/tiny-gemma4-unsloth-bnb-4bit",
        "unsloth/TINY-GEMMA4-bnb-4bit",
        "google/Tiny-Gemma4",
    ],
)
def test_base_model_aliases_of_the_same_model(
    copy_adapter: CopyAdapter, base: BaseModelSpec, declared: str
) -> None:
    folder = copy_adapter()
    edit_config(folder, base_model_name_or_path=declared)
    validate_adapter(folder, base, LIMITS)


@pytest.mark.parametrize(
    "declared",
    ["unsloth/tiny-gemma3-unsloth-bnb-4bit", "unsloth/tiny-gemma4-2b-bnb-4bit", "tiny-gemma4-it"],
)
def test_base_model_aliases_go_no_further(
    copy_adapter: CopyAdapter, base: BaseModelSpec, declared: str
) -> None:
    folder = copy_adapter()
    edit_config(folder, base_model_name_or_path=declared)
    refused(folder, base, InvalidAdapter, "pass allow_base_mismatch")


# --- names: every spelling vLLM serves, checked against vLLM's own mapper --------------------

SPELLINGS = {
    "canonical": (
        "base_model.model.model.language_model.",
        "base_model.model.model.language_model.",
    ),
    "language_model.model": (
        "base_model.model.model.language_model.",
        "base_model.model.language_model.model.",
    ),
    "text model (model.layers)": (
        "base_model.model.model.language_model.",
        "base_model.model.model.",
    ),
    "no PEFT prefix": ("base_model.model.model.language_model.", "model.language_model."),
    "no PEFT prefix, model.layers": ("base_model.model.model.language_model.", "model."),
}


def test_name_mapping_is_vllms() -> None:
    """`adapters.names` replays vLLM 0.32's Gemma 4 mapper: same module name for every case."""
    from vllm.lora.utils import parse_fine_tuned_lora_name
    from vllm.model_executor.models.gemma4_mm import Gemma4ForConditionalGeneration

    from adapters.names import vllm_module_name

    mapper = Gemma4ForConditionalGeneration.hf_to_vllm_mapper.get_rename_mapper()
    modules = [
        "model.language_model.layers.0.self_attn.q_proj",
        "model.language_model.per_layer_model_projection",
        "model.language_model.layers.1.per_layer_input_gate",
        "model.language_model.layers.2.router.proj",
        "model.vision_tower.encoder.layers.0.mlp.up_proj.linear",
        "model.vision_tower.patch_embedder.input_proj",
        "model.embed_vision.embedding_projection",
        "model.audio_tower.layers.0.self_attn.relative_k_proj",
        "model.embed_audio.embedding_projection",
        "lm_head",
    ]
    spellings = [p for m in modules for p in (m, m.removeprefix("model."))]
    spellings += [
        "language_model.model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.up_proj",
        "model.model.language_model.layers.0.mlp.up_proj",
        "vision_tower.encoder.layers.0.self_attn.q_proj",
    ]
    for module in spellings:
        for prefix in ("", "base_model.model."):
            tensor = f"{prefix}{module}.lora_A.weight"
            vllm_name, _ = parse_fine_tuned_lora_name(tensor, mapper)
            assert vllm_module_name(prefix + module) == vllm_name, tensor


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_every_spelling_vllm_serves_is_accepted(
    copy_adapter: CopyAdapter, base: BaseModelSpec, spelling: str
) -> None:
    folder = copy_adapter("demo-all")
    canonical = validate_adapter(folder, base, LIMITS)
    old, new = SPELLINGS[spelling]
    edit_tensors(folder, lambda t: {k.replace(old, new): v for k, v in t.items()})
    renamed = validate_adapter(folder, base, LIMITS)
    assert (renamed.module_count, renamed.target_modules) == (
        canonical.module_count,
        canonical.target_modules,
    )


def test_two_spellings_of_one_module_are_refused(
    copy_adapter: CopyAdapter, base: BaseModelSpec
) -> None:
    folder = copy_adapter()
    old = f"{PREFIX}model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
    twin = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"
    edit_tensors(folder, lambda t: {**t, twin: t[old].clone()})
    refused(folder, base, InvalidAdapter, "(two spellings of one module)")


@pytest.mark.parametrize("tower_lora", [False, True])
def test_tower_name_without_the_clippable_linear_is_refused(
    copy_adapter: CopyAdapter, base: BaseModelSpec, tower_lora: bool
) -> None:
    folder = copy_adapter()
    edit_config(folder, target_modules=r".*\.(q|k|v|o)_proj")
    wrapper = VISION_Q.removesuffix(".linear")
    edit_tensors(
        folder,
        lambda t: {k.replace(VISION_Q, wrapper): v for k, v in _add_vision_lora(t).items()},
    )
    limits = ValidationLimits(max_rank=16, max_adapter_bytes=2**24, tower_lora=tower_lora)
    message = refused(
        folder, base, InvalidAdapter, "names the Gemma4ClippableLinear wrapper", limits
    )
    assert f"'{PREFIX}{VISION_Q}.lora_A.weight'" in message


# --- shapes people publish, built by PEFT on the tiny model ---------------------------------

_LANGUAGE_ALL = (
    r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
    r"|per_layer_input_gate|per_layer_projection|per_layer_model_projection)"
)
PUBLISHED = {
    "peft-default": DemoAdapterSpec("peft-default", 4, r".*language_model\..*\.(q_proj|v_proj)"),
    "language-all-linear": DemoAdapterSpec("language-all-linear", 4, _LANGUAGE_ALL),
    "all-linear": DemoAdapterSpec("all-linear", 4, "all-linear"),
}


@pytest.fixture(scope="module")
def published(tiny: DefaultModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Adapters shaped like published ones, written by PEFT (with random non-zero weights)."""
    out = tmp_path_factory.mktemp("published")
    model = load_base_model(tiny.model_dir)
    return {
        name: write_demo_adapter(tiny.model_dir, out / name, spec, seed=3, base=model)
        for name, spec in PUBLISHED.items()
    }


def _copy(published: dict[str, Path], name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(published[name], tmp_path / name))


def test_peft_default_targets(published: dict[str, Path], base: BaseModelSpec) -> None:
    manifest = validate_adapter(published["peft-default"], base, LIMITS)
    assert manifest.target_modules == ["q_proj", "v_proj"]
    assert manifest.module_count == 2 * LAYER_COUNT


def test_every_language_model_linear_with_per_layer_projections(
    published: dict[str, Path], base: BaseModelSpec
) -> None:
    manifest = validate_adapter(published["language-all-linear"], base, LIMITS)
    assert manifest.module_count == 9 * LAYER_COUNT + 1
    assert {"per_layer_input_gate", "per_layer_projection", "per_layer_model_projection"} <= set(
        manifest.target_modules
    )
    assert not manifest.drops


def _zero_tower_b(tensors: Tensors) -> Tensors:
    language = "model.language_model."
    return {
        k: torch.zeros_like(v) if "lora_B" in k and language not in k else v
        for k, v in tensors.items()
    }


def test_all_linear_with_trained_towers_is_refused_with_the_ways_out(
    published: dict[str, Path], base: BaseModelSpec
) -> None:
    folder = published["all-linear"]
    message = refused(folder, base, InvalidAdapter, "part has non-zero lora_B")
    assert "audio tower" in message and "vision tower" in message
    assert len(message.split("First such tensor")[0]) < 500  # the way out survives the cut
    assert "drop_tower_weights=true" in message and "--enable-tower-lora" in message
    with_towers = ValidationLimits(max_rank=16, max_adapter_bytes=2**24, tower_lora=True)
    message = refused(folder, base, InvalidAdapter, "audio-tower LoRA is not served", with_towers)
    assert "--enable-tower-lora" not in message and "vision" not in message


def test_all_linear_dropped_on_request(
    published: dict[str, Path], base: BaseModelSpec, tmp_path: Path
) -> None:
    folder = published["all-linear"]
    original = (folder / "adapter_model.safetensors").read_bytes()
    manifest = validate_adapter(folder, base, LIMITS, drop_tower_weights=True)
    assert manifest.drop_reason is DropReason.REQUESTED
    assert manifest.module_count == 9 * LAYER_COUNT + 1
    groups = {module_group(m) for m in manifest.dropped_modules}
    assert groups == {
        ModuleGroup.VISION_TOWER,
        ModuleGroup.VISION_EMBEDDER,
        ModuleGroup.AUDIO_TOWER,
        ModuleGroup.AUDIO_EMBEDDER,
    }
    assert "model.vision_tower.patch_embedder.input_proj" in manifest.dropped_modules
    assert "model.audio_tower.layers.0.self_attn.relative_k_proj" in manifest.dropped_modules

    served = write_served_copy(folder, manifest, tmp_path / "served")
    assert (folder / "adapter_model.safetensors").read_bytes() == original  # never modified
    kept = load_file(served / "adapter_model.safetensors")
    assert not set(kept) & set(manifest.dropped_tensors)
    assert len(kept) == 2 * manifest.module_count
    again = validate_adapter(served, base, LIMITS)
    assert not again.drops and again.module_count == manifest.module_count

    # With tower LoRA the vision part is served and only the audio part is dropped.
    with_towers = ValidationLimits(max_rank=16, max_adapter_bytes=2**24, tower_lora=True)
    partial = validate_adapter(folder, base, with_towers, drop_tower_weights=True)
    assert {module_group(m) for m in partial.dropped_modules} == {
        ModuleGroup.AUDIO_TOWER,
        ModuleGroup.AUDIO_EMBEDDER,
    }
    assert partial.serves_towers


def test_all_linear_with_zero_tower_b_is_dropped_exactly(
    published: dict[str, Path], base: BaseModelSpec, tmp_path: Path
) -> None:
    """Unsloth's vision LoRA before its fix (unsloth #5039): tower lora_B all zero."""
    folder = _copy(published, "all-linear", tmp_path)
    edit_tensors(folder, _zero_tower_b)
    manifest = validate_adapter(folder, base, LIMITS)
    assert manifest.drop_reason is DropReason.ZERO and manifest.drops
    assert "exact for every request" in manifest.drop_reason.meaning


def test_tower_only_adapter_after_a_drop_is_refused(
    published: dict[str, Path], base: BaseModelSpec, tmp_path: Path
) -> None:
    folder = _copy(published, "all-linear", tmp_path)
    edit_tensors(folder, lambda t: {k: v for k, v in t.items() if "language_model" not in k})
    refused(
        folder, base, InvalidAdapter, "adapts nothing this server applies", drop_tower_weights=True
    )


def test_all_linear_from_a_pickle_is_dropped_into_safetensors(
    published: dict[str, Path], base: BaseModelSpec, tmp_path: Path
) -> None:
    folder = _copy(published, "all-linear", tmp_path)
    _to_pickle(folder)
    allow = ValidationLimits(max_rank=16, max_adapter_bytes=2**24, allow_pickle=True)
    manifest = validate_adapter(folder, base, allow, drop_tower_weights=True)
    served = write_served_copy(folder, manifest, tmp_path / "served")
    assert validate_adapter(served, base, LIMITS).weights_file == "adapter_model.safetensors"


def test_moe_router_is_a_language_model_linear(
    tiny: DefaultModel, copy_adapter: CopyAdapter, tmp_path: Path
) -> None:
    """26B-A4B-style layers: the router's `proj` is a Linear vLLM wraps; experts are 3-D."""
    moe = tmp_path / "tiny-gemma4"
    moe.mkdir()
    shutil.copy(tiny.model_dir / "config.json", moe)
    tensors = load_file(tiny.model_dir / "model.safetensors")
    router = "model.language_model.layers.0.router.proj"
    tensors[f"{router}.weight"] = torch.zeros(8, 128)
    tensors["model.language_model.layers.0.experts.gate_up_proj"] = torch.zeros(8, 64, 128)
    save_file(tensors, moe / "model.safetensors")
    base = BaseModelSpec.from_model_dir(moe, SERVED_NAME)
    assert base.linear_modules[router] == (128, 8)
    assert module_group(router) is ModuleGroup.LANGUAGE_MODEL
    assert "model.language_model.layers.0.experts" not in base.linear_modules

    folder = copy_adapter()
    edit_config(folder, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|proj)")
    seeded = torch.Generator().manual_seed(1)
    edit_tensors(
        folder,
        lambda t: {
            **t,
            f"{PREFIX}{router}.lora_A.weight": torch.randn(4, 128, generator=seeded),
            f"{PREFIX}{router}.lora_B.weight": torch.randn(8, 4, generator=seeded),
        },
    )
    manifest = validate_adapter(folder, base, LIMITS)
    assert "proj" in manifest.target_modules and manifest.module_count == 17
    edit_tensors(folder, lambda t: {**t, f"{PREFIX}{router}.lora_B.weight": torch.ones(16, 4)})
    refused(folder, base, InvalidAdapter, "has shape [16, 4], expected [8, 4]")


# Shaped like unsloth_zoo's get_peft_regex for finetune_vision_layers=False: a language branch
# and a text-model branch (`model.layers.N...`).
UNSLOTH_LANGUAGE_REGEX = (
    r"(?:.*?(?:language|text).*?(?:self_attn|attention|attn|mlp|feed_forward|ffn|dense).*?"
    r"(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj).*?)|(?:\bmodel\.layers\.[\d]{1,}"
    r"\.(?:self_attn|attention|attn|mlp|feed_forward|ffn|dense)\.(?:(?:q_proj|k_proj|v_proj|"
    r"o_proj|gate_proj|up_proj|down_proj)))"
)


@pytest.mark.parametrize(
    "prefix", ["base_model.model.model.language_model.", "base_model.model.model."]
)
def test_unsloth_language_only_regex(
    copy_adapter: CopyAdapter, base: BaseModelSpec, prefix: str
) -> None:
    folder = copy_adapter("demo-all")
    edit_config(
        folder,
        target_modules=UNSLOTH_LANGUAGE_REGEX,
        base_model_name_or_path="unsloth/tiny-gemma4-unsloth-bnb-4bit",
    )
    old = "base_model.model.model.language_model."
    edit_tensors(folder, lambda t: {k.replace(old, prefix): v for k, v in t.items()})
    assert validate_adapter(folder, base, LIMITS).module_count == 7 * LAYER_COUNT


def test_trl_exclude_modules_do_not_exclude_tower_children(
    published: dict[str, Path], base: BaseModelSpec, tmp_path: Path
) -> None:
    """TRL's Gemma 4 example: all-linear, exclude_modules naming the towers (suffix match)."""
    folder = _copy(published, "all-linear", tmp_path)
    edit_config(folder, exclude_modules=["vision_tower", "audio_tower", "lm_head"])
    refused(folder, base, InvalidAdapter, "part has non-zero lora_B")
    manifest = validate_adapter(folder, base, LIMITS, drop_tower_weights=True)
    assert manifest.module_count == 9 * LAYER_COUNT + 1
