"""Demo adapters trained on the tiny Gemma 4: a tool caller and a fixed style, seeded and cached.

The tiny model is random, so these adapters do not learn a skill: they memorise a few narrow
behaviours well enough that greedy decoding shows them, through vLLM in float32 and bfloat16.

- `demo-tools` answers weather and time questions about a few cities with Gemma 4's native tool
  calls (`<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>`) when the tools are
  declared, and, given the tool's result, answers with a sentence that contains it.
- `demo-pirate` answers any short question with the same pirate sentence.

Every prompt is rendered by the tiny model's own chat template (tools declared, assistant tool
calls and tool results in history), exactly as the service renders a chat request; the
completions are Gemma 4's native syntax. Training is LoRA on the language model's attention and
MLP projections (what vLLM serves), full batch AdamW, a fixed number of steps, on one CPU thread
so that the same seed gives the same bytes on any machine with the same torch build.

Usage: `python -m server.testbed.demo_training MODEL_DIR OUT_DIR [--seed N]`
writes `OUT_DIR/<name>/` for each trained adapter.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_LAYER = r".*language_model\.layers\.\d+\."
ALL_PROJECTIONS = _LAYER + r"(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"

END_OF_TURN = "<turn|>"
TOOL_RESPONSE = "<|tool_response>"  # the model stops on it after its calls
STRING = '<|"|>'  # Gemma 4's string delimiter in calls and declarations
# The logits of this random model span only ~5 (tied embeddings of std 0.02 under a fixed
# final norm), so plain cross-entropy barely separates a target from its nearest competitors;
# training on sharpened logits does.
SHARPNESS = 8.0


# --- the data ------------------------------------------------------------------------------------

WEATHER_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "The city."}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Get the local time in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "The city."}},
                "required": ["city"],
            },
        },
    },
]

# city -> (weather result, time result): what the tools answer in the training conversations.
TOOL_RESULTS: dict[str, tuple[str, str]] = {
    "Paris": ("sunny, 21 C", "09:30"),
    "London": ("rainy, 14 C", "08:00"),
    "Tokyo": ("cloudy, 18 C", "16:15"),
}
WEATHER_QUESTIONS = (
    "What is the weather in {city}?",
    "What's the weather like in {city}?",
)
TIME_QUESTIONS = ("What time is it in {city}?",)

PIRATE_REPLY = "Arr! Shiver me timbers, matey! That be a fine question."
PIRATE_QUESTIONS = (
    "Hi",
    "Hello!",
    "How are you?",
    "Who are you?",
    "What is your name?",
    "Tell me about the river.",
    "Tell me a story about a cat.",
    "What is the weather in Paris?",
    "What time is it?",
    "Can you help me?",
    "What is 2 + 2?",
    "Where is London?",
    "Why is the sky blue?",
    "Write a poem.",
    "What do you like?",
    "Good morning.",
)


def tool_call_text(name: str, city: str) -> str:
    """One native Gemma 4 call with a single string argument `city`."""
    return f"<|tool_call>call:{name}{{city:{STRING}{city}{STRING}}}<tool_call|>"


def tool_answer(name: str, city: str, result: str) -> str:
    """The sentence `demo-tools` answers with once the tool has returned `result`."""
    if name == "get_weather":
        return f"The weather in {city} is {result}."
    return f"It is {result} in {city}."


@dataclass(frozen=True)
class Example:
    """A conversation as the service renders it, and what the model should write next."""

    messages: list[dict[str, Any]]
    completion: str  # native Gemma 4 text, ending with the token the model stops on
    tools: list[dict[str, Any]] | None = None


def tool_conversation(question: str, name: str, city: str) -> list[dict[str, Any]]:
    """The user's question, the assistant's call and the tool's result, in OpenAI's shape.

    The call's arguments are a mapping, as the template needs them (the service JSON-decodes
    OpenAI's argument strings before templating).
    """
    result = TOOL_RESULTS[city][0 if name == "get_weather" else 1]
    call_id = f"call_{name}_{city.lower()}"
    return [
        {"role": "user", "content": question},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": {"city": city}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "name": name, "content": result},
    ]


def tool_examples() -> list[Example]:
    """Each question calls its tool; each conversation with the result gets the answer."""
    examples: list[Example] = []
    for city, (weather, clock) in TOOL_RESULTS.items():
        for name, questions, result in (
            ("get_weather", WEATHER_QUESTIONS, weather),
            ("get_time", TIME_QUESTIONS, clock),
        ):
            for question in questions:
                conversation = tool_conversation(question.format(city=city), name, city)
                examples.append(
                    Example(
                        conversation[:1],
                        tool_call_text(name, city) + TOOL_RESPONSE,
                        WEATHER_TOOLS,
                    )
                )
                examples.append(
                    Example(
                        conversation, tool_answer(name, city, result) + END_OF_TURN, WEATHER_TOOLS
                    )
                )
    return examples


def pirate_examples() -> list[Example]:
    """Every question gets the pirate reply, with and without a system prompt."""
    examples = [
        Example([{"role": "user", "content": q}], PIRATE_REPLY + END_OF_TURN)
        for q in PIRATE_QUESTIONS
    ]
    examples += [
        Example(
            [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": q},
            ],
            PIRATE_REPLY + END_OF_TURN,
        )
        for q in PIRATE_QUESTIONS[::4]
    ]
    return examples


@dataclass(frozen=True)
class TrainedAdapterSpec:
    """One trained demo adapter: name, LoRA shape, data and the training recipe."""

    name: str
    rank: int
    target_modules: str
    examples: tuple[Example, ...] = field(repr=False)
    steps: int
    learning_rate: float

    @property
    def alpha(self) -> int:
        """`lora_alpha`; equal to the rank, so PEFT's scaling is 1."""
        return self.rank


