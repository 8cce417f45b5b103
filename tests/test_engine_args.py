"""Settings reach vLLM's AsyncEngineArgs: tensor parallelism, the `--engine-args` pass-through."""

from __future__ import annotations

import pytest

from server.engine.vllm_engine import engine_args
from server.settings import Settings
from server.testbed.default_model import DefaultModel


def test_cli_flags_reach_the_engine_args(tiny: DefaultModel) -> None:
    settings = Settings(
        _cli_parse_args=[
            "--tensor-parallel-size",
            "2",
            "--engine-args",
            '{"enforce_eager": true, "block_size": 32, "max_num_batched_tokens": 4096}',
        ]
    )  # type: ignore[call-arg]
    args = engine_args(settings, str(tiny.model_dir), "tiny-gemma4")
    assert args.tensor_parallel_size == 2
    assert args.enforce_eager is True
    assert args.block_size == 32
    assert args.max_num_batched_tokens == 4096
    assert args.enable_lora is True  # the service's own settings are still there
    assert args.model == str(tiny.model_dir)


def test_environment_json_reaches_the_engine_args(
    monkeypatch: pytest.MonkeyPatch, tiny: DefaultModel
) -> None:
    monkeypatch.setenv("GEMMA_SERVER_ENGINE_ARGS", '{"enable_prefix_caching": false}')
    args = engine_args(Settings(), str(tiny.model_dir), "tiny-gemma4")
    assert args.enable_prefix_caching is False
    assert args.tensor_parallel_size == 1


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"max_loras": 8}, "`max_loras` is set by the service"),
        ({"enable_lora": False}, "`enable_lora` is set by the service"),
        ({"max_model_len": 4096}, "`max_model_len` is set by the service"),
        ({"no_such_argument": 1}, "`no_such_argument` is not a vLLM engine argument"),
    ],
)
def test_refused_engine_args_name_the_key(given: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        engine_args(Settings(engine_args=given), "/models/m", "m")
