"""The admin API on the real engine over HTTP: validation, load, replace, unload, auth."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import tarfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
from safetensors.torch import load_file, save_file

from server.engine.vllm_engine import VllmEngine
from server.testbed.default_model import DefaultModel
from server.testbed.demo_adapters import DEMO_ADAPTERS, write_demo_adapter
from tests.conftest import engine_settings
from tests.live_server import LiveServer, live_server
from tests.test_api_errors import assert_envelope

ADMIN = "admin-key-1"
USER = "user-key-1"
BASE = "tiny-gemma4"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
MAX_ADAPTER_BYTES = 1_000_000
PROMPT = [{"role": "user", "content": "Tell me a story about a cat."}]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, tiny: DefaultModel) -> Path:
    """The adapter root the admin API may load from, with fresh adapters made for these tests."""
    folder = tmp_path_factory.mktemp("adapter-root")
    for seed, spec in enumerate(DEMO_ADAPTERS, start=100):
        write_demo_adapter(tiny.model_dir, folder / f"fresh-{spec.name}", spec, seed=seed)
    return folder


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def admin(
    engine: VllmEngine, tiny: DefaultModel, root: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LiveServer]:
    settings = engine_settings(
        cache_dir=tiny.model_dir.parent,
        state_dir=tmp_path_factory.mktemp("admin-state"),
        adapter_roots=[root],
        api_keys=[USER],
        admin_keys=[ADMIN],
        max_adapter_bytes=MAX_ADAPTER_BYTES,
    )
    async with live_server(settings, engine, first_adapter_id=30_000) as server:
        yield server


def http(server: LiveServer, key: str | None = ADMIN) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=120)


async def greedy(server: LiveServer, model: str, max_tokens: int = 12) -> str:
    client = openai.AsyncOpenAI(base_url=server.v1, api_key=USER, max_retries=0)
    reply = await client.chat.completions.create(
        model=model, messages=PROMPT, max_tokens=max_tokens, temperature=0
    )
    return reply.choices[0].message.content or ""


async def registered(server: LiveServer) -> list[dict[str, Any]]:
    """The registered adapters, once the preloaded ones are validated (done in the background)."""
    async with http(server) as client:
        while True:
            response = await client.get("/v1/adapters")
            assert response.status_code == 200
            data = list(response.json()["data"])
            if all(a["state"] != "pending" for a in data):
                return data
            await asyncio.sleep(0.2)


# Broken adapters: each is a copy of a good one with one defect.


def _edit_config(**changes: Any) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        config = json.loads((folder / CONFIG).read_text())
        config.update(changes)
        (folder / CONFIG).write_text(json.dumps(config))

    return edit


def _edit_tensors(change: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        save_file(change(load_file(folder / WEIGHTS)), folder / WEIGHTS)

    return edit


def _rename_first(tensors: dict[str, Any]) -> dict[str, Any]:
    name = sorted(tensors)[0]
    return {**{k: v for k, v in tensors.items() if k != name}, name + "_typo": tensors[name]}


def _wrong_prefix(tensors: dict[str, Any]) -> dict[str, Any]:
    # PEFT on Gemma4Model: a spelling vLLM loads and never applies.
    return {k.replace("model.language_model.", "language_model."): v for k, v in tensors.items()}


def _wrong_shape(tensors: dict[str, Any]) -> dict[str, Any]:
    name = sorted(k for k in tensors if "lora_A" in k)[0]
    return {**tensors, name: tensors[name][:, :-1].contiguous()}


def _pickle_only(folder: Path) -> None:
    (folder / WEIGHTS).rename(folder / "adapter_model.bin")


def _corrupt(folder: Path) -> None:
    (folder / WEIGHTS).write_bytes(b"\x00\x01not a safetensors file" * 10)


def _oversized(folder: Path) -> None:
    with (folder / WEIGHTS).open("ab") as weights:
        weights.write(b"\0" * MAX_ADAPTER_BYTES)


BROKEN: dict[str, tuple[Callable[[Path], None], int, str]] = {
    "wrong peft_type": (_edit_config(peft_type="IA3"), 400, "LORA"),
    "rank too high": (_edit_config(r=32), 400, "rank"),
    "tower targets": (_edit_config(target_modules=r".*vision_tower.*\.q_proj.*"), 400, "tower"),
    "lm_head target": (_edit_config(target_modules=["q_proj", "lm_head"]), 400, "lm_head"),
    "modules_to_save": (_edit_config(modules_to_save=["lm_head"]), 400, "modules_to_save"),
    "base mismatch": (_edit_config(base_model_name_or_path="google/gemma-3-1b"), 400, "gemma-3"),
    "pickle only": (_pickle_only, 400, "pickle"),
    "unknown tensor": (_edit_tensors(_rename_first), 400, "_typo"),
    "wrong prefix": (_edit_tensors(_wrong_prefix), 400, "language_model"),
    "wrong shape": (_edit_tensors(_wrong_shape), 400, "shape"),
    "missing config": (lambda folder: (folder / CONFIG).unlink(), 400, CONFIG),
    "corrupt safetensors": (_corrupt, 400, "safetensors"),
    "too large": (_oversized, 413, "bytes"),
}


@pytest.mark.parametrize("case", list(BROKEN))
async def test_broken_adapter_is_refused_and_nothing_changes(
    admin: LiveServer, root: Path, case: str
) -> None:
    breaks, status, phrase = BROKEN[case]
    folder = root / f"broken-{case.replace(' ', '-')}"
    shutil.copytree(root / "fresh-demo-all", folder, dirs_exist_ok=True)
    breaks(folder)
    before = await registered(admin)
    async with http(admin) as client:
        response = await client.post("/v1/adapters", json={"name": "bad", "path": folder.name})
    error = assert_envelope(
        response, status, {400: "BadRequestError"}.get(status, "RequestTooLargeError")
    )
    assert phrase.lower() in error["message"].lower(), error["message"]
    assert str(root) not in error["message"]
    assert await registered(admin) == before
    assert await greedy(admin, "demo-attn", max_tokens=3)  # still serving


@pytest.mark.parametrize(
    ("path", "status"),
    [("../adapter-root/fresh-demo-all", 400), ("/etc", 400), ("no-such-adapter", 404)],
)
async def test_paths_outside_the_roots_are_refused(
    admin: LiveServer, path: str, status: int
) -> None:
    async with http(admin) as client:
        response = await client.post("/v1/adapters", json={"name": "outside", "path": path})
    assert response.status_code == status, response.text
    assert "outside" not in {a["name"] for a in await registered(admin)}


async def test_symlink_out_of_the_root_is_refused(
    admin: LiveServer, root: Path, tiny: DefaultModel
) -> None:
    link = root / "link-out"
    if not link.exists():
        link.symlink_to(tiny.adapter_dirs()["demo-all"])
    async with http(admin) as client:
        response = await client.post("/v1/adapters", json={"name": "linked", "path": "link-out"})
    assert_envelope(response, 400, "BadRequestError")


async def test_load_chat_unload(admin: LiveServer, root: Path, tiny: DefaultModel) -> None:
    from tests.hf_reference import hf_greedy
    from tests.test_engine_correctness import render

    async with http(admin) as client:
        loaded = await client.post(
            "/v1/adapters", json={"name": "fresh-mlp", "path": "fresh-demo-mlp"}
        )
        assert loaded.status_code == 201, loaded.text
        record = loaded.json()
        assert record["rank"] == 8 and record["version"] == 1 and record["state"] == "ready"
        assert len(record["sha256"]) == 64 and "path" not in record
        again = await client.post(
            "/v1/adapters", json={"name": "fresh-mlp", "path": "fresh-demo-mlp"}
        )
        assert_envelope(again, 409, "ConflictError")
        models = openai.AsyncOpenAI(base_url=admin.v1, api_key=USER, max_retries=0)
        listed = {m.id: m for m in (await models.models.list()).data}
        assert listed["fresh-mlp"].model_extra == {"root": "fresh-demo-mlp", "parent": BASE}

        text = await greedy(admin, "fresh-mlp")
        reference = hf_greedy(
            tiny.model_dir,
            root / "fresh-demo-mlp",
            render(tiny, "short-text").text,
            max_tokens=12,
        )
        tokenizer_text = _decode(tiny, reference.token_ids)
        assert text == tokenizer_text
        assert text != await greedy(admin, BASE)

        removed = await client.delete("/v1/adapters/fresh-mlp")
        assert removed.status_code == 200 and removed.json()["state"] == "unloaded"
        assert_envelope(await client.get("/v1/adapters/fresh-mlp"), 404, "NotFoundError")
    with pytest.raises(openai.NotFoundError):
        await greedy(admin, "fresh-mlp")
    services = admin.app.state.services
    for _ in range(100):  # the engine's copy goes once nothing runs on it
        if record["id"] not in await services.adapters.resident_ids():
            break
        await asyncio.sleep(0.05)
    assert record["id"] not in await services.adapters.resident_ids()


def _decode(tiny: DefaultModel, token_ids: list[int]) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny.model_dir)
    return str(tokenizer.decode(token_ids, skip_special_tokens=True))


async def test_replace_during_a_stream(admin: LiveServer, root: Path) -> None:
    async with http(admin) as client:
        first = await client.post("/v1/adapters", json={"name": "swap", "path": "fresh-demo-all"})
        assert first.status_code == 201, first.text
        old_alone = await greedy(admin, "swap", max_tokens=40)
        new_alone_ref = None
        body = {
            "model": "swap",
            "messages": PROMPT,
            "max_tokens": 40,
            "temperature": 0,
            "stream": True,
        }
        async with (
            http(admin, USER) as user,
            user.stream("POST", "/v1/chat/completions", json=body) as stream,
        ):
            lines = stream.aiter_lines()
            await anext(lines)
            replaced = await client.post(
                "/v1/adapters",
                json={"name": "swap", "path": "fresh-demo-attn", "replace": True},
            )
            assert replaced.status_code == 200, replaced.text
            assert replaced.json()["version"] == 2 and replaced.json()["id"] != first.json()["id"]
            new_text = await greedy(admin, "swap", max_tokens=40)
            pieces = []
            async for line in lines:
                if line.startswith("data: {"):
                    choices = json.loads(line[6:])["choices"]
                    pieces += [c["delta"].get("content") or "" for c in choices]
        assert "".join(pieces) == old_alone
        assert new_text != old_alone
        new_alone_ref = await greedy(admin, "swap", max_tokens=40)
        assert new_text == new_alone_ref
        await client.delete("/v1/adapters/swap")


async def test_replace_from_the_same_folder_serves_the_new_weights(
    admin: LiveServer, root: Path, tiny: DefaultModel
) -> None:
    """A new version read from the same path never reuses the old version's cached prefixes."""
    folder = root / "same-folder"
    shutil.copytree(root / "fresh-demo-attn", folder)
    async with http(admin) as client:
        assert (
            await client.post("/v1/adapters", json={"name": "same", "path": "same-folder"})
        ).status_code == 201
        old = await greedy(admin, "same")
        shutil.rmtree(folder)
        shutil.copytree(root / "fresh-demo-mlp", folder)
        replaced = await client.post(
            "/v1/adapters", json={"name": "same", "path": "same-folder", "replace": True}
        )
        assert replaced.status_code == 200
        new = await greedy(admin, "same")
        await client.post("/v1/adapters", json={"name": "mlp-ref", "path": "fresh-demo-mlp"})
        assert new == await greedy(admin, "mlp-ref") != old
        await client.delete("/v1/adapters/same")
        await client.delete("/v1/adapters/mlp-ref")


