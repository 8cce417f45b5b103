"""The same Responses API requests to this service and to `vllm serve`, through the official client.

    .venv/bin/python -m bench.responses_compare [--out bench/results/responses.md]

Starts one target at a time on the tiny Gemma 4 and its demo adapters (vLLM with
`--enable-auto-tool-choice --tool-call-parser gemma4 --reasoning-parser gemma4`), sends each
request with `openai.OpenAI().responses`, and prints one table row per check: what each answered.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from typing import Any

import jsonschema
import numpy as np
import openai
import soundfile
from PIL import Image

from bench.side_by_side import compare, parse_args
from server.testbed.default_model import ensure_default_model
from server.testbed.demo_training import WEATHER_TOOLS

QUESTION = "What is the weather in Paris?"
TOOLS: list[Any] = [{"type": "function", **tool["function"]} for tool in WEATHER_TOOLS]
FORCED_TOOLS: list[Any] = [
    {
        **tool,
        "parameters": {
            **tool["parameters"],
            "properties": {"city": {"type": "string", "maxLength": 10}},
        },
    }
    for tool in TOOLS
]
SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
    "required": ["color", "ok"],
    "additionalProperties": False,
}
GREEDY: dict[str, Any] = {"temperature": 0, "max_output_tokens": 40}
Check = Callable[[openai.OpenAI], str]


def _png() -> str:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _wav() -> str:
    buffer = io.BytesIO()
    t = np.arange(16_000) / 16_000
    soundfile.write(
        buffer, (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16_000, format="WAV"
    )
    return base64.b64encode(buffer.getvalue()).decode()


def _guard(check: Check) -> Check:
    """A check's answer, or the error status and `param` the server sent."""

    def guarded(client: openai.OpenAI) -> str:
        try:
            return check(client)
        except openai.APIStatusError as exc:
            body: Any = exc.body if isinstance(exc.body, dict) else {}
            body = body.get("error", body)
            return f"{exc.status_code} param={body.get('param')}"
        except Exception as exc:  # a client-side failure is a result too
            return f"client error: {type(exc).__name__}: {str(exc)[:60]}"

    return guarded


def _summary(response: Any) -> str:
    calls = [
        f"{item.name}({item.arguments})" for item in response.output if item.type == "function_call"
    ]
    kinds = ",".join(item.type for item in response.output)
    text = response.output_text[:28]
    usage = response.usage
    tokens = f"{usage.input_tokens}/{usage.output_tokens}" if usage else "no usage"
    called = f"; calls {', '.join(calls)}" if calls else ""
    return f"{response.status}; [{kinds}]; {text!r}{called}; tokens {tokens}"


def _create(**fields: Any) -> Check:
    return lambda client: _summary(client.responses.create(**fields))


def _stream_equals_create(**fields: Any) -> Check:
    def check(client: openai.OpenAI) -> str:
        whole = client.responses.create(**fields)
        with client.responses.stream(**fields) as stream:
            kinds = [event.type for event in stream]
            final = stream.get_final_response()
        same = final.output_text == whole.output_text and [i.type for i in final.output] == [
            i.type for i in whole.output
        ]
        distinct = list(dict.fromkeys(kinds))
        return f"{'equal' if same else 'DIFFERENT'}; {len(kinds)} events: {' '.join(distinct)}"

    return check


def _tool_round_trip(chained: bool) -> Check:
    def check(client: openai.OpenAI) -> str:
        common: dict[str, Any] = {"model": "demo-tools", "tools": TOOLS, **GREEDY}
        first = client.responses.create(input=QUESTION, **common)
        calls = [item for item in first.output if item.type == "function_call"]
        if not calls:
            return f"no call: {_summary(first)}"
        result: Any = {
            "type": "function_call_output",
            "call_id": calls[0].call_id,
            "output": "sunny, 21 C",
        }
        if chained:
            answer = client.responses.create(
                input=[result], previous_response_id=first.id, **common
            )
        else:
            history: list[Any] = [
                {"role": "user", "content": QUESTION},
                *[item.model_dump(exclude_none=True) for item in first.output],
                result,
            ]
            answer = client.responses.create(input=history, store=False, **common)
        return f"{calls[0].name}({calls[0].arguments}) -> {answer.output_text!r}"

    return check


def _json_schema(client: openai.OpenAI) -> str:
    response = client.responses.create(
        model="demo-all",
        input="Tell me a story about a cat.",
        temperature=0,
        max_output_tokens=60,
        text={"format": {"type": "json_schema", "name": "ball", "schema": SCHEMA}},
    )
    try:
        jsonschema.validate(json.loads(response.output_text), SCHEMA)
        valid = "valid"
    except (ValueError, jsonschema.ValidationError):
        valid = "INVALID"
    return f"{valid}: {response.output_text[:40]!r}"


