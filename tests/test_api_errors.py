"""Bad requests get OpenAI error envelopes with the right status; the server keeps serving."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import pytest_asyncio
import soundfile
from PIL import Image

from server.engine.vllm_engine import VllmEngine
from server.testbed.default_model import DefaultModel
from tests.conftest import engine_settings
from tests.live_server import LiveServer, live_server
from tests.test_api_openai import BASE, png_data_url

KEY = "inference-key-1"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def strict(
    engine: VllmEngine, tiny: DefaultModel, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LiveServer]:
    """A server with small limits and an API key."""
    settings = engine_settings(
        cache_dir=tiny.model_dir.parent,
        state_dir=tmp_path_factory.mktemp("strict-state"),
        api_keys=[KEY],
        max_image_pixels=256 * 256,
        max_request_bytes=4 * 2**20,
        max_images_per_prompt=2,
    )
    async with live_server(settings, engine, first_adapter_id=20_000) as server:
        yield server


def chat(content: Any = "Hello", **extra: Any) -> dict[str, Any]:
    return {"model": BASE, "messages": [{"role": "user", "content": content}], **extra}


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def png_of_size(side: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (10, 20, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


NOT_AN_IMAGE = "data:image/png;base64," + base64.b64encode(b"this is plain text").decode()
NOT_AUDIO = {
    "type": "input_audio",
    "input_audio": {"data": base64.b64encode(b"noise" * 99).decode()},
}
LONG_TEXT = " ".join(["word"] * 4000)


def silent_wav(seconds: float, rate: int = 8000) -> str:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(int(seconds * rate), np.int16), rate, format="WAV")
    return base64.b64encode(buffer.getvalue()).decode()


TOO_LONG_AUDIO = {"type": "input_audio", "input_audio": {"data": silent_wav(31), "format": "wav"}}
RANDOM_BYTES = base64.b64encode(np.random.default_rng(0).bytes(5 * 2**20)).decode()

# name: (body, expected status, expected error.type)
CASES: dict[str, tuple[Any, int, str]] = {
    "malformed JSON": (b'{"model": "tiny-gemma4", "messages": [', 400, "BadRequestError"),
    "wrong types": (chat(max_tokens="many"), 400, "BadRequestError"),
    "messages not a list": ({"model": BASE, "messages": "hi"}, 400, "BadRequestError"),
    "missing messages": ({"model": BASE}, 400, "BadRequestError"),
    "empty messages": ({"model": BASE, "messages": []}, 400, "BadRequestError"),
    "unknown role": (
        {"model": BASE, "messages": [{"role": "wizard", "content": "hi"}]},
        400,
        "BadRequestError",
    ),
    "unknown model": ({**chat(), "model": "no-such-adapter"}, 404, "NotFoundError"),
    "negative max_tokens": (chat(max_tokens=-5), 400, "BadRequestError"),
    "temperature out of range": (chat(temperature=7), 400, "BadRequestError"),
    "n too large": (chat(n=1000), 400, "BadRequestError"),
    "top_logprobs without logprobs": (chat(top_logprobs=2), 400, "BadRequestError"),
    "bad base64 image": (
        chat([image_part("data:image/png;base64,@@@not-base64@@@")]),
        400,
        "BadRequestError",
    ),
    "non-image bytes": (chat([image_part(NOT_AN_IMAGE)]), 400, "BadRequestError"),
    "image URL not data": (chat([image_part("file:///etc/passwd")]), 400, "BadRequestError"),
    "remote image disabled": (
        chat([image_part("http://127.0.0.1:9/x.png")]),
        400,
        "BadRequestError",
    ),
    "oversized image": (chat([image_part(png_of_size(512))]), 413, "RequestTooLargeError"),
    "audio that is not audio": (chat([NOT_AUDIO]), 400, "BadRequestError"),
    "audio too long": (chat([TOO_LONG_AUDIO]), 413, "RequestTooLargeError"),
    "bad audio base64": (
        chat([{"type": "input_audio", "input_audio": {"data": "%%%"}}]),
        400,
        "BadRequestError",
    ),
    "too many images": (chat([image_part(png_data_url())] * 3), 400, "BadRequestError"),
    "prompt over the context": (chat(LONG_TEXT), 400, "BadRequestError"),
    "bad response_format type": (
        chat(response_format={"type": "xml"}),
        400,
        "BadRequestError",
    ),
    "json_schema without schema": (
        chat(response_format={"type": "json_schema"}),
        400,
        "BadRequestError",
    ),
    "body too large": (chat(RANDOM_BYTES), 413, "RequestTooLargeError"),
}


async def post(server: LiveServer, body: Any, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
        if isinstance(body, bytes):
            headers["Content-Type"] = "application/json"
            return await http.post("/v1/chat/completions", content=body, headers=headers)
        return await http.post("/v1/chat/completions", json=body, headers=headers)


def assert_envelope(response: httpx.Response, status: int, error_type: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == error_type and error["code"] == status
    assert error["message"] and len(error["message"]) <= 500
    assert "Traceback" not in error["message"] and "/work" not in error["message"]
    assert "site-packages" not in error["message"]
    return dict(error)


@pytest.mark.parametrize("case", list(CASES))
async def test_bad_request_table(strict: LiveServer, case: str) -> None:
    body, status, error_type = CASES[case]
    assert_envelope(await post(strict, body), status, error_type)


async def test_streaming_errors_come_before_the_first_byte(strict: LiveServer) -> None:
    response = await post(strict, chat(LONG_TEXT, stream=True))
    assert_envelope(response, 400, "BadRequestError")
    response = await post(strict, {**chat(stream=True), "model": "nope"})
    assert assert_envelope(response, 404, "NotFoundError")["param"] == "model"


async def test_server_still_serves_after_the_table(strict: LiveServer) -> None:
    for body, _, _ in CASES.values():
        await post(strict, body)
    assert (await post(strict, chat(max_tokens=3))).status_code == 200
    async with httpx.AsyncClient(base_url=strict.base_url) as http:
        assert (await http.get("/ready")).status_code == 200


@pytest.mark.parametrize("key", [None, "wrong-key"])
async def test_api_key_required(strict: LiveServer, key: str | None) -> None:
    assert_envelope(await post(strict, chat(max_tokens=3), key=key), 401, "AuthenticationError")
    async with httpx.AsyncClient(base_url=strict.base_url) as http:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        listed = await http.get("/v1/models", headers=headers)
    assert_envelope(listed, 401, "AuthenticationError")


async def test_openai_client_sees_authentication_error(strict: LiveServer) -> None:
    client = openai.AsyncOpenAI(base_url=strict.v1, api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await client.chat.completions.create(
            model=BASE, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
        )


async def test_api_key_accepted_and_probes_open(strict: LiveServer) -> None:
    client = openai.AsyncOpenAI(base_url=strict.v1, api_key=KEY, max_retries=0)
    reply = await client.chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
    )
    assert reply.choices[0].message.content
    async with httpx.AsyncClient(base_url=strict.base_url) as http:
        assert (await http.get("/health")).status_code == 200
        assert (await http.get("/ready")).status_code == 200
        unknown = await http.get("/nowhere")
    assert_envelope(unknown, 404, "NotFoundError")
