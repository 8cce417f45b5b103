"""vLLM's own Gemma 4 output parser (thoughts and tool calls) behind the service's plain types.

This is the parser `vllm serve --tool-call-parser gemma4 --reasoning-parser gemma4` uses: one
state machine over Gemma 4's channel and tool-call tokens, matched by token id. vLLM is imported
when `VllmOutputParsers` is built (once, at start-up), not when this module is imported, so the
bridge in `vllm_engine.py` stays the only module importing vLLM at top level.
"""

from __future__ import annotations

import logging
from typing import Any

from server.engine.protocol import OutputParser, ParsedDelta, ToolCallFragment

logger = logging.getLogger(__name__)


class VllmOutputParsers:
    """Builds vLLM's composed Gemma 4 parser class once; `new` makes one per completion."""

    def __init__(self, tokenizer: Any) -> None:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.parser.parser_manager import ParserManager

        parser_class = ParserManager.get_parser(
            tool_parser_name="gemma4",
            reasoning_parser_name="gemma4",
            enable_auto_tools=True,
            tokenizer=tokenizer,
        )
        if parser_class is None:
            raise RuntimeError("vLLM has no gemma4 parser")
        self._parser_class = parser_class
        self._request_class = ChatCompletionRequest
        self._tokenizer = tokenizer

    def new(
        self, tools: list[dict[str, Any]] | None, chat_template_kwargs: dict[str, Any]
    ) -> OutputParser:
        """A parser for one completion; `tools` are OpenAI tool definitions (or None)."""
        # The parser reads tools, tool_choice and the thinking switch off vLLM's request type.
        # It always parses calls ("auto"): which calls are returned is the service's decision.
        request = self._request_class(
            model="parser",
            messages=[{"role": "user", "content": ""}],
            tools=tools,
            tool_choice="auto" if tools else "none",
            chat_template_kwargs=chat_template_kwargs,
            include_reasoning=True,
        )
        tools_param: Any = request.tools
        parser = self._parser_class(
            self._tokenizer, tools_param, chat_template_kwargs=chat_template_kwargs
        )
        # Sets what parsing needs on the request (e.g. skip_special_tokens=False).
        return _VllmOutputParser(parser, parser.adjust_request(request))


class _VllmOutputParser:
    def __init__(self, parser: Any, request: Any) -> None:
        self._parser = parser
        self._request = request

    def feed(
        self, text: str, token_ids: list[int], prompt_token_ids: list[int], finished: bool
    ) -> ParsedDelta:
        delta = self._parser.parse_delta(
            text, list(token_ids), self._request, prompt_token_ids, finished=finished
        )
        if delta is None:
            return ParsedDelta()
        calls = [
            ToolCallFragment(
                index=call.index,
                id=call.id,
                name=call.function.name if call.function else None,
                arguments=call.function.arguments if call.function else None,
            )
            for call in delta.tool_calls or []
        ]
        return ParsedDelta(content=delta.content, reasoning=delta.reasoning, tool_calls=calls)
