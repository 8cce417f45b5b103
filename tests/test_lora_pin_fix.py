"""vLLM 0.32's pin takes a batch slot the scheduler does not know of; the compat fix stops that."""

from __future__ import annotations

import pytest

from server.engine.protocol import AdapterRef, EngineError
from server.engine.vllm_engine import VllmEngine
from server.testbed.default_model import DefaultModel
from tests.conftest import engine_settings
from tests.test_engine_correctness import render, run


@pytest.mark.parametrize("fixed", [True, False], ids=["with-fix", "without-fix"])
async def test_pinned_adapter_and_a_full_batch(
    tiny: DefaultModel, monkeypatch: pytest.MonkeyPatch, fixed: bool
) -> None:
    if not fixed:
        monkeypatch.setenv("GEMMA_SERVER_DISABLE_FIXES", "lora_pin")
    settings = engine_settings(max_loras=1, max_cpu_loras=2)
    engine = await VllmEngine.start(settings, str(tiny.model_dir), "tiny-gemma4")
    try:
        dirs = tiny.adapter_dirs()
        pinned = AdapterRef("demo-attn", 1, str(dirs["demo-attn"]))
        other = AdapterRef("demo-mlp", 2, str(dirs["demo-mlp"]))
        await engine.add_adapter(pinned)
        assert await engine.pin_adapter(pinned.int_id)
        prompt = render(tiny, "short-text")
        if fixed:
            assert (await run(engine, prompt, other)).token_ids
            assert pinned.int_id in await engine.list_adapters()
            await engine.check_health()
        else:
            with pytest.raises(EngineError):
                await run(engine, prompt, other)
    finally:
        await engine.shutdown()
