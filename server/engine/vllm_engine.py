"""The bridge to vLLM: the one module that imports vLLM at top level.

`VllmEngine` runs vLLM's `AsyncLLM` (engine core and workers in their own processes) and
implements `InferenceEngine`, translating the service's plain dataclasses to vLLM's types.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from vllm import SamplingParams
from vllm.config import StructuredOutputsConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.inputs import TextPrompt
from vllm.logprobs import PromptLogprobs, SampleLogprobs
from vllm.lora.request import LoRARequest
from vllm.outputs import RequestOutput
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

from server.engine.lora_residency import RESIDENCY_RPC, LoraResidencyExtension
from server.engine.protocol import (
    AUDIO_SAMPLE_RATE,
    AdapterActivity,
    AdapterRef,
    CompletionDelta,
    EngineDeadError,
    EngineError,
    GenerationChunk,
    Prompt,
    ResidentAdapter,
    Sampling,
    TokenLogprob,
)
from server.settings import Settings

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_CACHE_BYTES = 256 * 2**20
# What vLLM's OpenAI server reports for an impossible token's log-probability.
MIN_LOGPROB = -9999.0


def cache_vllm_environment() -> None:
    """Turn on vLLM's cache of its environment variables in this (the API) process.

    vLLM reads some of them through `vllm.envs` for every output of every step
    (`IterationStats.update_from_output`: an `os.environ` lookup and parse each time, ~4 us);
    its engine core and workers cache them once started, its API server does not. Call it once
    start-up is over: the service changes no environment variable after that.
    """
    from vllm import envs

    envs.enable_envs_cache()
    logger.info("vLLM environment variables cached")


def _passed_through(settings: Settings, owned: set[str]) -> dict[str, Any]:
    """`--engine-args`, checked: AsyncEngineArgs fields the service does not set itself."""
    known = {field.name for field in dataclasses.fields(AsyncEngineArgs)}
    for key in settings.engine_args:
        if key in owned:
            raise ValueError(f"engine_args: `{key}` is set by the service; use its own setting")
        if key not in known:
            raise ValueError(f"engine_args: `{key}` is not a vLLM engine argument")
    return dict(settings.engine_args)


def engine_args(settings: Settings, model_path: str, served_name: str) -> AsyncEngineArgs:
    """vLLM engine arguments for the service's settings (LoRA always on)."""
    kv_cache_bytes = settings.kv_cache_memory_bytes
    if kv_cache_bytes is None and current_platform.is_cpu():
        kv_cache_bytes = CPU_DEFAULT_KV_CACHE_BYTES
    optional: dict[str, Any] = {
        "max_model_len": settings.max_model_len,
        "max_num_seqs": settings.max_num_seqs,
    }
    owned: dict[str, Any] = dict(
        model=model_path,
        served_model_name=[served_name],
        dtype=settings.dtype,
        seed=settings.seed,
        enable_lora=True,
        max_loras=settings.max_loras,
        max_lora_rank=settings.max_lora_rank,  # one vLLM accepts: checked by Settings
        max_cpu_loras=settings.max_cpu_loras,
        enable_tower_connector_lora=settings.enable_tower_lora,
        kv_cache_memory_bytes=kv_cache_bytes,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        limit_mm_per_prompt={
            "image": settings.max_images_per_prompt,
            "audio": settings.max_audios_per_prompt,
            "video": 0,
        },
        # No free whitespace between JSON tokens: a model can otherwise loop on whitespace until
        # max_tokens and return truncated JSON.
        structured_outputs_config=StructuredOutputsConfig(
            backend="xgrammar", disable_any_whitespace=True
        ),
        # Requests are logged by the service with its own request ids.
        enable_log_requests=False,
        tensor_parallel_size=settings.tensor_parallel_size,
        # Reports the workers' LoRA caches (the residency metric).
        worker_extension_cls=f"{LoraResidencyExtension.__module__}.{LoraResidencyExtension.__qualname__}",
        **{key: value for key, value in optional.items() if value is not None},
    )
    extra = _passed_through(settings, set(owned) | set(optional))
    return AsyncEngineArgs(**owned, **extra)


