"""Adapters shaped like the ones people publish, through the real engine and real HTTP.

Each formerly refused shape (per-layer projections, three name spellings vLLM maps, an Unsloth
base name, all-linear with untrained towers) is served; where only names differ from a
canonically named copy, the greedy output equals that copy's token for token and differs from
the base. A trained tower part is refused unless dropped on request; the drop is persisted. The
post-load probe refuses an adapter that changes nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
import torch
from safetensors.torch import load_file, save_file

from server.engine.vllm_engine import VllmEngine
from server.testbed.default_model import DefaultModel
from server.testbed.demo_adapters import DemoAdapterSpec, load_base_model, write_demo_adapter
from tests.conftest import engine_settings
from tests.live_server import LiveServer, live_server
from tests.test_api_errors import assert_envelope

ADMIN = "real-adapters-admin"
BASE = "tiny-gemma4"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PROMPT = [{"role": "user", "content": "Tell me a story about a cat."}]
CANONICAL = "base_model.model.model.language_model."
LANGUAGE_ALL = (
    r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
    r"|per_layer_input_gate|per_layer_projection|per_layer_model_projection)"
)
PER_LAYER_ONLY = r".*language_model.*\.(per_layer_input_gate|per_layer_projection)"
# Spelling -> what replaces the canonical `base_model.model.model.language_model.` prefix.
SPELLINGS = {
    "names-language-model-model": "base_model.model.language_model.model.",
    "names-text-model": "base_model.model.model.",
    "names-no-peft-prefix": "model.language_model.",
}


def _rewrite(folder: Path, change: Callable[[dict[str, torch.Tensor]], dict[str, Any]]) -> None:
    save_file(change(load_file(folder / WEIGHTS)), folder / WEIGHTS, metadata={"format": "pt"})


def _edit_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / CONFIG).read_text())
    config.update(changes)
    (folder / CONFIG).write_text(json.dumps(config))


def _is_tower(tensor_name: str) -> bool:
    return "language_model" not in tensor_name


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, tiny: DefaultModel) -> Path:
    """The adapter root: published shapes written by PEFT, and copies renamed or edited."""
    out = tmp_path_factory.mktemp("published-root")
    model = load_base_model(tiny.model_dir)

    def peft(name: str, targets: str, seed: int) -> Path:
        spec = DemoAdapterSpec(name, 8, targets)
        return write_demo_adapter(tiny.model_dir, out / name, spec, seed=seed, base=model)

    canonical = peft("language-all-linear", LANGUAGE_ALL, 11)
    peft("peft-default", r".*language_model\..*\.(q_proj|v_proj)", 10)
    peft("per-layer-only", PER_LAYER_ONLY, 12)
    for spelling, prefix in SPELLINGS.items():
        folder = Path(shutil.copytree(canonical, out / spelling))
        _rewrite(folder, lambda t, p=prefix: {k.replace(CANONICAL, p): v for k, v in t.items()})
    unsloth = Path(shutil.copytree(canonical, out / "unsloth-base-name"))
    _edit_config(unsloth, base_model_name_or_path="unsloth/Tiny-Gemma4-unsloth-bnb-4bit")

    trained = peft("all-linear", "all-linear", 13)
    untrained = Path(shutil.copytree(trained, out / "all-linear-untrained-towers"))
    _rewrite(
        untrained,
        lambda t: {
            k: torch.zeros_like(v) if _is_tower(k) and "lora_B" in k else v for k, v in t.items()
        },
    )
    # The language part of `all-linear` alone: what a correct drop must serve.
    language_part = Path(shutil.copytree(trained, out / "all-linear-language-part"))
    _rewrite(language_part, lambda t: {k: v for k, v in t.items() if not _is_tower(k)})

    # Real weights, but lora_B so small that adding B @ A changes no float32 value.
    no_effect = Path(shutil.copytree(canonical, out / "no-effect"))
    _rewrite(no_effect, lambda t: {k: v * 1e-30 if "lora_B" in k else v for k, v in t.items()})
    # A real but small effect: log-probs move by ~1e-4, the greedy tokens stay.
    small = Path(shutil.copytree(canonical, out / "small-effect"))
    _rewrite(small, lambda t: {k: v * 3e-4 if "lora_B" in k else v for k, v in t.items()})
    return out


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("real-adapters-state")


def _settings(tiny: DefaultModel, root: Path, state_dir: Path, **overrides: Any) -> Any:
    return engine_settings(
        cache_dir=tiny.model_dir.parent,
        state_dir=state_dir,
        adapter_roots=[root],
        admin_keys=[ADMIN],
        preload_dir=root / "nothing-to-preload",
        **overrides,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(
    engine: VllmEngine, tiny: DefaultModel, root: Path, state_dir: Path
) -> AsyncIterator[LiveServer]:
    async with live_server(_settings(tiny, root, state_dir), engine, first_adapter_id=60_000) as s:
        yield s


def _admin(server: LiveServer) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    return httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=300)


async def _greedy(server: LiveServer, model: str) -> tuple[list[str], str]:
    client = openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    reply = await client.chat.completions.create(
        model=model, messages=PROMPT, max_tokens=16, temperature=0, logprobs=True
    )
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    return [t.token for t in choice.logprobs.content], choice.message.content or ""


async def _vllm_load(server: LiveServer, name: str, **extra: Any) -> httpx.Response:
    async with _admin(server) as client:
        return await client.post(
            "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": name, **extra}
        )


FORMERLY_REFUSED = [
    "language-all-linear",  # per_layer_input_gate, per_layer_projection, per_layer_model_projection
    *SPELLINGS,
    "unsloth-base-name",
    "all-linear-untrained-towers",
]


async def test_formerly_refused_shapes_are_served(server: LiveServer) -> None:
    base = await _greedy(server, BASE)
    outputs = {}
    for name in FORMERLY_REFUSED:
        response = await _vllm_load(server, name)
        assert response.status_code == 200, (name, response.text)
        outputs[name] = await _greedy(server, name)
        assert outputs[name] != base, name
    # Only the names differ: the same tokens, through vLLM's own name mapping.
    for name in [*SPELLINGS, "unsloth-base-name"]:
        assert outputs[name] == outputs["language-all-linear"], name
    assert (await _vllm_load(server, "peft-default")).status_code == 200
    assert await _greedy(server, "peft-default") != base
    card = (await _vllm_load(server, "per-layer-only")).json()
    assert card["target_modules"] == ["per_layer_input_gate", "per_layer_projection"]
    assert await _greedy(server, "per-layer-only") != base  # vLLM applies the per-layer LoRA


async def test_untrained_tower_part_is_dropped_and_said_so(server: LiveServer) -> None:
    async with _admin(server) as client:
        card = (await client.get("/v1/adapters/all-linear-untrained-towers")).json()
    if "error" in card:  # run alone: load it here
        card = (await _vllm_load(server, "all-linear-untrained-towers")).json()
    dropped = card["dropped"]
    assert dropped["reason"] == "zero_lora_b" and "exact for every request" in dropped["meaning"]
    assert "model.vision_tower.patch_embedder.input_proj" in dropped["modules"]
    assert "model.embed_audio.embedding_projection" in dropped["modules"]
    assert dropped["module_count"] == len(dropped["modules"])


async def test_trained_tower_part_needs_a_drop_which_is_persisted(
    server: LiveServer,
    engine: VllmEngine,
    tiny: DefaultModel,
    root: Path,
    state_dir: Path,
) -> None:
    original = (root / "all-linear" / WEIGHTS).read_bytes()
    refused = await _vllm_load(server, "all-linear")
    error = assert_envelope(refused, 400, "BadRequestError")
    assert "drop_tower_weights=true" in error["message"]
    assert "--enable-tower-lora" in error["message"]

    async with _admin(server) as client:
        loaded = await client.post(
            "/v1/adapters",
            json={"name": "all-linear", "path": "all-linear", "drop_tower_weights": True},
        )
        assert loaded.status_code == 201, loaded.text
        card = loaded.json()
        language_part = await client.post(
            "/v1/adapters", json={"name": "language-part", "path": "all-linear-language-part"}
        )
        assert language_part.status_code == 201, language_part.text
    assert card["dropped"]["reason"] == "requested"
    assert "neither the base model nor the fine-tune" in card["dropped"]["meaning"]
    assert card["sha256"] == hashlib.sha256(original).hexdigest()
    assert (root / "all-linear" / WEIGHTS).read_bytes() == original  # never modified
    served = await _greedy(server, "all-linear")
    assert served == await _greedy(server, "language-part")  # exactly the language part
    assert served != await _greedy(server, BASE)

    # Restart: a new app on the same state folder, its engine holding no adapters.
    registry = json.loads((state_dir / "registry.json").read_text())
    record = next(r for r in registry["adapters"] if r["name"] == "all-linear")
    served_copy = Path(record["path"])
    assert served_copy.parent == state_dir / "served"
    assert not any(_is_tower(k) for k in load_file(served_copy / WEIGHTS))
    for entry in registry["adapters"]:
        await engine.remove_adapter(entry["int_id"])
    settings = _settings(tiny, root, state_dir)
    async with live_server(settings, engine, first_adapter_id=60_000) as again:
        async with _admin(again) as client:
            restored = (await client.get("/v1/adapters/all-linear")).json()
        assert restored["dropped"] == card["dropped"] and restored["id"] == card["id"]
        assert await _greedy(again, "all-linear") == served


def _saved_names(state_dir: Path) -> set[str]:
    return {e["name"] for e in json.loads((state_dir / "registry.json").read_text())["adapters"]}


async def test_probe_refuses_an_adapter_that_changes_nothing(
    server: LiveServer, engine: VllmEngine, state_dir: Path
) -> None:
    before = await engine.list_adapters()
    response = await _vllm_load(server, "no-effect")
    error = assert_envelope(response, 400, "BadRequestError")
    assert "equal the base model's: it changes nothing here" in error["message"]
    assert set(await engine.list_adapters()) <= set(before)  # nothing left in the engine
    async with _admin(server) as client:
        assert (await client.get("/v1/adapters/no-effect")).status_code == 404
        models = (await client.get("/v1/models")).json()["data"]
    assert "no-effect" not in {m["id"] for m in models}
    # Saved while the probe ran, withdrawn when it refused: a restart does not bring it back.
    assert "no-effect" not in _saved_names(state_dir)


async def test_probe_passes_a_small_effect_and_can_be_switched_off(
    server: LiveServer,
    engine: VllmEngine,
    tiny: DefaultModel,
    root: Path,
    state_dir: Path,
    tmp_path: Path,
) -> None:
    assert (await _vllm_load(server, "small-effect")).status_code == 200
    assert "small-effect" in _saved_names(state_dir)  # saved before the answer
    settings = _settings(tiny, root, tmp_path / "state", adapter_probe=False)
    async with live_server(settings, engine, first_adapter_id=61_000) as unprobed:
        response = await _vllm_load(unprobed, "no-effect")
        assert response.status_code == 200, response.text
        assert await _greedy(unprobed, "no-effect") == await _greedy(unprobed, BASE)


async def test_uploaded_adapter_with_a_drop_keeps_only_the_served_copy(
    server: LiveServer, root: Path, state_dir: Path
) -> None:
    files = {n: (n, (root / "all-linear" / n).read_bytes()) for n in (CONFIG, WEIGHTS)}
    async with _admin(server) as client:
        response = await client.post(
            "/v1/adapters",
            data={"name": "sent-all-linear", "drop_tower_weights": "true"},
            files=files,
        )
    assert response.status_code == 201, response.text
    assert response.json()["dropped"]["reason"] == "requested"
    assert not list((state_dir / "uploads").iterdir())  # the full upload is not kept
    served = [p.name for p in (state_dir / "served").iterdir()]
    assert f"sent-all-linear-{response.json()['id']}" in served
    async with _admin(server) as client:
        assert (await client.delete("/v1/adapters/sent-all-linear")).status_code == 200
    copy = state_dir / "served" / f"sent-all-linear-{response.json()['id']}"
    for _ in range(100):  # removed once its requests have finished
        if not copy.exists():
            break
        await asyncio.sleep(0.1)
    assert not copy.exists()
