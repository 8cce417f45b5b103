"""The same tool-calling requests to this service and to `vllm serve` with vLLM's gemma4 parsers.

    .venv/bin/python -m bench.tools_compare [--cache-dir .cache] [--out bench/results/tools.md]

Starts one target at a time on the tiny Gemma 4 and its demo adapters (vLLM with
`--enable-auto-tool-choice --tool-call-parser gemma4 --reasoning-parser gemma4`), sends each
request, and prints one table row per check: what each answered.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import jsonschema

from bench.side_by_side import SERVED_NAME, compare, parse_args
from server.testbed.default_model import ensure_default_model

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city for some days",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "days": {"type": "integer", "minimum": 1},
            },
            "required": ["city", "days"],
        },
    },
}
TIME: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Time in a zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
        },
    },
}
TOOLS = [WEATHER, TIME]
SCHEMAS: dict[str, Any] = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
BAD_SCHEMA = {"type": "object", "properties": 1}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_time"}}
Check = Callable[[httpx.Client, str], str]


def _post(http: httpx.Client, path: str, body: dict[str, Any]) -> httpx.Response:
    return http.post(path, json=body, timeout=300)


def _calls(message: dict[str, Any]) -> str:
    """`name(args) valid|INVALID` for each call, or `no call`."""
    out = []
    for call in message.get("tool_calls") or []:
        name = call["function"]["name"]
        try:
            arguments = json.loads(call["function"]["arguments"])
            jsonschema.validate(arguments, SCHEMAS[name])
            valid = "valid"
        except (ValueError, KeyError, jsonschema.ValidationError):
            valid = "INVALID"
        out.append(f"{name} {valid}")
    return ", ".join(out) or "no call"


def _chat(model: str, **fields: Any) -> Check:
    def check(http: httpx.Client, _: str) -> str:
        body = {"model": model, "messages": MESSAGES, "max_tokens": 80, "seed": 1, **fields}
        response = _post(http, "/v1/chat/completions", body)
        if response.status_code != 200:
            return f"{response.status_code}"
        choice = response.json()["choices"][0]
        content = (choice["message"].get("content") or "")[:24]
        return f"{choice['finish_reason']}; {_calls(choice['message'])}; content {content!r}"

    return check


def _status(path: str, **fields: Any) -> Check:
    def check(http: httpx.Client, model: str) -> str:
        body = {"model": model, "max_tokens": 4, **fields}
        response = _post(http, path, body)
        error = response.json().get("error", {}) if response.status_code != 200 else {}
        return f"{response.status_code} param={error.get('param')}"

    return check


def _stream_equals_whole(model: str) -> Check:
    def check(http: httpx.Client, _: str) -> str:
        body = {
            "model": model,
            "messages": MESSAGES,
            "tools": TOOLS,
            "tool_choice": "required",
            "max_tokens": 80,
            "temperature": 0,
        }
        whole = _post(http, "/v1/chat/completions", body).json()["choices"][0]
        calls: dict[int, dict[str, str]] = {}
        finish = None
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as sse:
            for line in sse.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for choice in json.loads(line[6:]).get("choices", []):
                    finish = choice.get("finish_reason") or finish
                    for part in choice["delta"].get("tool_calls") or []:
                        call = calls.setdefault(part["index"], {"name": "", "arguments": ""})
                        function = part.get("function") or {}
                        call["name"] += function.get("name") or ""
                        call["arguments"] += function.get("arguments") or ""
        whole_calls = [
            (c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in whole["message"].get("tool_calls") or []
        ]
        try:
            streamed = [(c["name"], json.loads(c["arguments"])) for c in calls.values()]
        except ValueError:
            streamed = [("unparsable", {})]
        same = streamed == whole_calls and finish == whole["finish_reason"]
        return f"{'equal' if same else 'DIFFERENT'} ({len(whole_calls)} calls, {finish})"

    return check


def _prompt_tokens(model: str) -> Check:
    def check(http: httpx.Client, _: str) -> str:
        counts = []
        for extra in ({}, {"reasoning_effort": "high"}):
            body = {"model": model, "messages": MESSAGES, "max_tokens": 1, **extra}
            counts.append(
                _post(http, "/v1/chat/completions", body).json()["usage"]["prompt_tokens"]
            )
        return f"prompt tokens {counts[0]} -> {counts[1]}"

    return check


def checks(base: str, adapter: str) -> dict[str, Check]:
    cut = {"tools": TOOLS, "tool_choice": NAMED, "max_tokens": 4}
    return {
        f"required ({base})": _chat(base, tools=TOOLS, tool_choice="required"),
        f"required ({adapter})": _chat(adapter, tools=TOOLS, tool_choice="required"),
        f"named get_time ({base})": _chat(base, tools=TOOLS, tool_choice=NAMED),
        f"named get_time ({adapter})": _chat(adapter, tools=TOOLS, tool_choice=NAMED),
        f"auto ({adapter})": _chat(adapter, tools=TOOLS),
        "named, max_tokens 4": _chat(base, **cut),
        "stream == whole, required": _stream_equals_whole(base),
        "reasoning_effort high reaches the template": _prompt_tokens(base),
        "tools: []": _status("/v1/chat/completions", messages=MESSAGES, tools=[]),
        "tool_choice without tools": _status(
            "/v1/chat/completions", messages=MESSAGES, tool_choice="auto"
        ),
        "named tool not declared": _status(
            "/v1/chat/completions",
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "nope"}},
        ),
        "malformed schema (properties: 1)": _status(
            "/v1/chat/completions",
            messages=MESSAGES,
            tools=[
                {"type": "function", "function": {"name": "f", "parameters": {"properties": 1}}}
            ],
        ),
        "tools on /v1/completions": _status("/v1/completions", prompt="Hi", tools=TOOLS),
    }


def main() -> None:
    args = parse_args(__doc__)
    tiny = ensure_default_model(args.cache_dir)
    adapter = sorted(tiny.adapter_dirs())[0]

    def answers(url: str) -> dict[str, str]:
        with httpx.Client(base_url=url) as http:
            found = checks(SERVED_NAME, adapter)
            return {label: check(http, SERVED_NAME) for label, check in found.items()}

    compare(tiny, adapter, answers, args.out)


if __name__ == "__main__":
    main()
