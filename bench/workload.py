"""The benchmark's configuration and its seeded workload: the same requests for every target.

Everything here is pure and deterministic, so the harness (HTTP targets) and the engine-alone
runner (a separate process) rebuild exactly the same prompts, images and adapter choices.
"""

from __future__ import annotations

import base64
import io
import json
import random
import zlib
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

MIB = 2**20
ADMIN_KEY = "bench-admin-key"

# Plain English words: the tiny model's tokenizer was trained on English text.
_WORD_TEXT = (
    "river stone light garden window paper music winter summer forest market bridge "
    "cloud mountain ocean letter morning evening silver golden quiet simple bright "
    "gentle story village teacher doctor farmer painter island harbor station engine "
    "signal number question answer reason season flower branch meadow valley shadow "
    "candle thunder journey history memory picture kitchen table chair basket bottle "
    "mirror pocket travel listen follow gather wonder measure remember consider discover "
    "imagine"
)
_WORDS = tuple(_WORD_TEXT.split())


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings given identically to every target."""

    model_dir: str
    served_name: str
    dtype: str = "float32"
    max_model_len: int = 1024
    kv_cache_memory_bytes: int = 64 * MIB
    max_num_seqs: int = 32
    max_loras: int = 4
    max_cpu_loras: int = 8
    max_lora_rank: int = 16
    seed: int = 0
    max_images_per_prompt: int = 4
    max_audios_per_prompt: int = 1


@dataclass(frozen=True)
class WorkloadConfig:
    """Request shapes and counts."""

    prompt_tokens: int = 128  # rendered chat prompt, text part (an image adds its soft tokens)
    output_tokens: int = 32  # exact: ignore_eos with min_tokens = max_tokens
    seed: int = 20260601
    image_share: float = 0.2
    image_size: int = 64
    # Requests per measured run, by concurrency; warm-up requests come on top.
    requests: dict[int, int] = field(default_factory=lambda: {1: 10, 8: 40, 32: 96})
    warmup_requests: int = 4
    hot_loads: int = 3  # hot-load measurements per target start

    def request_count(self, concurrency: int) -> int:
        return self.requests.get(concurrency, max(4 * concurrency, 8))


@dataclass(frozen=True)
class Mix:
    """Which model each request names, and how many carry an image."""

    name: str
    adapters: int  # 0: the base model only; else round-robin over the first `adapters`
    image_share: float = 0.0
    description: str = ""
    with_base: bool = False  # the base model takes its turn in the round-robin too


MIXES: dict[str, Mix] = {
    m.name: m
    for m in (
        Mix("base", 0, description="base model only"),
        Mix("one-adapter", 1, description="one adapter"),
        Mix("mix-4", 3, description="base + 3 adapters round-robin", with_base=True),
        Mix("8-adapters", 8, description="8 adapters round-robin, max_loras 4"),
        Mix("churn-100", 100, description="100 adapters round-robin, max_cpu_loras 8"),
        Mix("image-20%", 0, 0.2, description="base model, 20% of requests with a 64x64 PNG"),
    )
}


@dataclass(frozen=True)
class Cell:
    mix: str
    concurrency: int

    @property
    def key(self) -> str:
        return f"{self.mix}@c{self.concurrency}"


@dataclass(frozen=True)
class BenchRequest:
    """One request, as the same data for the HTTP targets and the engine."""

    model: str  # the served base name or an adapter name
    text: str
    image_png: bytes | None = None

    def http_body(self, output_tokens: int) -> bytes:
        """The OpenAI chat body (streamed, greedy, exact output length) as JSON bytes."""
        content: Any = self.text
        if self.image_png is not None:
            url = "data:image/png;base64," + base64.b64encode(self.image_png).decode()
            content = [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": self.text},
            ]
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": output_tokens,
            "min_tokens": output_tokens,
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        return json.dumps(body).encode()


def adapter_names(count: int) -> list[str]:
    """Names (and folder names) of the registered bench adapters."""
    return [f"bench-{i:03d}" for i in range(count)]


def hot_adapter_names(count: int) -> list[str]:
    """Adapters never registered at start-up, loaded while the target runs."""
    return [f"hot-{i:02d}" for i in range(count)]


def _cell_seed(seed: int, *parts: object) -> int:
    return zlib.crc32("|".join(str(p) for p in (seed, *parts)).encode())


def png_image(rng: random.Random, size: int) -> bytes:
    """A seeded noise image: distinct per request, so no media cache can serve it twice."""
    from PIL import Image

    pixels = bytes(rng.getrandbits(8) for _ in range(size * size * 3))
    out = io.BytesIO()
    Image.frombytes("RGB", (size, size), pixels).save(out, format="PNG")
    return out.getvalue()


class PromptFactory:
    """Seeded prompts whose rendered chat prompt has an exact token count."""

    def __init__(self, model_dir: str | Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))

    def render(self, text: str, with_image: bool = False) -> str:
        """The prompt as the model's chat template renders it (what the servers render)."""
        content: Any = text
        if with_image:
            content = [{"type": "image"}, {"type": "text", "text": text}]
        rendered = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        return str(rendered)

    def count(self, text: str) -> int:
        return len(self.tokenizer(self.render(text), add_special_tokens=False)["input_ids"])

    @cached_property
    def _overhead(self) -> int:
        return self.count("")

    def text(self, rng: random.Random, tokens: int) -> str:
        """User text whose rendered prompt is `tokens` long (or one or two tokens more)."""
        words = " ".join(rng.choice(_WORDS) for _ in range(tokens * 2))
        ids = self.tokenizer(words, add_special_tokens=False)["input_ids"]
        keep = max(1, tokens - self._overhead)
        best = ""
        for _ in range(8):
            candidate = str(self.tokenizer.decode(ids[:keep])).strip()
            got = self.count(candidate)
            best = candidate
            if got == tokens or keep <= 1:
                break
            keep = max(1, keep + tokens - got)
        return best


def cell_requests(
    factory: PromptFactory,
    workload: WorkloadConfig,
    served_name: str,
    mix: Mix,
    count: int,
    registered: int,
    *purpose: object,
) -> list[BenchRequest]:
    """`count` seeded requests of `mix`; `purpose` (cell, warm-up, ...) picks the seed.

    `registered` caps the adapters a mix can use (the short mode registers fewer).
    """
    rng = random.Random(_cell_seed(workload.seed, mix.name, *purpose))
    names = adapter_names(min(mix.adapters, registered))
    if mix.with_base:
        names.insert(0, served_name)
    offset = rng.randrange(len(names)) if len(names) > 1 else 0
    image_count = round(count * mix.image_share)
    with_image = set(rng.sample(range(count), image_count))
    requests = []
    for i in range(count):
        model = names[(offset + i) % len(names)] if names else served_name
        image = png_image(rng, workload.image_size) if i in with_image else None
        requests.append(BenchRequest(model, factory.text(rng, workload.prompt_tokens), image))
    return requests


def to_json(obj: Any) -> Any:
    """Dataclasses (and dict keys that are ints) as plain JSON data."""
    if hasattr(obj, "__dataclass_fields__"):
        return {k: to_json(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_json(v) for v in obj]
    return obj


def workload_from_json(data: dict[str, Any]) -> WorkloadConfig:
    data = dict(data)
    data["requests"] = {int(k): int(v) for k, v in data["requests"].items()}
    return WorkloadConfig(**data)
