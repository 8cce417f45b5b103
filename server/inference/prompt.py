"""Turning OpenAI chat messages into the model's prompt: chat template, images and audio."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from transformers import AutoTokenizer

from server.engine.protocol import Prompt
from server.http.errors import BadRequest
from server.inference.media import MediaLimits, decode_audio, load_image
from server.inference.protocol import AudioPart, ChatMessage, ImagePart, TextPart

# OpenAI's `developer` role is the system prompt of newer models.
_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}


def _template_turn(message: ChatMessage, i: int, content: Any) -> dict[str, Any]:
    """One message as chat templates expect it: call arguments as mappings, thoughts kept."""
    turn: dict[str, Any] = {"role": _ROLES[message.role], "content": content}
    if message.tool_calls:
        calls = []
        for j, call in enumerate(message.tool_calls):
            where = f"messages[{i}].tool_calls[{j}].function.arguments"
            try:
                arguments = json.loads(call.function.arguments or "{}")
            except ValueError as exc:
                raise BadRequest(f"{where} is not valid JSON", param=where) from exc
            if not isinstance(arguments, dict):
                raise BadRequest(f"{where} must be a JSON object", param=where)
            calls.append(
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": arguments},
                }
            )
        turn["tool_calls"] = calls
    if message.tool_call_id is not None:
        turn["tool_call_id"] = message.tool_call_id
    if message.name is not None and message.role == "tool":
        turn["name"] = message.name
    thought = message.reasoning or message.reasoning_content
    if thought and message.role == "assistant":
        turn["reasoning"] = thought
    return turn


class ChatRenderer:
    """Renders conversations with the served model's own chat template."""

    def __init__(
        self, model_dir: str | Path, limits: MediaLimits, max_images: int, max_audios: int
    ) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._limits = limits
        self._max_images = max_images
        self._max_audios = max_audios

    async def render(
        self,
        messages: list[ChatMessage],
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> Prompt:
        """The prompt text with media placeholders, and the decoded media in prompt order.

        `tools` (OpenAI tool definitions) and `template_kwargs` (e.g. `enable_thinking`) go to
        the model's own chat template, which renders declarations, calls, results and thoughts.
        """
        parts_of = [m.content for m in messages if isinstance(m.content, list)]
        image_count = sum(isinstance(p, ImagePart) for parts in parts_of for p in parts)
        audio_count = sum(isinstance(p, AudioPart) for parts in parts_of for p in parts)
        if image_count > self._max_images:
            raise BadRequest(
                f"{image_count} images in one request; at most {self._max_images}",
                param="messages",
            )
        if audio_count > self._max_audios:
            raise BadRequest(
                f"{audio_count} audio clips in one request; at most {self._max_audios}",
                param="messages",
            )
        turns: list[dict[str, Any]] = []
        images = []
        audios = []
        for i, message in enumerate(messages):
            content = message.content
            if content is None or isinstance(content, str):
                # An assistant turn that only called tools has no content: keep it None.
                empty = None if message.tool_calls else ""
                turns.append(_template_turn(message, i, content or empty))
                continue
            parts: list[dict[str, Any]] = []
            for j, part in enumerate(content):
                param = f"messages[{i}].content[{j}]"
                if isinstance(part, TextPart):
                    parts.append({"type": "text", "text": part.text})
                elif isinstance(part, ImagePart):
                    images.append(await load_image(part.image_url.url, self._limits, param))
                    parts.append({"type": "image"})
                elif isinstance(part, AudioPart):
                    audios.append(decode_audio(part.input_audio.data, self._limits, param))
                    parts.append({"type": "audio"})
            turns.append(_template_turn(message, i, parts))
        try:
            template_tools: Any = tools
            text = self.tokenizer.apply_chat_template(
                turns,
                tools=template_tools,
                tokenize=False,
                add_generation_prompt=True,
                **(template_kwargs or {}),
            )
        except TemplateError as exc:  # the template's own raise_exception, e.g. bad roles
            raise BadRequest(f"messages: {exc}", param="messages") from exc
        return Prompt(text=str(text), images=images, audios=audios)