async def test_concurrent_loads(admin: LiveServer) -> None:
    async with http(admin) as client:

        async def load(name: str) -> httpx.Response:
            return await client.post("/v1/adapters", json={"name": name, "path": "fresh-demo-attn"})

        distinct = await asyncio.gather(*(load(f"many-{i}") for i in range(10)))
        same = await asyncio.gather(*(load("contested") for _ in range(10)))
    assert [r.status_code for r in distinct] == [201] * 10
    assert sorted(r.status_code for r in same) == [201] + [409] * 9
    ids = [r.json()["id"] for r in [*distinct, *same] if r.status_code == 201]
    assert len(set(ids)) == len(ids) == 11
    names = {a["name"]: a["id"] for a in await registered(admin)}
    assert {f"many-{i}" for i in range(10)} | {"contested"} <= set(names)
    async with http(admin) as client:
        for name in [*(f"many-{i}" for i in range(10)), "contested"]:
            assert (await client.delete(f"/v1/adapters/{name}")).status_code == 200


async def test_upload_two_files_and_archive(admin: LiveServer, root: Path) -> None:
    folder = root / "fresh-demo-attn"
    files = {name: (name, (folder / name).read_bytes()) for name in (CONFIG, WEIGHTS)}
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for name in (CONFIG, WEIGHTS):
            tar.add(folder / name, arcname=f"adapter/{name}")
    async with http(admin) as client:
        two = await client.post("/v1/adapters", data={"name": "up-files"}, files=files)
        packed = await client.post(
            "/v1/adapters",
            data={"name": "up-archive", "pin": "true"},
            files={"archive": ("adapter.tar.gz", archive.getvalue())},
        )
        assert two.status_code == 201, two.text
        assert packed.status_code == 201, packed.text
        assert packed.json()["pinned"] and packed.json()["source"].startswith("upload:")
        assert two.json()["sha256"] == packed.json()["sha256"]
        assert await greedy(admin, "up-files") == await greedy(admin, "up-archive")
        for name in ("up-files", "up-archive"):
            await client.delete(f"/v1/adapters/{name}")


