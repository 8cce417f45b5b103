"""The engine bridge's adapter operations at run time, on the real vLLM engine."""

from __future__ import annotations

import pytest

from server.engine.protocol import AdapterRef, EngineError, Prompt, Sampling
from server.engine.vllm_engine import VllmEngine
from server.testbed.default_model import DefaultModel
from tests.test_engine_correctness import render, run

# Ids far from those other tests use, so the shared engine's state does not interfere.
FIRST_ID = 900


async def test_add_pin_list_and_remove_adapters(engine: VllmEngine, tiny: DefaultModel) -> None:
    prompt = render(tiny, "short-text")
    base = await run(engine, prompt, None)
    path = str(tiny.adapter_dirs()["demo-all"])
    added = AdapterRef(name="runtime-all", int_id=FIRST_ID, path=path)

    await engine.add_adapter(added)
    assert FIRST_ID in await engine.list_adapters()
    assert await engine.pin_adapter(FIRST_ID)
    tuned = await run(engine, prompt, added)
    assert tuned.token_ids != base.token_ids

    assert await engine.remove_adapter(FIRST_ID)
    assert FIRST_ID not in await engine.list_adapters()
    assert not await engine.remove_adapter(FIRST_ID)
    # The same weights under a new id give the same output: removal dropped only the engine copy.
    again = AdapterRef(name="runtime-all-2", int_id=FIRST_ID + 1, path=path)
    await engine.add_adapter(again)
    assert (await run(engine, prompt, again)).token_ids == tuned.token_ids
    assert await engine.remove_adapter(FIRST_ID + 1)


async def test_bad_adapter_path_is_refused_and_engine_keeps_serving(
    engine: VllmEngine, tiny: DefaultModel, tmp_path: pytest.TempPathFactory
) -> None:
    missing = AdapterRef(name="missing", int_id=FIRST_ID + 10, path=str(tmp_path))
    with pytest.raises(EngineError):
        await engine.add_adapter(missing)
    assert FIRST_ID + 10 not in await engine.list_adapters()
    await engine.check_health()
    assert (await run(engine, render(tiny, "short-text"), None)).token_ids


async def test_running_count_and_abort(engine: VllmEngine, tiny: DefaultModel) -> None:
    prompt = Prompt(text=render(tiny, "short-text").text)
    stream = engine.generate("abort-me", prompt, Sampling(max_tokens=500, ignore_eos=True), None)
    await anext(stream)
    assert engine.running_request_count() >= 1
    await engine.abort("abort-me")
    await stream.aclose()
    assert engine.running_request_count() == 0


def test_non_finite_logprobs_become_numbers_json_can_carry() -> None:
    """NaN (from a repetition penalty near 0, found by the fuzz test) and -inf left the API as
    `null`, which OpenAI's types refuse; they become vLLM's server's -9999.0."""
    from vllm.logprobs import Logprob
    from vllm.outputs import CompletionOutput

    from server.engine.vllm_engine import MIN_LOGPROB, _token_logprobs

    output = CompletionOutput(
        index=0,
        text="ab",
        token_ids=[5, 6],
        cumulative_logprob=None,
        logprobs=[
            {5: Logprob(float("nan"), 1, "a"), 7: Logprob(-0.5, 2, "c")},
            {6: Logprob(float("-inf"), 1, "b")},
        ],
        finish_reason=None,
    )
    steps = _token_logprobs(output.token_ids, output.logprobs)
    assert steps is not None
    assert [step.logprob for step in steps] == [MIN_LOGPROB, MIN_LOGPROB]
    assert steps[0].top == [(7, "c", -0.5), (5, "a", MIN_LOGPROB)]
