"""Shared fixtures: the tiny Gemma 4 with its demo adapters, and the real vLLM engine on it."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from adapters.store import AdapterStore, open_store
from server.settings import Settings
from server.testbed.default_model import DefaultModel, ensure_default_model
from server.vllm_compat import register
from tests.s3_server import S3Server, start_s3_server

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
register()  # the test process builds HF references; it needs the same compat fixes as vLLM's


# The cache `make run` uses: built (and the demo adapters trained) once, then reused by every
# session while the builder's version stamp matches; tests only read it.
TEST_CACHE_DIR = Path(__file__).resolve().parents[1] / ".cache"


@pytest.fixture(scope="session")
def tiny() -> DefaultModel:
    """The tiny Gemma 4 and demo adapters, built into `.cache/` if missing or stale."""
    return ensure_default_model(TEST_CACHE_DIR)


def engine_settings(**overrides: object) -> Settings:
    """Engine settings for tests: float32 (to compare with HF), small KV cache, 3 LoRA slots."""
    values: dict[str, object] = {
        "dtype": "float32",
        "max_model_len": 1024,
        "max_loras": 3,
        "max_lora_rank": 16,
        "max_cpu_loras": 4,
        "kv_cache_memory_bytes": 64 * 2**20,
        "max_num_seqs": 32,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def engine(tiny: DefaultModel) -> AsyncIterator[object]:
    """The real vLLM engine on the tiny model, shared by the whole session."""
    from server.engine.vllm_engine import VllmEngine

    started = await VllmEngine.start(engine_settings(), str(tiny.model_dir), "tiny-gemma4")
    yield started
    await started.shutdown()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def default_dtype_engine(tiny: DefaultModel) -> AsyncIterator[object]:
    """The engine in the dtype users get: `--dtype auto`, which vLLM makes bfloat16 on CPU."""
    from server.engine.vllm_engine import VllmEngine

    settings = engine_settings(dtype=Settings.model_fields["dtype"].default)  # "auto"
    started = await VllmEngine.start(settings, str(tiny.model_dir), "tiny-gemma4")
    yield started
    await started.shutdown()


@pytest.fixture(scope="session", params=["float32", "default"])
def dtype_engine(request: pytest.FixtureRequest) -> object:
    """The engine in float32 and in the service's default dtype: tests using it run on both."""
    return request.getfixturevalue(
        "engine" if request.param == "float32" else "default_dtype_engine"
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the measured agreement with transformers + PEFT (figures the README quotes)."""
    from tests.test_engine_correctness import REFERENCE_DIFFERENCES

    float32 = REFERENCE_DIFFERENCES.get("float32")
    if float32:
        terminalreporter.write_line(
            f"reference match, float32: {len(float32)} comparisons with equal greedy tokens; "
            f"max first-step top-5 log-prob difference {max(d[0] for d in float32):.1e}"
        )
    bfloat16 = REFERENCE_DIFFERENCES.get("bfloat16")
    if bfloat16:
        terminalreporter.write_line(
            f"reference match, bfloat16: {len(bfloat16)} comparisons within the criterion; "
            f"max mean log-prob difference {max(d[0] for d in bfloat16):.3f}, "
            f"max difference {max(d[1] for d in bfloat16):.3f}, "
            f"largest near-tie gap {max(d[2] for d in bfloat16):.3f}"
        )
    from tests.test_gemma_shapes import SHAPE_DIFFERENCES

    for (shape, adapter, case), difference in sorted(SHAPE_DIFFERENCES.items()):
        terminalreporter.write_line(
            f"shape {shape}, {adapter}, {case}: first-step top-5 log-prob difference "
            f"{difference:.1e}"
        )


# --- the shared adapter store, on a folder and on S3 (SeaweedFS) ---


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server for one test module."""
    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture(params=["folder", "s3"])
def store(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AdapterStore:
    """An empty adapter store: a folder, then an S3 location (its credentials in the env)."""
    if request.param == "folder":
        return open_store(str(tmp_path / "store"))
    server: S3Server = request.getfixturevalue("s3_server")
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    return open_store(server.new_location(), server.endpoint_url)