async def test_vllm_adapter_routes(admin: LiveServer) -> None:
    async with http(admin) as client:
        loaded = await client.post(
            "/v1/load_lora_adapter", json={"lora_name": "vl", "lora_path": "fresh-demo-mlp"}
        )
        assert loaded.status_code == 200 and loaded.json()["name"] == "vl"
        replaced = await client.post(
            "/v1/load_lora_adapter",
            json={"lora_name": "vl", "lora_path": "fresh-demo-attn", "load_inplace": True},
        )
        assert replaced.status_code == 200 and replaced.json()["version"] == 2
        bad = await client.post(
            "/v1/load_lora_adapter", json={"lora_name": "vl2", "lora_path": "missing"}
        )
        assert_envelope(bad, 404, "NotFoundError")
        unloaded = await client.post("/v1/unload_lora_adapter", json={"lora_name": "vl"})
        assert unloaded.status_code == 200
        again = await client.post("/v1/unload_lora_adapter", json={"lora_name": "vl"})
        assert_envelope(again, 404, "NotFoundError")


ADMIN_ROUTES = [
    ("GET", "/v1/adapters", None),
    ("GET", "/v1/adapters/demo-attn", None),
    ("POST", "/v1/adapters", {"name": "auth-x", "path": "fresh-demo-attn"}),
    ("DELETE", "/v1/adapters/auth-x", None),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "auth-y", "lora_path": "fresh-demo-attn"}),
    ("POST", "/v1/unload_lora_adapter", {"lora_name": "auth-y"}),
]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
async def test_admin_auth_matrix(
    admin: LiveServer, method: str, path: str, body: dict[str, Any] | None
) -> None:
    for key, status, error_type in [
        (None, 401, "AuthenticationError"),
        ("wrong", 401, "AuthenticationError"),
        (USER, 403, "PermissionDeniedError"),
    ]:
        async with http(admin, key) as client:
            response = await client.request(method, path, json=body)
        assert_envelope(response, status, error_type)
    async with http(admin, ADMIN) as client:
        response = await client.request(method, path, json=body)
    assert response.status_code in (200, 201), response.text


