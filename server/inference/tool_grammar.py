"""Constraints that force Gemma 4 to call a tool: xgrammar structural tags built from schemas.

A forced call (`tool_choice` `required` or named) is decoded under an xgrammar structural tag
(vLLM's `StructuredOutputsParams(structural_tag=...)`) that admits only Gemma 4's native call
syntax, `<|tool_call>call:NAME{key:<|"|>text<|"|>,n:42}<tool_call|>`, with each tool's arguments
constrained by its JSON schema. Special tokens (`<|tool_call>`, `<|"|>`, ...) are matched as
single tokens, because vLLM's Gemma 4 parser recognises them by token id.

What each schema keyword becomes:
- `type` string/integer/number/boolean/null/object/array (or a list of them), `enum`, `const`,
  `nullable`, `anyOf`/`oneOf`: enforced;
- objects: the declared `properties` in the order the chat template writes them (sorted), every
  `required` key present, no other keys; arrays: `items`, `minItems`, `maxItems`; strings:
  `maxLength`, `pattern`;
- integers have at most 18 digits and numbers at most 18+18 (so a weak model cannot spin on
  digits); `minimum` >= 0 forbids the sign, and > 0 zero too for integers;
- not enforced (the value is then any Gemma 4 value, or the keyword is ignored): `$ref`,
  `allOf`, `not`, `if`/`then`/`else`, `patternProperties`, `additionalProperties` (no extra key
  is ever produced), `minLength`, `format`, `maximum` and other bounds beyond the above,
  `multipleOf`, `uniqueItems`.
String values may not contain `<|` or `|>` (every Gemma 4 special token holds one of them), so a
string cannot end a call early; a string with `maxLength` holds no `<` or `|` at all.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

TOOL_CALL_START = "<|tool_call>"
TOOL_CALL_END = "<tool_call|>"
STRING_DELIM = '<|"|>'
CHANNEL_START = "<|channel>"
CHANNEL_END = "<channel|>"
# Every Gemma 4 special token contains one of these, so excluding them keeps free text free of
# special tokens (the tokenizer does not mark them special, so xgrammar would allow them).
_SPECIAL_MARKERS = ["<|", "|>"]

MAX_INTEGER_DIGITS = 18
_INTEGER = rf"(0|[1-9][0-9]{{0,{MAX_INTEGER_DIGITS - 1}}})"
_FRACTION = rf"(\.[0-9]{{1,{MAX_INTEGER_DIGITS}}})?([eE][+-]?[0-9]{{1,3}})?"

Format = dict[str, Any]  # one xgrammar structural-tag format, as JSON


def _const(text: str) -> Format:
    return {"type": "const_string", "value": text}


def _token(token: str) -> Format:
    return {"type": "token", "token": token}


def _seq(*elements: Format) -> Format:
    flat: list[Format] = []
    for element in elements:
        flat.extend(element["elements"] if element["type"] == "sequence" else [element])
    return flat[0] if len(flat) == 1 else {"type": "sequence", "elements": flat}


def _or(elements: list[Format]) -> Format:
    return elements[0] if len(elements) == 1 else {"type": "or", "elements": elements}


def _optional(content: Format) -> Format:
    return {"type": "optional", "content": content}


def _repeat(content: Format, low: int, high: int) -> Format:
    return {"type": "repeat", "min": low, "max": high, "content": content}


def _free_text() -> Format:
    return {"type": "any_text", "excludes": list(_SPECIAL_MARKERS)}


def _string(content: Format) -> Format:
    return _seq(_token(STRING_DELIM), content, _token(STRING_DELIM))


def _literal(value: Any) -> Format:
    """A fixed value in Gemma 4's argument syntax (as its chat template writes it)."""
    if isinstance(value, str):
        return _string(_const(value)) if value else _seq(_token(STRING_DELIM), _token(STRING_DELIM))
    if value is None:
        return _const("null")
    if isinstance(value, bool):
        return _const("true" if value else "false")
    if isinstance(value, int | float):
        return _const(json.dumps(value))
    if isinstance(value, list):
        if not value:
            return _const("[]")
        parts: list[Format] = [_const("[")]
        for i, item in enumerate(value):
            parts += [_const(",")] if i else []
            parts.append(_literal(item))
        return _seq(*parts, _const("]"))
    if isinstance(value, dict):
        if not value:
            return _const("{}")
        parts = [_const("{")]
        for i, (key, item) in enumerate(sorted(value.items())):
            parts.append(_const(("," if i else "") + f"{key}:"))
            parts.append(_literal(item))
        return _seq(*parts, _const("}"))
    raise UnsupportedSchema(f"enum/const value {value!r} is not JSON")


class UnsupportedSchema(ValueError):
    """A tool schema that is not a usable JSON schema (the message names the problem)."""