def _reasoning_tokens(client: openai.OpenAI) -> str:
    counts = []
    for effort in ("none", "high"):
        response = client.responses.create(
            model="tiny-gemma4", input=QUESTION, max_output_tokens=1, reasoning={"effort": effort}
        )
        counts.append(response.usage.input_tokens if response.usage else -1)
    return f"input tokens {counts[0]} -> {counts[1]}"


def _incomplete(client: openai.OpenAI) -> str:
    response = client.responses.create(model="demo-pirate", input=QUESTION, max_output_tokens=3)
    reason = response.incomplete_details.reason if response.incomplete_details else None
    with client.responses.stream(
        model="demo-pirate", input=QUESTION, max_output_tokens=3
    ) as stream:
        last = [event.type for event in stream][-1]
    return f"{response.status} ({reason}); stream ends with {last}"


def _retrieve(client: openai.OpenAI) -> str:
    first = client.responses.create(model="demo-pirate", input="Hi", **GREEDY)
    again = client.responses.retrieve(first.id)
    return f"retrieved {'same' if again.output_text == first.output_text else 'DIFFERENT'}"


def _media(kind: str) -> Check:
    part = (
        {"type": "input_image", "image_url": _png(), "detail": "auto"}
        if kind == "image"
        else {"type": "input_audio", "input_audio": {"data": _wav(), "format": "wav"}}
    )
    item = {"role": "user", "content": [part, {"type": "input_text", "text": "What is this?"}]}
    return _create(model="demo-attn", input=[item], **GREEDY)


def checks() -> dict[str, Check]:
    named = {"type": "function", "name": "get_time"}
    found: dict[str, Check] = {
        "create, base": _create(model="tiny-gemma4", input=QUESTION, **GREEDY),
        "create, demo-pirate": _create(model="demo-pirate", input=QUESTION, **GREEDY),
        "create, instructions + message list": _create(
            model="demo-pirate",
            instructions="You are a helpful assistant.",
            input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
            **GREEDY,
        ),
        "stream == create, demo-pirate": _stream_equals_create(
            model="demo-pirate", input=QUESTION, **GREEDY
        ),
        "stream == create, required call": _stream_equals_create(
            model="tiny-gemma4",
            input=QUESTION,
            tools=FORCED_TOOLS,
            tool_choice="required",
            temperature=0,
            max_output_tokens=80,
        ),
        "input_image (data URL)": _media("image"),
        "input_audio (wav)": _media("audio"),
        "tool_choice required, base": _create(
            model="tiny-gemma4",
            input=QUESTION,
            tools=FORCED_TOOLS,
            tool_choice="required",
            max_output_tokens=80,
        ),
        "tool_choice named get_time, base": _create(
            model="tiny-gemma4",
            input=QUESTION,
            tools=FORCED_TOOLS,
            tool_choice=named,
            max_output_tokens=80,
        ),
        "auto, demo-tools: call, result by previous_response_id": _tool_round_trip(True),
        "auto, demo-tools: call, result with history as input": _tool_round_trip(False),
        "text.format json_schema": _json_schema,
        "reasoning.effort none -> high": _reasoning_tokens,
        "max_output_tokens 3": _incomplete,
        "GET /v1/responses/{id}": _retrieve,
        "unknown model": _create(model="nope", input="Hi", max_output_tokens=2),
        "web_search tool": _create(
            model="tiny-gemma4", input="Hi", tools=[{"type": "web_search"}], max_output_tokens=2
        ),
        "background: true": _create(
            model="tiny-gemma4", input="Hi", background=True, max_output_tokens=2
        ),
        "unknown previous_response_id": _create(
            model="tiny-gemma4", input="Hi", previous_response_id="resp_nope", max_output_tokens=2
        ),
        "tool_choice named, not declared": _create(
            model="tiny-gemma4",
            input="Hi",
            tools=TOOLS,
            tool_choice={"type": "function", "name": "nope"},
            max_output_tokens=2,
        ),
    }
    return {label: _guard(check) for label, check in found.items()}


def main() -> None:
    args = parse_args(__doc__)

    def answers(url: str) -> dict[str, str]:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        return {label: check(client) for label, check in checks().items()}

    compare(ensure_default_model(args.cache_dir), "demo-pirate", answers, args.out)


if __name__ == "__main__":
    main()