def trained_adapter_specs() -> tuple[TrainedAdapterSpec, ...]:
    """The trained demo adapters."""
    return (
        TrainedAdapterSpec("demo-pirate", 8, ALL_PROJECTIONS, tuple(pirate_examples()), 60, 5e-2),
        TrainedAdapterSpec("demo-tools", 16, ALL_PROJECTIONS, tuple(tool_examples()), 100, 5e-2),
    )


# --- rendering -----------------------------------------------------------------------------------


def render_prompt(tokenizer: Any, example: Example) -> str:
    """The prompt the service sends for `example`: its own chat template, generation prompt on."""
    text = tokenizer.apply_chat_template(
        example.messages,
        tools=example.tools,
        tokenize=False,
        add_generation_prompt=True,
    )
    return str(text)


@dataclass(frozen=True)
class TokenisedExample:
    prompt_ids: list[int]
    completion_ids: list[int]


def tokenise(tokenizer: Any, example: Example) -> TokenisedExample:
    """Prompt and completion ids; the template writes `<bos>` itself, so nothing is added."""
    prompt = tokenizer(render_prompt(tokenizer, example), add_special_tokens=False)["input_ids"]
    completion = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
    return TokenisedExample(list(prompt), list(completion))


# --- training ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    # Reductions split over threads sum in a machine-dependent order; one thread keeps the bytes
    # the same wherever the adapters are built.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class _Batch:
    prefix_ids: Any  # (1, prefix) the tokens every sequence of the batch starts with
    input_ids: Any  # (batch, length) the rest of each sequence, right-padded
    rows: Any  # (targets,) row of each predicted token
    columns: Any  # (targets,) position in `input_ids` whose logits predict it
    targets: Any  # (targets,)


def _common_prefix_length(sequences: list[list[int]]) -> int:
    shortest = min(len(s) for s in sequences)
    for position in range(shortest):
        if len({s[position] for s in sequences}) > 1:
            return position
    return shortest


def _batch(examples: list[TokenisedExample], pad_id: int) -> _Batch:
    """One batch: the shared prompt prefix once, the rest right-padded, with target positions.

    Right padding needs no attention mask: under causal attention no real token sees a pad.
    """
    import torch

    # Keep at least one prompt token per row: it predicts the first completion token.
    shared = min(
        _common_prefix_length([e.prompt_ids for e in examples]),
        min(len(e.prompt_ids) for e in examples) - 1,
    )
    rests = [e.prompt_ids[shared:] + e.completion_ids for e in examples]
    ids = torch.full((len(examples), max(len(r) for r in rests)), pad_id, dtype=torch.long)
    rows, columns, targets = [], [], []
    for row, (example, rest) in enumerate(zip(examples, rests, strict=True)):
        ids[row, : len(rest)] = torch.tensor(rest)
        first = len(example.prompt_ids) - shared - 1
        for offset, token in enumerate(example.completion_ids):
            rows.append(row)
            columns.append(first + offset)
            targets.append(token)
    return _Batch(
        torch.tensor([examples[0].prompt_ids[:shared]], dtype=torch.long),
        ids,
        torch.tensor(rows),
        torch.tensor(columns),
        torch.tensor(targets),
    )


