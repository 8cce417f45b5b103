"""Does a loaded adapter change the model at all? One prefill step against the base.

An adapter can pass every static check and still change nothing once the engine has it (vLLM
#41754: Gemma 4 31B and 26B-A4B adapters that load and answer exactly like the base). The probe
runs the same short text prompt on the base model and on the adapter, side by side (one engine
step: both prefills land in the same batch), and compares the top log-probs at every position
of the prompt (vLLM's prompt log-probs) and of the first greedy token. An adapter whose tokens
are the same and whose log-probs all lie within `tolerance` of the base's is reported as having
no effect. Log-probs, not text: a real but small change still shows there.

One step, not a few decode steps: the probe used to generate 4 greedy tokens (4 engine steps
while the load call waited); the prompt's positions (26 on the tiny model) and the first token
are compared in one prefill step instead: more positions for less time.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

from server.engine.protocol import AdapterRef, InferenceEngine, Prompt, Sampling, TokenLogprob

PROBE_PROMPT = "Write one sentence about the sea, the river and the mountain."
PROBE_STEPS = 1  # generated tokens: the prompt's positions are compared too
PROBE_TOP_LOGPROBS = 5
# Measured with bench.adapter_probe on the tiny model: base-vs-base noise 4.8e-7 (float32) and 0
# (bfloat16); demo-all with lora_B x1e-4 moves log-probs by 3.8e-5 in float32 (an effect), with
# x1e-6 by 4.8e-6 (no effect); the demo adapters change the greedy tokens.
DEFAULT_TOLERANCE = 1e-5


@dataclass(frozen=True)
class ProbeResult:
    """What the probe saw: whether the adapter changed anything, and by how much."""

    changed: bool
    max_logprob_difference: float  # inf when the greedy tokens or the top-k sets differ
    seconds: float


async def probe_steps(
    engine: InferenceEngine, adapter: AdapterRef | None, steps: int = PROBE_STEPS
) -> list[TokenLogprob]:
    """Top log-probs at each prompt position after the first, then at `steps` greedy tokens."""
    sampling = Sampling(
        max_tokens=steps,
        temperature=0.0,
        logprobs=PROBE_TOP_LOGPROBS,
        prompt_logprobs=PROBE_TOP_LOGPROBS,
        ignore_eos=True,
    )
    request_id = f"adapter-probe-{uuid.uuid4().hex}"
    collected: list[TokenLogprob] = []
    async for chunk in engine.generate(request_id, Prompt(PROBE_PROMPT), sampling, adapter):
        collected.extend(chunk.prompt_logprobs or [])
        for completion in chunk.completions:
            collected.extend(completion.logprobs or [])
    return collected


def largest_difference(base: list[TokenLogprob], tuned: list[TokenLogprob]) -> float:
    """Largest top-k log-prob change between two probe runs; inf if tokens or top-k differ.

    At a prompt position the top-k holds the prompt's own token as well (vLLM adds it)."""
    if [s.token_id for s in base] != [s.token_id for s in tuned] or not base:
        return float("inf")
    largest = 0.0
    for base_step, tuned_step in zip(base, tuned, strict=True):
        base_top = {token_id: logprob for token_id, _, logprob in base_step.top}
        tuned_top = {token_id: logprob for token_id, _, logprob in tuned_step.top}
        if base_top.keys() != tuned_top.keys():
            return float("inf")
        largest = max(largest, *(abs(base_top[t] - tuned_top[t]) for t in base_top))
    return largest


async def probe_effect(
    engine: InferenceEngine,
    adapter: AdapterRef,
    *,
    steps: int = PROBE_STEPS,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ProbeResult:
    """Run the probe prompt on the base model and on `adapter` at once; compare the steps."""
    started = time.perf_counter()
    base, tuned = await asyncio.gather(
        probe_steps(engine, None, steps), probe_steps(engine, adapter, steps)
    )
    difference = largest_difference(base, tuned)
    return ProbeResult(
        changed=difference > tolerance,
        max_logprob_difference=difference,
        seconds=time.perf_counter() - started,
    )