def sampling_params(sampling: Sampling) -> SamplingParams:
    """vLLM's SamplingParams for a request; vLLM validates the values (ValueError if invalid)."""
    structured = None
    if sampling.json_schema is not None:
        structured = StructuredOutputsParams(json=sampling.json_schema)
    elif sampling.json_object:
        structured = StructuredOutputsParams(json_object=True)
    elif sampling.structural_tag is not None:
        structured = StructuredOutputsParams(structural_tag=sampling.structural_tag)
    return SamplingParams(
        n=sampling.n,
        max_tokens=sampling.max_tokens,
        min_tokens=sampling.min_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        seed=sampling.seed,
        stop=list(sampling.stop),
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        repetition_penalty=sampling.repetition_penalty,
        logprobs=sampling.logprobs,
        prompt_logprobs=sampling.prompt_logprobs,
        ignore_eos=sampling.ignore_eos,
        structured_outputs=structured,
        skip_special_tokens=sampling.skip_special_tokens,
        output_kind=RequestOutputKind.DELTA,
    )


def lora_request(adapter: AdapterRef) -> LoRARequest:
    """vLLM's handle for one adapter version."""
    # vLLM keys prefix-cache blocks by (lora_name, lora_path): a per-version name keeps a new
    # version loaded from the same folder away from the old version's cached blocks.
    return LoRARequest(
        lora_name=f"{adapter.name}@{adapter.int_id}",
        lora_int_id=adapter.int_id,
        lora_path=adapter.path,
    )


def served_name(request: LoRARequest) -> str:
    """The adapter's served name in a LoRARequest made by `lora_request` (without `@<id>`)."""
    return request.lora_name.removesuffix(f"@{request.lora_int_id}")


def _engine_prompt(prompt: Prompt) -> TextPrompt:
    engine_prompt = TextPrompt(prompt=prompt.text)
    media: dict[str, Any] = {}
    if prompt.images:
        media["image"] = list(prompt.images)
    if prompt.audios:
        media["audio"] = [(audio, AUDIO_SAMPLE_RATE) for audio in prompt.audios]
    if media:
        engine_prompt["multi_modal_data"] = media
    return engine_prompt


def finite_logprob(logprob: float) -> float:
    """-inf (an impossible token) or NaN (degenerate sampling parameters, such as a repetition
    penalty near 0) as MIN_LOGPROB: JSON has neither, and the API types want a number."""
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


def _token_logprobs(
    token_ids: Sequence[int], steps: SampleLogprobs | PromptLogprobs | None
) -> list[TokenLogprob] | None:
    """Each token's log-prob and its step's top alternatives (steps without any are skipped)."""
    if steps is None:
        return None
    result = []
    for token_id, step in zip(token_ids, steps, strict=False):
        if step is None:
            continue
        top = [
            (tid, lp.decoded_token or "", finite_logprob(lp.logprob)) for tid, lp in step.items()
        ]
        top.sort(key=lambda item: item[2], reverse=True)
        chosen = step[token_id]
        result.append(
            TokenLogprob(token_id, chosen.decoded_token or "", finite_logprob(chosen.logprob), top)
        )
    return result


def _queue_seconds(output: RequestOutput) -> float | None:
    stats = output.metrics
    if stats is None or not stats.scheduled_ts or not stats.queued_ts:
        return None
    return max(0.0, stats.scheduled_ts - stats.queued_ts)


def _chunk(output: RequestOutput) -> GenerationChunk:
    return GenerationChunk(
        request_id=output.request_id,
        prompt_token_count=len(output.prompt_token_ids or []),
        completions=[
            CompletionDelta(
                index=completion.index,
                text=completion.text,
                token_ids=list(completion.token_ids),
                logprobs=_token_logprobs(completion.token_ids, completion.logprobs),
                finish_reason=completion.finish_reason,
            )
            for completion in output.outputs
        ],
        finished=output.finished,
        queue_seconds=_queue_seconds(output),
        # vLLM has no log-prob for the first prompt token: its entry is None.
        prompt_logprobs=_token_logprobs(output.prompt_token_ids or [], output.prompt_logprobs),
    )


def _client_fault(exc: Exception) -> EngineError:
    # The message only: VLLMValidationError's str() would echo the rejected value back.
    message = str(exc.args[0]) if exc.args else type(exc).__name__
    return EngineError(message, is_client_fault=True)


@contextlib.contextmanager
def _engine_alive() -> Iterator[None]:
    """vLLM's EngineDeadError as the service's, which the supervisor acts on."""
    try:
        yield
    except VllmEngineDeadError as exc:
        raise EngineDeadError("the inference engine stopped") from exc