def _target_logits(model: Any, batch: _Batch) -> Any:
    """Soft-capped logits at the target positions only (the full vocabulary elsewhere is waste).

    The shared prefix (the system turn with the tool declarations, most of each prompt) runs
    once and its KV cache is repeated for every row; gradients flow through it.
    """
    import torch

    causal_lm = model.get_base_model()
    language_model = causal_lm.model.language_model
    cache = None
    if batch.prefix_ids.shape[1]:
        cache = language_model(input_ids=batch.prefix_ids, use_cache=True).past_key_values
        cache.batch_repeat_interleave(batch.input_ids.shape[0])
    hidden = language_model(
        input_ids=batch.input_ids, past_key_values=cache, use_cache=cache is not None
    ).last_hidden_state
    logits = causal_lm.lm_head(hidden[batch.rows, batch.columns])
    cap = causal_lm.config.get_text_config().final_logit_softcapping
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@dataclass(frozen=True)
class TrainingReport:
    """How one adapter's training ended: loss, and the smallest greedy margin over targets."""

    name: str
    steps: int
    seconds: float  # wall clock
    cpu_seconds: float  # this process's CPU time
    loss: float
    min_margin: float  # target logit minus the best other logit; > 0 means greedy is right


def _margins(logits: Any, targets: Any) -> Any:
    target = logits.gather(1, targets[:, None])[:, 0]
    others = logits.scatter(1, targets[:, None], float("-inf"))
    return target - others.max(dim=1).values


def train_adapter(
    base: Any, tokenizer: Any, spec: TrainedAdapterSpec, *, seed: int = 0
) -> tuple[Any, TrainingReport]:
    """LoRA-train a copy of `base` on `spec`'s examples; return the PEFT model and a report."""
    import torch
    from peft import LoraConfig, get_peft_model

    started, cpu_started = time.monotonic(), time.process_time()
    with _one_thread():
        torch.manual_seed(
            seed * 1_000_003 + int(hashlib.sha256(spec.name.encode()).hexdigest()[:8], 16)
        )
        config = LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            lora_dropout=0.0,
            target_modules=spec.target_modules,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(copy.deepcopy(base), config)
        model.train()
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=spec.learning_rate, weight_decay=0.0)
        # Linear decay to zero: settles the margins instead of ending mid-oscillation.
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / spec.steps)
        batch = _batch([tokenise(tokenizer, e) for e in spec.examples], tokenizer.pad_token_id)
        for step in range(spec.steps):
            optimizer.zero_grad(set_to_none=True)
            logits = _target_logits(model, batch)
            loss = torch.nn.functional.cross_entropy(logits * SHARPNESS, batch.targets)
            loss.backward()
            optimizer.step()
            schedule.step()
            if step % 10 == 0:
                margin = float(_margins(logits.detach(), batch.targets).min())
                logger.debug("%s step %d: loss %.4f, margin %.3f", spec.name, step, loss, margin)
        model.eval()
        with torch.no_grad():
            logits = _target_logits(model, batch)
            loss_value = float(torch.nn.functional.cross_entropy(logits * SHARPNESS, batch.targets))
            margin = float(_margins(logits, batch.targets).min())
    report = TrainingReport(
        spec.name,
        spec.steps,
        time.monotonic() - started,
        time.process_time() - cpu_started,
        loss_value,
        margin,
    )
    return model, report


def write_trained_adapter(
    model_dir: Path, out_dir: Path, spec: TrainedAdapterSpec, *, seed: int = 0, base: Any = None
) -> TrainingReport:
    """Train `spec` on the model in `model_dir` and save it as a PEFT adapter in `out_dir`."""
    from transformers import AutoTokenizer

    from server.testbed.demo_adapters import load_base_model

    model_dir = Path(model_dir)
    base = base if base is not None else load_base_model(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model, report = train_adapter(base, tokenizer, spec, seed=seed)
    model.peft_config["default"].base_model_name_or_path = model_dir.resolve().name
    model.save_pretrained(str(out_dir), save_embedding_layers=False)
    (Path(out_dir) / "README.md").unlink(missing_ok=True)  # PEFT's card names the local path
    logger.info(
        "demo adapter %s trained: %d steps in %.1f s (%.1f s CPU), loss %.4f, "
        "smallest greedy margin %.2f",
        report.name,
        report.steps,
        report.seconds,
        report.cpu_seconds,
        report.loss,
        report.min_margin,
    )
    return report


def write_trained_adapters(
    model_dir: Path, out_dir: Path, *, seed: int = 0
) -> dict[str, TrainingReport]:
    """Train every adapter of `trained_adapter_specs()` into `out_dir/<name>/`."""
    from server.testbed.demo_adapters import load_base_model

    base = load_base_model(Path(model_dir))
    return {
        spec.name: write_trained_adapter(
            model_dir, Path(out_dir) / spec.name, spec, seed=seed, base=base
        )
        for spec in trained_adapter_specs()
    }


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description="Train the demo adapters of the tiny model.")
    parser.add_argument("model_dir", type=Path, help="the tiny Gemma 4 checkpoint")
    parser.add_argument("out_dir", type=Path, help="folder to write one sub-folder per adapter to")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_trained_adapters(args.model_dir, args.out_dir, seed=args.seed)


if __name__ == "__main__":
    main()