@dataclass(frozen=True)
class _Context:
    any_value: Format  # a Gemma 4 value of any type, for what the schema does not constrain


def _any_value_grammar() -> str:
    """EBNF of any Gemma 4 argument value (recursive, so a grammar rather than a tag tree)."""
    # Strings: no "<|" and no "|>" (states: after an ordinary char, after "<", after "|").
    return "\n".join(
        [
            "root ::= value",
            'value ::= string | number | "true" | "false" | "null" | object | array',
            'object ::= "{" (member ("," member)*)? "}"',
            'member ::= [A-Za-z_] [A-Za-z0-9_]* ":" value',
            'array ::= "[" (value ("," value)*)? "]"',
            f"string ::= {_DELIM_TOKEN} text_n {_DELIM_TOKEN}",
            'text_n ::= "" | [^<|] text_n | "<" text_l | "|" text_p',
            'text_l ::= "" | [^<|] text_n | "<" text_l',
            'text_p ::= "" | [^<|>] text_n | "<" text_l | "|" text_p',
            f'number ::= "-"? {_ebnf_integer()} ("." [0-9]+)? ([eE] [+-]? [0-9]+)?',
        ]
    )


_DELIM_TOKEN = "DELIM"  # replaced by Token(<id>) once the tokenizer's id is known


def _ebnf_integer() -> str:
    return '("0" | [1-9] [0-9]*)'


def _value(schema: Any, ctx: _Context, where: str) -> Format:
    if schema is True or schema == {}:
        return ctx.any_value
    if not isinstance(schema, dict):
        raise UnsupportedSchema(f"{where} must be a JSON schema object")
    if "const" in schema:
        return _literal(schema["const"])
    if "enum" in schema:
        values = schema["enum"]
        if not isinstance(values, list) or not values:
            raise UnsupportedSchema(f"{where}.enum must be a non-empty list")
        return _or([_literal(v) for v in values])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = schema[key]
            if not isinstance(options, list) or not options:
                raise UnsupportedSchema(f"{where}.{key} must be a non-empty list")
            return _or([_value(o, ctx, f"{where}.{key}[{i}]") for i, o in enumerate(options)])
    kind = schema.get("type")
    if kind is None:
        if "properties" in schema:
            kind = "object"
        elif "items" in schema:
            kind = "array"
        else:
            return ctx.any_value
    kinds = kind if isinstance(kind, list) else [kind]
    if schema.get("nullable") is True and "null" not in kinds:
        kinds = [*kinds, "null"]
    return _or([_typed(k, schema, ctx, where) for k in kinds])


def _typed(kind: Any, schema: dict[str, Any], ctx: _Context, where: str) -> Format:
    if kind == "string":
        if isinstance(schema.get("pattern"), str):
            return _string({"type": "regex", "pattern": _anchorless(schema["pattern"])})
        max_length = schema.get("maxLength")
        if isinstance(max_length, int) and not isinstance(max_length, bool):
            # Counted in characters by a regex: xgrammar's any_text budget can overrun by a
            # character or two when a byte token splits one. Such strings hold no `<` or `|`.
            return _string({"type": "regex", "pattern": f"[^<|]{{0,{max(max_length, 0)}}}"})
        return _string(_free_text())
    if kind == "integer":
        if _lower_bound(schema) >= 1:
            return {"type": "regex", "pattern": rf"[1-9][0-9]{{0,{MAX_INTEGER_DIGITS - 1}}}"}
        sign = "" if _lower_bound(schema) >= 0 else "-?"
        return {"type": "regex", "pattern": sign + _INTEGER}
    if kind == "number":
        sign = "" if _lower_bound(schema) >= 0 else "-?"
        return {"type": "regex", "pattern": sign + _INTEGER + _FRACTION}
    if kind == "boolean":
        return _or([_const("true"), _const("false")])
    if kind == "null":
        return _const("null")
    if kind == "object":
        return object_format(schema, ctx, where)
    if kind == "array":
        return _array(schema, ctx, where)
    raise UnsupportedSchema(f"{where}.type {kind!r} is not a JSON schema type")


def _anchorless(pattern: str) -> str:
    # JSON schema patterns are unanchored searches; xgrammar's regex matches the whole string.
    body = pattern[1:] if pattern.startswith("^") else ".*" + pattern
    return body[:-1] if body.endswith("$") and not body.endswith(r"\$") else body + ".*"


def _lower_bound(schema: dict[str, Any]) -> float:
    """The schema's lower bound as the grammar can keep it: 1 (positive), 0 or -inf."""
    low = schema.get("minimum")
    if isinstance(low, int | float) and not isinstance(low, bool):
        return 1 if low > 0 else 0 if low == 0 else float("-inf")
    low = schema.get("exclusiveMinimum")
    if isinstance(low, int | float) and not isinstance(low, bool) and low >= 0:
        return 1 if schema.get("type") == "integer" else 0
    return float("-inf")