async def test_admin_api_is_off_without_admin_keys(
    engine: VllmEngine, tiny: DefaultModel, tmp_path: Path
) -> None:
    settings = engine_settings(cache_dir=tiny.model_dir.parent, state_dir=tmp_path)
    async with live_server(settings, engine, first_adapter_id=40_000) as server:
        async with http(server, None) as client:
            response = await client.get("/v1/adapters")
        error = assert_envelope(response, 403, "PermissionDeniedError")
        assert "GEMMA_SERVER_ADMIN_KEYS" in error["message"]
    open_settings = settings.model_copy(update={"admin_open_on_loopback": True})
    async with (
        live_server(open_settings, engine, first_adapter_id=40_000) as server,
        http(server, None) as client,
    ):
        assert (await client.get("/v1/adapters")).status_code == 200


async def test_adapter_list_pages_and_matches_single_reads(admin: LiveServer) -> None:
    everything = await registered(admin)
    names = [a["name"] for a in everything]
    assert names == sorted(names) and len(names) >= 3
    pages = []
    async with http(admin) as client:
        whole = (await client.get("/v1/adapters")).json()
        after = None
        while True:
            params: dict[str, str | int] = {"limit": 2} | ({"after": after} if after else {})
            page = (await client.get("/v1/adapters", params=params)).json()
            pages.append(page)
            if not page["has_more"]:
                break
            after = page["last_id"]
        singles = [(await client.get(f"/v1/adapters/{name}")).json() for name in names]
        past_the_end = (await client.get("/v1/adapters", params={"after": names[-1]})).json()
        bad_limit = await client.get("/v1/adapters", params={"limit": 0})
    assert (whole["has_more"], whole["first_id"], whole["last_id"]) == (False, names[0], names[-1])
    assert [a["name"] for page in pages for a in page["data"]] == names
    assert all(len(page["data"]) <= 2 and page["first_id"] for page in pages)
    # The list is built without pydantic; each entry equals the single read's model.
    assert [{**a, "last_used": None} for a in whole["data"]] == [
        {**a, "last_used": None} for a in singles
    ]
    assert past_the_end == {
        "object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False
    }  # fmt: skip
    assert_envelope(bad_limit, 400, "BadRequestError")
