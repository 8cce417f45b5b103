"""Offline generation on the default model: the base and every demo adapter answer one prompt."""

from __future__ import annotations

import asyncio
import logging

from server.default_model import ensure_default_model
from server.inference_engine import AdapterRef, Prompt, Sampling
from server.settings import Settings

logger = logging.getLogger(__name__)

PROMPT = "Tell me about the river."


async def generate_all(settings: Settings) -> dict[str, str]:
    """Greedy answers of the base model and of each demo adapter, by name."""
    from transformers import AutoTokenizer

    from server.engine import VllmEngine

    tiny = ensure_default_model(settings.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny.model_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    adapters = [
        AdapterRef(name=name, int_id=i, path=str(path))
        for i, (name, path) in enumerate(tiny.adapter_dirs().items(), start=1)
    ]
    engine = await VllmEngine.start(settings, str(tiny.model_dir), tiny.model_dir.name)
    try:
        answers = {}
        for adapter in [None, *adapters]:
            name = adapter.name if adapter else "base"
            pieces = []
            sampling = Sampling(max_tokens=24, temperature=0.0)
            async for chunk in engine.generate(
                f"demo-{name}", Prompt(text=text), sampling, adapter
            ):
                pieces.extend(c.text for c in chunk.completions)
            answers[name] = "".join(pieces)
        return answers
    finally:
        await engine.shutdown()


def main() -> None:
    """Print each answer on its own line."""
    logging.basicConfig(level=logging.WARNING)
    settings = Settings(dtype="float32", max_model_len=1024, kv_cache_memory_bytes=64 * 2**20)
    answers = asyncio.run(generate_all(settings))
    print(f"prompt: {PROMPT!r}")
    for name, answer in answers.items():
        print(f"{name:>10}: {answer!r}")


if __name__ == "__main__":
    main()