class VllmEngine:
    """`InferenceEngine` on vLLM's AsyncLLM."""

    def __init__(self, llm: AsyncLLM) -> None:
        self._llm = llm

    @classmethod
    async def start(cls, settings: Settings, model_path: str, served_name: str) -> VllmEngine:
        """Start the engine processes; the event loop keeps serving while they come up."""
        args = engine_args(settings, model_path, served_name)
        llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        return cls(llm)

    @property
    def max_model_len(self) -> int:
        return int(self._llm.model_config.max_model_len)

    @property
    def dtype(self) -> str:
        """The dtype the model runs in, as vLLM resolved `--dtype` (e.g. `bfloat16` for auto)."""
        return str(self._llm.model_config.dtype).removeprefix("torch.")

    async def generate(
        self, request_id: str, prompt: Prompt, sampling: Sampling, adapter: AdapterRef | None
    ) -> AsyncIterator[GenerationChunk]:
        """Stream output deltas; raises EngineError (client fault if vLLM rejects the input)."""
        try:
            params = sampling_params(sampling)
        except (ValueError, VLLMClientError) as exc:
            raise _client_fault(exc) from exc
        stream = self._llm.generate(
            _engine_prompt(prompt),
            params,
            request_id,
            lora_request=lora_request(adapter) if adapter else None,
        )
        try:
            async for output in stream:
                yield _chunk(output)
        except VllmEngineDeadError as exc:
            raise EngineDeadError("the inference engine stopped") from exc
        except (ValueError, VLLMClientError) as exc:  # vLLM's input checks: prompt length, media
            raise _client_fault(exc) from exc

    async def abort(self, request_id: str) -> None:
        with _engine_alive():
            await self._llm.abort(request_id)

    async def add_adapter(self, adapter: AdapterRef) -> None:
        """Load an adapter version into the engine; raises EngineError if vLLM refuses it."""
        try:
            added = await self._llm.add_lora(lora_request(adapter))
        except VllmEngineDeadError as exc:
            raise EngineDeadError("the inference engine stopped") from exc
        except Exception as exc:  # vLLM raises assorted types for a bad adapter
            raise EngineError(f"the engine could not load the adapter: {exc}") from exc
        if not added:
            raise EngineError("the engine could not load the adapter")

    async def remove_adapter(self, int_id: int) -> bool:
        with _engine_alive():
            return await self._llm.remove_lora(int_id)

    async def pin_adapter(self, int_id: int) -> bool:
        with _engine_alive():
            return await self._llm.pin_lora(int_id)

    async def list_adapters(self) -> set[int]:
        with _engine_alive():
            return set(await self._llm.list_loras())  # a list in vLLM 0.32

    async def adapter_residency(self) -> list[ResidentAdapter]:
        """The adapters in the workers' LoRA caches: accelerator slot or host cache, pinned."""
        with _engine_alive():
            per_worker = await self._llm.collective_rpc(RESIDENCY_RPC)
        # Tensor-parallel workers each hold a shard of the same adapters: the first speaks for all.
        return [
            ResidentAdapter(int_id, "gpu" if in_slot else "cpu", pinned)
            for int_id, in_slot, pinned in per_worker[0]
        ]

    def adapter_activity(self) -> AdapterActivity:
        """Adapters of the requests the engine holds, running or waiting, by served name.

        Read from the front end's own request table (this process; no call to the engine core):
        vLLM marks a request running when the engine core reports it scheduled. Its own
        `vllm:lora_requests_info` gauge cannot be used as it is: it labels adapters with the
        LoRARequest's per-version name (`demo-attn@2`), and it lists every adapter with requests in
        both labels (vLLM 0.32 fills the waiting and running dicts with the same keys).
        """
        processor = self._llm.output_processor
        states = processor.lora_states
        running: set[str] = set()
        waiting: set[str] = set()
        for request_id, state in processor.request_states.items():
            if state.lora_request is None:
                continue
            if states.log_stats:  # vLLM tracks scheduling events only when it logs stats
                stats = states.requests.get(state.lora_request.lora_name)
                scheduled = stats is not None and request_id in stats.running
            else:
                scheduled = not state.is_prefilling
            (running if scheduled else waiting).add(served_name(state.lora_request))
        return AdapterActivity(frozenset(running), frozenset(waiting))

    def running_request_count(self) -> int:
        return self._llm.get_num_unfinished_requests()

    async def check_health(self) -> None:
        try:
            await self._llm.check_health()
        except Exception as exc:
            raise EngineDeadError("the inference engine stopped") from exc

    async def shutdown(self) -> None:
        await asyncio.to_thread(self._llm.shutdown)
