"""Unit tests of the vLLM 0.32 CPU fixes in `server.vllm_compat` (no engine is started).

Each fix is checked twice: the unpatched vLLM function shows the bug (so these tests fail if
the bug is gone or the fix is missing), and the patched one matches a plain-torch reference.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch
import vllm
from vllm.lora.layers.utils import LoRAMapping
from vllm.model_executor.layers import utils as layer_utils
from vllm.platforms import current_platform
from vllm.utils.torch_utils import set_default_torch_dtype

from server.testbed.default_model import DefaultModel
from server.vllm_compat import audio_dtype, audio_gemm, lora_index

OPS_MODULE = "vllm.lora.ops.torch_ops.lora_ops"
LORA_MODULES = (OPS_MODULE, "vllm.lora.ops.torch_ops", "vllm.lora.punica_wrapper.punica_cpu")
NUM_SLOTS = 3
# Per-token slot; -1 is a base-model token. Sequences: [0 0] [-1] [2 2 2] [-1 -1] [1].
SEQ_INDICES = [0, -1, 2, -1, 1]
SEQ_LENS = [2, 1, 3, 2, 1]
TOKEN_INDICES = [i for i, n in zip(SEQ_INDICES, SEQ_LENS, strict=True) for _ in range(n)]


def _pristine_ops() -> ModuleType:
    """A fresh copy of vLLM's torch LoRA ops, untouched by the fixes conftest applies."""
    path = importlib.import_module(OPS_MODULE).__file__
    assert path is not None
    spec = importlib.util.spec_from_file_location("pristine_lora_ops", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def lora_modules(monkeypatch: pytest.MonkeyPatch) -> list[ModuleType]:
    """vLLM's LoRA op modules with vLLM's own ops bound again; the bindings return afterwards."""
    pristine = _pristine_ops()
    modules = [importlib.import_module(name) for name in LORA_MODULES]
    for module in modules:
        for name in lora_index.REPLACEMENTS:
            monkeypatch.setattr(module, name, getattr(pristine, name))
    return modules


@pytest.fixture
def original_ops(lora_modules: list[ModuleType]) -> dict[str, Callable[..., Any]]:
    """vLLM's own (unpatched) torch LoRA ops."""
    return {name: getattr(lora_modules[0], name) for name in lora_index.REPLACEMENTS}


@pytest.fixture
def gemm_binding(monkeypatch: pytest.MonkeyPatch) -> Callable[..., torch.Tensor]:
    """vLLM's own CPU GEMM, bound again in its module; the binding returns afterwards."""
    current = layer_utils.cpu_unquantized_gemm
    original = getattr(current, "__wrapped__", current)
    assert original.__module__ == layer_utils.__name__
    monkeypatch.setattr(layer_utils, "cpu_unquantized_gemm", original)
    return original


def _token_indices() -> torch.Tensor:
    return torch.tensor(TOKEN_INDICES)


def _reference(inputs: torch.Tensor, weights: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """Row-by-row `x @ W[slot].T`, zero for base-model rows: what a LoRA op must contribute."""
    rows = [
        torch.zeros(weights.shape[-2]) if slot < 0 else weights[slot, 0] @ x
        for x, slot in zip(inputs, indices, strict=True)
    ]
    return torch.stack(rows)


def _last_slot_rows(inputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return inputs @ weights[-1, 0].T


def _shrink_case() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(len(TOKEN_INDICES), 12), torch.randn(NUM_SLOTS, 1, 4, 12)


def _expand_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    inputs = torch.randn(len(TOKEN_INDICES), 4)
    weights = torch.randn(NUM_SLOTS, 1, 6, 4)
    base = torch.randn(len(TOKEN_INDICES), 10)
    return inputs, weights, base


def _sgmv_meta() -> list[Any]:
    lens = torch.tensor(SEQ_LENS)
    starts = torch.cumsum(lens, 0) - lens
    return [starts, lens, torch.tensor(SEQ_INDICES), len(SEQ_LENS), max(SEQ_LENS), sum(SEQ_LENS)]


def _run_shrink(op: Callable[..., Any], sgmv: bool) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, weights = _shrink_case()
    out = torch.full((len(TOKEN_INDICES), 4), 7.0)
    scaling = 0.5
    if sgmv:
        op(inputs, weights, out, *_sgmv_meta(), scaling)
    else:
        op(inputs, weights, out, _token_indices(), scaling)
    return out, scaling * _reference(inputs, weights, TOKEN_INDICES)


def _run_expand(
    op: Callable[..., Any], sgmv: bool, add_inputs: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, weights, base = _expand_case()
    out = base.clone()
    if sgmv:
        op(inputs, weights, out, *_sgmv_meta(), add_inputs)
    else:
        op(inputs, weights, out, _token_indices(), add_inputs)
    expected = base.clone()
    # The output is wider than the adapter (padding): only the common columns are written.
    contribution = _reference(inputs, weights, TOKEN_INDICES)
    expected[:, :6] = expected[:, :6] + contribution if add_inputs else contribution
    return out, expected


def _run_expand_slice(
    op: Callable[..., Any], sgmv: bool, add_inputs: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, weights, base = _expand_case()
    out = base.clone()
    offset, size = 3, 6
    if sgmv:
        op(inputs, weights, out, *_sgmv_meta(), offset, size, add_inputs)
    else:
        op(inputs, weights, out, _token_indices(), offset, size, add_inputs)
    expected = base.clone()
    contribution = _reference(inputs, weights, TOKEN_INDICES)
    window = expected[:, offset : offset + size]
    expected[:, offset : offset + size] = window + contribution if add_inputs else contribution
    return out, expected


def _run(name: str, op: Callable[..., Any], add_inputs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    sgmv = name.startswith("sgmv")
    if name.endswith("shrink"):
        return _run_shrink(op, sgmv)
    if name.endswith("expand_slice"):
        return _run_expand_slice(op, sgmv, add_inputs)
    return _run_expand(op, sgmv, add_inputs)


def _base_rows() -> list[int]:
    return [row for row, slot in enumerate(TOKEN_INDICES) if slot < 0]


OP_CASES = [
    pytest.param(name, add, id=f"{name}-add{int(add)}")
    for name in lora_index.REPLACEMENTS
    for add in ([True] if name.endswith("shrink") else [True, False])
]


@pytest.mark.parametrize(("name", "add_inputs"), OP_CASES)
def test_original_lora_op_gives_base_tokens_the_last_slot(
    name: str, add_inputs: bool, original_ops: dict[str, Callable[..., Any]]
) -> None:
    out, expected = _run(name, original_ops[name], add_inputs)
    base = _base_rows()
    adapter_rows = [r for r in range(len(TOKEN_INDICES)) if r not in base]
    torch.testing.assert_close(out[adapter_rows], expected[adapter_rows])
    assert not torch.allclose(out[base], expected[base])


@pytest.mark.parametrize(("name", "add_inputs"), OP_CASES)
def test_fixed_lora_op_leaves_base_tokens_alone(name: str, add_inputs: bool) -> None:
    out, expected = _run(name, lora_index.REPLACEMENTS[name], add_inputs)
    torch.testing.assert_close(out, expected)


def test_original_bgmv_expand_adds_last_slot_exactly(
    original_ops: dict[str, Callable[..., Any]],
) -> None:
    inputs, weights, base = _expand_case()
    out = base.clone()
    original_ops["bgmv_expand"](inputs, weights, out, _token_indices(), True)
    rows = _base_rows()
    leaked = _last_slot_rows(inputs[rows], weights)
    torch.testing.assert_close(out[rows, :6], base[rows, :6] + leaked)


def test_fixed_ops_zero_base_rows_even_with_non_finite_weights() -> None:
    inputs, weights, base = _expand_case()
    weights[-1] = float("inf")
    out = base.clone()
    lora_index.bgmv_expand(inputs, weights, out, torch.tensor([-1] * len(TOKEN_INDICES)), True)
    torch.testing.assert_close(out, base)


def test_apply_patches_every_binding(lora_modules: list[ModuleType]) -> None:
    assert lora_index.apply() is True
    for module in lora_modules:
        for name, fixed in lora_index.REPLACEMENTS.items():
            assert getattr(module, name) is fixed


def _base_rows_changed_by_cpu_wrapper(is_prefill: bool) -> bool:
    """Run vLLM's own CPU wrapper on requests [a3, a2, a1, base] with all three slots taken."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    lens = [2, 1, 3, 2] if is_prefill else [1, 1, 1, 1]
    lora_ids = [3, 2, 1, 0]
    wrapper = PunicaWrapperCPU(max_num_batched_tokens=16, max_batches=4, device="cpu")
    mapping = LoRAMapping(
        index_mapping=tuple(i for i, n in zip(lora_ids, lens, strict=True) for _ in range(n)),
        prompt_mapping=tuple(lora_ids),
        is_prefill=is_prefill,
    )
    wrapper.update_metadata(mapping, [1, 2, 3], max_loras=NUM_SLOTS, vocab_size=32)
    torch.manual_seed(2)
    x = torch.randn(sum(lens), 12)
    lora_a = (torch.randn(NUM_SLOTS, 1, 4, 12),)
    lora_b = (torch.randn(NUM_SLOTS, 1, 8, 4),)
    y = torch.randn(sum(lens), 8)
    y_before = y.clone()
    wrapper.add_lora_linear(y, x, lora_a, lora_b, 1.0, (8,))
    adapter_rows = sum(lens[:3])
    assert not torch.allclose(y[:adapter_rows], y_before[:adapter_rows])
    return not torch.equal(y[adapter_rows:], y_before[adapter_rows:])


@pytest.mark.parametrize("is_prefill", [True, False], ids=["prefill", "decode"])
def test_cpu_punica_wrapper_applies_an_adapter_to_base_request_without_fix(
    lora_modules: list[ModuleType], is_prefill: bool
) -> None:
    assert _base_rows_changed_by_cpu_wrapper(is_prefill)


@pytest.mark.parametrize("is_prefill", [True, False], ids=["prefill", "decode"])
def test_cpu_punica_wrapper_leaves_base_request_alone_with_fix(
    lora_modules: list[ModuleType], is_prefill: bool
) -> None:
    assert lora_index.apply() is True
    assert not _base_rows_changed_by_cpu_wrapper(is_prefill)


def test_lora_apply_is_idempotent(lora_modules: list[ModuleType]) -> None:
    assert lora_index.apply() is True
    assert lora_index.apply() is True
    for module in lora_modules:
        for name, fixed in lora_index.REPLACEMENTS.items():
            assert getattr(module, name) is fixed


def _lora_bindings(modules: list[ModuleType]) -> list[object]:
    return [getattr(m, n) for m in modules for n in lora_index.REPLACEMENTS]


def test_lora_apply_skips_other_vllm_versions(
    lora_modules: list[ModuleType], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _lora_bindings(lora_modules)
    monkeypatch.setattr(vllm, "__version_tuple__", (0, 33, 0))
    assert lora_index.apply() is False
    assert _lora_bindings(lora_modules) == before


def test_lora_apply_skips_platforms_without_the_torch_ops(
    lora_modules: list[ModuleType], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _lora_bindings(lora_modules)
    gpu_wrapper = "vllm.lora.punica_wrapper.punica_gpu.PunicaWrapperGPU"
    monkeypatch.setattr(current_platform, "get_punica_wrapper", lambda: gpu_wrapper)
    assert lora_index.apply() is False
    assert _lora_bindings(lora_modules) == before


def test_lora_apply_leaves_fixed_ops_alone(
    lora_modules: list[ModuleType], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A vLLM whose ops already skip index -1 is not patched."""

    def fixed_op(*args: Any, **kwargs: Any) -> None:
        return None

    for module in lora_modules:
        for name in lora_index.REPLACEMENTS:
            monkeypatch.setattr(module, name, fixed_op)
    assert lora_index.apply() is False
    assert set(_lora_bindings(lora_modules)) == {fixed_op}


def _dispatched_linear() -> torch.nn.Linear:
    torch.manual_seed(3)
    layer = torch.nn.Linear(64, 64)
    layer_utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    return layer


def _transposed_input() -> torch.Tensor:
    """[1, time, hidden] laid out as the audio conv leaves it: last stride is not 1."""
    torch.manual_seed(4)
    x = torch.randn(1, 64, 7).transpose(1, 2)
    assert x.stride(-1) != 1
    return x


def test_original_cpu_gemm_rejects_transposed_input(
    gemm_binding: Callable[..., torch.Tensor],
) -> None:
    layer = _dispatched_linear()
    with pytest.raises(RuntimeError, match=r"stride\(-1\) == 1"):
        gemm_binding(layer, _transposed_input(), layer.weight, layer.bias)


def test_fixed_cpu_gemm_matches_torch_linear(gemm_binding: Callable[..., torch.Tensor]) -> None:
    assert audio_gemm.apply() is True
    gemm = layer_utils.dispatch_unquantized_gemm()
    layer = _dispatched_linear()
    x = _transposed_input()
    expected = torch.nn.functional.linear(x.contiguous(), layer.weight, layer.bias)
    torch.testing.assert_close(gemm(layer, x, layer.weight, layer.bias), expected)
    contiguous = x.contiguous()
    torch.testing.assert_close(gemm(layer, contiguous, layer.weight, layer.bias), expected)


def test_fixed_cpu_gemm_passes_contiguous_input_unchanged(
    gemm_binding: Callable[..., torch.Tensor],
) -> None:
    seen: list[torch.Tensor] = []

    def record(x: torch.Tensor, weight: torch.Tensor, bias: Any) -> torch.Tensor:
        seen.append(x)
        return x

    layer = torch.nn.Module()
    layer.cpu_linear = record  # type: ignore[assignment]
    x = torch.randn(3, 5)
    audio_gemm.row_contiguous(gemm_binding)(layer, x, torch.zeros(5, 5))
    assert seen[0] is x


def test_gemm_apply_is_idempotent(gemm_binding: Callable[..., torch.Tensor]) -> None:
    assert audio_gemm.apply() is True
    wrapped = layer_utils.cpu_unquantized_gemm
    assert audio_gemm.apply() is True
    assert layer_utils.cpu_unquantized_gemm is wrapped
    assert wrapped.__wrapped__ is gemm_binding  # type: ignore[attr-defined]


def test_gemm_apply_skips_other_vllm_versions(
    gemm_binding: Callable[..., torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vllm, "__version_tuple__", (0, 31, 2))
    assert audio_gemm.apply() is False
    assert layer_utils.cpu_unquantized_gemm is gemm_binding


def test_gemm_apply_skips_non_cpu_platforms(
    gemm_binding: Callable[..., torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    assert audio_gemm.apply() is False
    assert layer_utils.cpu_unquantized_gemm is gemm_binding


def test_gemm_apply_leaves_a_fixed_gemm_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def fixed_gemm(
        layer: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: Any = None
    ) -> torch.Tensor:
        return torch.nn.functional.linear(x.contiguous(), weight, bias)

    monkeypatch.setattr(layer_utils, "cpu_unquantized_gemm", fixed_gemm)
    assert audio_gemm.apply() is False
    assert layer_utils.cpu_unquantized_gemm is fixed_gemm


# ---- audio_dtype: the audio tower in the served dtype ----


def _build_audio_tower(self: Any, *, vllm_config: Any, prefix: str = "") -> None:
    """What vLLM 0.32's Gemma 4 `__init__` does for the audio tower (before swapping linears)."""
    from transformers import AutoModel

    self.audio_tower = AutoModel.from_config(config=vllm_config.model_config.hf_config.audio_config)


def _served_in(tiny: DefaultModel, dtype: torch.dtype) -> Any:
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(tiny.model_dir)
    return SimpleNamespace(model_config=SimpleNamespace(hf_config=hf_config, dtype=dtype))


def _tower_dtypes(model: Any) -> set[torch.dtype]:
    return {p.dtype for p in model.audio_tower.parameters()}


def test_audio_tower_is_built_in_the_checkpoint_dtype_without_fix(tiny: DefaultModel) -> None:
    """The bug: served in bfloat16, the float32 checkpoint's audio tower stays float32."""
    model = SimpleNamespace()
    with set_default_torch_dtype(torch.bfloat16):  # as vLLM builds the model
        _build_audio_tower(model, vllm_config=_served_in(tiny, torch.bfloat16))
    assert _tower_dtypes(model) == {torch.float32}


@pytest.mark.parametrize("served", [torch.bfloat16, torch.float32])
def test_fixed_audio_tower_is_built_in_the_served_dtype(
    tiny: DefaultModel, served: torch.dtype
) -> None:
    vllm_config = _served_in(tiny, served)
    audio_config = vllm_config.model_config.hf_config.audio_config
    checkpoint_dtype = audio_config.dtype
    model = SimpleNamespace()
    with set_default_torch_dtype(served):
        audio_dtype.audio_tower_in_served_dtype(_build_audio_tower)(model, vllm_config=vllm_config)
    assert _tower_dtypes(model) == {served}
    assert audio_config.dtype == checkpoint_dtype  # the shared config is left as it was


def test_audio_dtype_apply_is_idempotent_and_version_gated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vllm.model_executor.models import gemma4_mm

    model_class = gemma4_mm.Gemma4ForConditionalGeneration
    monkeypatch.setattr(model_class, "__init__", model_class.__init__)  # restored afterwards
    assert audio_dtype.apply() is True
    wrapped = model_class.__init__
    assert audio_dtype.apply() is True
    assert model_class.__init__ is wrapped
    monkeypatch.setattr(vllm, "__version_tuple__", (0, 31, 2))
    assert audio_dtype.apply() is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_grouped_lora_products_equal_the_per_token_ones(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, tokens: int
) -> None:
    generator = torch.Generator().manual_seed(tokens)
    weights = torch.randn(4, 1, 24, 16, generator=generator)
    inputs = torch.randn(tokens, 16, generator=generator)
    indices = torch.randint(-1, 4, (tokens,), generator=generator)
    monkeypatch.setattr(lora_index, "GROUPED", False)
    per_token = lora_index._lora_outputs(inputs, weights, indices, dtype)
    monkeypatch.setattr(lora_index, "GROUPED", True)
    grouped = lora_index._lora_outputs(inputs, weights, indices, dtype)
    assert grouped.dtype == per_token.dtype and grouped.shape == per_token.shape
    torch.testing.assert_close(grouped, per_token)
    assert not grouped[indices < 0].any()
