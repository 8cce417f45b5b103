"""Unit tests of the effect probe on a fake engine (the real engine: test_real_adapters)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from server.admin.effect_probe import (
    PROBE_STEPS,
    PROBE_TOP_LOGPROBS,
    largest_difference,
    probe_effect,
)
from server.engine.protocol import (
    AdapterRef,
    CompletionDelta,
    GenerationChunk,
    Prompt,
    Sampling,
    TokenLogprob,
)

ADAPTER = AdapterRef(name="a", int_id=1, path="unused")


def _step(token: int, logprobs: dict[int, float]) -> TokenLogprob:
    top = [(t, str(t), lp) for t, lp in logprobs.items()]
    return TokenLogprob(token, str(token), logprobs[token], top)


BASE = [_step(5, {5: -0.5, 6: -1.5}), _step(7, {7: -0.2, 8: -2.0})]
BASE_PROMPT = [_step(3, {3: -1.0, 4: -2.0}), _step(4, {4: -0.7, 9: -0.9})]


class FakeEngine:
    """Answers the base model with BASE and the adapter with `tuned`, as DELTA chunks; the
    prompt log-probs (BASE_PROMPT or `tuned_prompt`) come with the first chunk, as vLLM's."""

    def __init__(
        self, tuned: list[TokenLogprob], tuned_prompt: list[TokenLogprob] = BASE_PROMPT
    ) -> None:
        self.tuned = tuned
        self.tuned_prompt = tuned_prompt
        self.sampling: list[Sampling] = []

    async def generate(
        self, request_id: str, prompt: Prompt, sampling: Sampling, adapter: AdapterRef | None
    ) -> AsyncIterator[GenerationChunk]:
        self.sampling.append(sampling)
        prompt_steps = self.tuned_prompt if adapter else BASE_PROMPT
        for i, step in enumerate(self.tuned if adapter else BASE):
            delta = CompletionDelta(0, step.token, [step.token_id], [step], None)
            yield GenerationChunk(
                request_id, 3, [delta], finished=False, prompt_logprobs=None if i else prompt_steps
            )


def test_difference_of_identical_runs_is_zero() -> None:
    assert largest_difference(BASE, list(BASE)) == 0.0


def test_a_different_token_or_top_set_is_an_infinite_change() -> None:
    assert largest_difference(BASE, [BASE[0], _step(8, {8: -0.1, 7: -3.0})]) == float("inf")
    assert largest_difference(BASE, [BASE[0], _step(7, {7: -0.2, 9: -2.0})]) == float("inf")
    assert largest_difference([], []) == float("inf")  # no steps prove nothing


async def test_probe_sees_a_small_change_and_not_noise() -> None:
    small = [BASE[0], _step(7, {7: -0.2 + 1e-4, 8: -2.0})]
    engine = FakeEngine(small)
    result = await probe_effect(engine, ADAPTER)  # type: ignore[arg-type]
    assert result.changed and abs(result.max_logprob_difference - 1e-4) < 1e-9
    assert {(s.temperature, s.max_tokens) for s in engine.sampling} == {(0.0, PROBE_STEPS)}
    assert {s.prompt_logprobs for s in engine.sampling} == {PROBE_TOP_LOGPROBS}
    noise = [BASE[0], _step(7, {7: -0.2 + 1e-7, 8: -2.0})]
    assert not (await probe_effect(FakeEngine(noise), ADAPTER)).changed  # type: ignore[arg-type]


async def test_probe_sees_a_change_at_a_prompt_position_only() -> None:
    # The same greedy tokens and log-probs, but the prompt's second position moved: an effect.
    moved = [BASE_PROMPT[0], _step(4, {4: -0.7 + 1e-4, 9: -0.9})]
    result = await probe_effect(FakeEngine(BASE, moved), ADAPTER)  # type: ignore[arg-type]
    assert result.changed and abs(result.max_logprob_difference - 1e-4) < 1e-9
    reordered = [BASE_PROMPT[0], _step(4, {4: -0.7, 10: -0.9})]
    result = await probe_effect(FakeEngine(BASE, reordered), ADAPTER)  # type: ignore[arg-type]
    assert result.max_logprob_difference == float("inf")
    assert not (await probe_effect(FakeEngine(BASE), ADAPTER)).changed  # type: ignore[arg-type]