def _array(schema: dict[str, Any], ctx: _Context, where: str) -> Format:
    item = _value(schema.get("items", True), ctx, f"{where}.items")
    low = schema.get("minItems", 0)
    high = schema.get("maxItems", -1)
    if not isinstance(low, int) or not isinstance(high, int) or (0 <= high < low):
        raise UnsupportedSchema(f"{where}: minItems/maxItems must be integers, min <= max")
    if high == 0:
        return _const("[]")
    rest = _repeat(_seq(_const(","), item), max(low - 1, 0), -1 if high < 0 else high - 1)
    items = _seq(item, rest)
    return _seq(_const("["), items if low > 0 else _optional(items), _const("]"))


def object_format(schema: dict[str, Any], ctx: _Context, where: str) -> Format:
    """`{key:value,...}`: declared properties, sorted, required ones always present."""
    properties = schema.get("properties", {})
    required = schema.get("required", [])
    if not isinstance(properties, dict):
        raise UnsupportedSchema(f"{where}.properties must be an object")
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise UnsupportedSchema(f"{where}.required must be a list of names")
    missing = [name for name in required if name not in properties]
    if missing:
        raise UnsupportedSchema(f"{where}.required names undeclared properties: {missing}")
    # In the order Gemma 4's template writes arguments (jinja's dictsort, case-insensitive),
    # the order the model saw calls in.
    members = [
        (name, name in required, _value(sub, ctx, f"{where}.properties.{name}"))
        for name, sub in sorted(properties.items(), key=lambda item: item[0].lower())
    ]
    if not members:
        return _const("{}")
    return _seq(_const("{"), _members(members), _const("}"))


def _members(members: list[tuple[str, bool, Format]]) -> Format:
    """Members in order, commas between present ones; optional ones may be left out."""
    # Alternatives by which member comes first; after it, each later member has a comma.
    alternatives = []
    for first, (name, _, value) in enumerate(members):
        if any(req for _, req, _ in members[:first]):
            break  # a required member cannot be skipped
        tail = [
            (_seq(_const(f",{n}:"), v) if req else _optional(_seq(_const(f",{n}:"), v)))
            for n, req, v in members[first + 1 :]
        ]
        alternatives.append(_seq(_const(f"{name}:"), value, *tail))
    choice = _or(alternatives)
    return choice if any(req for _, req, _ in members) else _optional(choice)


@dataclass(frozen=True)
class ForcedCall:
    """What a forced call may look like."""

    tools: dict[str, dict[str, Any]]  # function name -> its parameters schema, allowed names only
    parallel: bool  # several calls back to back, or exactly one
    thinking: bool  # a thought may come first
    in_thought: bool  # the prompt ends inside an open thought


MARKER_TOKENS = (TOOL_CALL_START, TOOL_CALL_END, STRING_DELIM, CHANNEL_START, CHANNEL_END)


def _with_token_ids(node: Any, token_ids: Mapping[str, int]) -> Any:
    # vLLM validates a structural tag without a tokenizer, so tokens must be given by id.
    if isinstance(node, dict):
        if node.get("type") == "token":
            return {"type": "token", "token": token_ids[node["token"]]}
        return {key: _with_token_ids(value, token_ids) for key, value in node.items()}
    if isinstance(node, list):
        return [_with_token_ids(item, token_ids) for item in node]
    return node


def call_structural_tag(call: ForcedCall, token_ids: Mapping[str, int]) -> str:
    """The structural tag (JSON, for vLLM's `structural_tag`) that admits only such calls.

    `token_ids` maps each of `MARKER_TOKENS` to its id in the served tokenizer.
    """
    grammar = _any_value_grammar().replace(_DELIM_TOKEN, f"Token({token_ids[STRING_DELIM]})")
    ctx = _Context(any_value={"type": "grammar", "grammar": grammar})
    functions = []
    for name, parameters in call.tools.items():
        arguments = (
            object_format(parameters, ctx, f"tools[{name}].parameters")
            if parameters
            else _const("{}")
        )
        functions.append(_seq(_const(name), arguments))
    one_call = _seq(_token(TOOL_CALL_START), _const("call:"), _or(functions), _token(TOOL_CALL_END))
    calls = {"type": "plus", "content": one_call} if call.parallel else one_call
    thought = _seq(_free_text(), _token(CHANNEL_END))
    if call.in_thought:
        body = _seq(thought, calls)
    elif call.thinking:
        body = _seq(_optional(_seq(_token(CHANNEL_START), thought)), calls)
    else:
        body = calls
    return json.dumps({"type": "structural_tag", "format": _with_token_ids(body, token_ids)})


_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_tool_name(name: str) -> bool:
    """Whether `name` is a valid function name (OpenAI's rule: letters, digits, `_`, `-`)."""
    return bool(_NAME.match(name))
