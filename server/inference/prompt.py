"""Turning OpenAI chat messages into the model's prompt: chat template, images and audio."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from server.engine.protocol import Prompt
from server.http.errors import BadRequest
from server.inference.media import MediaLimits, decode_audio, load_image
from server.inference.protocol import AudioPart, ChatMessage, ImagePart, TextPart

# OpenAI's `developer` role is the system prompt of newer models.
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ChatRenderer:
    """Renders conversations with the served model's own chat template."""

    def __init__(
        self, model_dir: str | Path, limits: MediaLimits, max_images: int, max_audios: int
    ) -> None:
        self._tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._limits = limits
        self._max_images = max_images
        self._max_audios = max_audios

    async def render(self, messages: list[ChatMessage]) -> Prompt:
        """The prompt text with media placeholders, and the decoded media in prompt order."""
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
                turns.append({"role": _ROLES[message.role], "content": content or ""})
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
            turns.append({"role": _ROLES[message.role], "content": parts})
        text = self._tokenizer.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=True
        )
        return Prompt(text=str(text), images=images, audios=audios)
