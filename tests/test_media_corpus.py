"""Hostile and unusual media through real HTTP: every item is answered, none kills the engine.

The corpus is made in code (PIL, numpy, soundfile). Each item goes to the base model and to an
adapter at once, on the engine in float32 and in the service's default dtype (`--dtype auto`,
bfloat16 on CPU). Each answer is the status the corpus names: 200, or a 4xx in OpenAI's error
envelope with a clear message (no paths, no tracebacks). After each item `/ready` is 200 and a
small text chat still answers, so an item that kills the engine fails at once.
"""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio
import soundfile
from PIL import Image

from server.engine.protocol import AUDIO_SAMPLE_RATE, MIN_AUDIO_SAMPLES
from server.engine.vllm_engine import VllmEngine
from server.testbed.default_model import DefaultModel
from tests.conftest import engine_settings
from tests.live_server import LiveServer, live_server
from tests.media import seeded_audio, seeded_image

BASE = "tiny-gemma4"
ADAPTER = "demo-attn"
CHAT = "/v1/chat/completions"
MAX_AUDIO_SECONDS = 30.0  # the service's default --max-audio-seconds
MAX_IMAGE_PIXELS = 4096 * 4096  # the service's default --max-image-pixels
RNG = np.random.default_rng(9)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def media_api(
    dtype_engine: VllmEngine, tiny: DefaultModel, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LiveServer]:
    """One server per engine dtype, with the service's default media limits."""
    first_id = 30_000 if dtype_engine.dtype == "float32" else 31_000
    settings = engine_settings(
        cache_dir=tiny.model_dir.parent,
        state_dir=tmp_path_factory.mktemp("corpus-state"),
        dtype=dtype_engine.dtype,
    )
    assert settings.max_audio_seconds == MAX_AUDIO_SECONDS
    assert settings.max_image_pixels == MAX_IMAGE_PIXELS
    async with live_server(settings, dtype_engine, first_adapter_id=first_id) as server:
        yield server


# ---- images ----


def image_bytes(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def image_url(data: bytes, mime: str = "image/png") -> dict[str, Any]:
    url = f"data:{mime};base64," + base64.b64encode(data).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def noise(width: int, height: int) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return image_bytes(noise(48, 32), "JPEG", exif=exif.tobytes())


def animated(fmt: str) -> bytes:
    frames = [noise(32, 32) for _ in range(3)]
    return image_bytes(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100)


def sixteen_bit() -> bytes:
    pixels = RNG.integers(0, 2**16, (40, 40), dtype=np.uint16)
    image = Image.fromarray(pixels)
    assert image.mode == "I;16"
    return image_bytes(image, "PNG")


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10"/></svg>'
PNG = image_bytes(seeded_image(), "PNG")
JPEG = image_bytes(seeded_image(), "JPEG")

IMAGES: dict[str, tuple[Callable[[], dict[str, Any]], int]] = {
    "1x1 png": (lambda: image_url(image_bytes(noise(1, 1), "PNG")), 200),
    "1x4000 strip": (lambda: image_url(image_bytes(noise(1, 4000), "PNG")), 200),
    "4000x1 strip": (lambda: image_url(image_bytes(noise(4000, 1), "PNG")), 200),
    "3x2000 strip": (lambda: image_url(image_bytes(noise(3, 2000), "PNG")), 200),
    "4096x4096 flat png at the pixel limit": (
        lambda: image_url(image_bytes(Image.new("RGB", (4096, 4096), (200, 90, 10)), "PNG")),
        200,
    ),
    "4097x4096 over the pixel limit": (
        lambda: image_url(image_bytes(Image.new("L", (4097, 4096)), "PNG")),
        413,
    ),
    "rgba png": (lambda: image_url(image_bytes(noise(40, 30).convert("RGBA"), "PNG")), 200),
    "grayscale L": (lambda: image_url(image_bytes(noise(40, 30).convert("L"), "PNG")), 200),
    "grayscale alpha LA": (lambda: image_url(image_bytes(noise(40, 30).convert("LA"), "PNG")), 200),
    "palette P": (lambda: image_url(image_bytes(noise(40, 30).convert("P"), "PNG")), 200),
    "16-bit I;16": (lambda: image_url(sixteen_bit()), 200),
    "1-bit": (lambda: image_url(image_bytes(noise(40, 30).convert("1"), "PNG")), 200),
    "cmyk jpeg": (
        lambda: image_url(image_bytes(noise(40, 30).convert("CMYK"), "JPEG"), "image/jpeg"),
        200,
    ),
    "progressive jpeg": (
        lambda: image_url(image_bytes(noise(64, 48), "JPEG", progressive=True), "image/jpeg"),
        200,
    ),
    "webp": (lambda: image_url(image_bytes(noise(40, 30), "WEBP"), "image/webp"), 200),
    "animated webp": (lambda: image_url(animated("WEBP"), "image/webp"), 200),
    "exif-rotated jpeg": (lambda: image_url(exif_rotated_jpeg(), "image/jpeg"), 200),
    "animated gif": (lambda: image_url(animated("GIF"), "image/gif"), 400),
    "bmp": (lambda: image_url(image_bytes(noise(20, 20), "BMP"), "image/bmp"), 400),
    "tiff": (lambda: image_url(image_bytes(noise(20, 20), "TIFF"), "image/tiff"), 400),
    "truncated png": (lambda: image_url(PNG[: len(PNG) // 2]), 400),
    "truncated jpeg": (lambda: image_url(JPEG[: len(JPEG) // 2], "image/jpeg"), 400),
    "png header only": (lambda: image_url(PNG[:33]), 400),
    "zero bytes": (lambda: image_url(b""), 400),
    "svg text": (lambda: image_url(SVG, "image/svg+xml"), 400),
    "png sent as image/jpeg": (lambda: image_url(PNG, "image/jpeg"), 200),
    "png sent as text/plain": (lambda: image_url(PNG, "text/plain"), 200),
    "bad base64": (
        lambda: {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO%%%"}},
        400,
    ),
    "data url not base64": (
        lambda: {"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}},
        400,
    ),
    "huge dimensions in a tiny header": (lambda: image_url(bomb_png()), 413),
}


def bomb_png() -> bytes:
    """A valid PNG header announcing 100000x100000 pixels with almost no data behind it."""
    data = bytearray(image_bytes(Image.new("L", (1, 1)), "PNG"))
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    data[8:33] = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return bytes(data)


# ---- audio ----


def audio_part(data: bytes, fmt: str = "wav") -> dict[str, Any]:
    encoded = base64.b64encode(data).decode()
    return {"type": "input_audio", "input_audio": {"data": encoded, "format": fmt}}


def tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    wave = 0.4 * np.sin(2 * np.pi * 440 * t)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def sound(samples: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def samples_at_16k(count: int) -> bytes:
    return sound(seeded_audio()[:count], AUDIO_SAMPLE_RATE, subtype="PCM_16")


def white_noise(seconds: float) -> bytes:
    count = round(seconds * AUDIO_SAMPLE_RATE)
    return sound(RNG.uniform(-1, 1, count).astype(np.float32), AUDIO_SAMPLE_RATE, subtype="FLOAT")


def float_wav_with(value: float) -> bytes:
    samples = tone(0.5, AUDIO_SAMPLE_RATE).astype(np.float32)
    samples[100:110] = value
    return sound(samples, AUDIO_SAMPLE_RATE, subtype="FLOAT")


WAV = sound(tone(1.0, AUDIO_SAMPLE_RATE), AUDIO_SAMPLE_RATE, subtype="PCM_16")

AUDIOS: dict[str, tuple[Callable[[], dict[str, Any]], int]] = {
    "8 kHz wav": (lambda: audio_part(sound(tone(1.0, 8000), 8000)), 200),
    "16 kHz wav": (lambda: audio_part(WAV), 200),
    "44.1 kHz wav": (lambda: audio_part(sound(tone(1.0, 44_100), 44_100)), 200),
    "48 kHz wav": (lambda: audio_part(sound(tone(1.0, 48_000), 48_000)), 200),
    "stereo wav": (lambda: audio_part(sound(tone(1.0, 16_000, 2), 16_000)), 200),
    "6-channel wav": (lambda: audio_part(sound(tone(0.5, 16_000, 6), 16_000)), 200),
    "8-bit pcm": (lambda: audio_part(sound(tone(1.0, 16_000), 16_000, subtype="PCM_U8")), 200),
    "16-bit pcm": (lambda: audio_part(sound(tone(1.0, 16_000), 16_000, subtype="PCM_16")), 200),
    "24-bit pcm": (lambda: audio_part(sound(tone(1.0, 16_000), 16_000, subtype="PCM_24")), 200),
    "32-bit pcm": (lambda: audio_part(sound(tone(1.0, 16_000), 16_000, subtype="PCM_32")), 200),
    "float wav": (lambda: audio_part(sound(tone(1.0, 16_000), 16_000, subtype="FLOAT")), 200),
    "double wav": (lambda: audio_part(sound(tone(1.0, 16_000), 16_000, subtype="DOUBLE")), 200),
    "flac": (lambda: audio_part(sound(tone(1.0, 48_000), 48_000, "FLAC"), "flac"), 200),
    "ogg vorbis": (lambda: audio_part(sound(tone(1.0, 44_100), 44_100, "OGG"), "ogg"), 200),
    "mp3": (
        lambda: audio_part(sound(tone(1.0, 44_100), 44_100, "MP3", "MPEG_LAYER_III"), "mp3"),
        200,
    ),
    "aiff": (lambda: audio_part(sound(tone(0.5, 22_050), 22_050, "AIFF"), "aiff"), 200),
    "1 sample": (lambda: audio_part(samples_at_16k(1)), 400),
    "5 ms": (lambda: audio_part(samples_at_16k(80)), 400),
    "20 ms (320 samples), one mel frame": (lambda: audio_part(samples_at_16k(320)), 400),
    "the minimum, 321 samples": (lambda: audio_part(samples_at_16k(MIN_AUDIO_SAMPLES)), 200),
    "the minimum at 8 kHz": (
        lambda: audio_part(sound(tone(MIN_AUDIO_SAMPLES / 16_000 + 1e-4, 8000), 8000)),
        200,
    ),
    "just under the minimum at 44.1 kHz": (
        lambda: audio_part(sound(tone(0.0199, 44_100), 44_100)),
        400,
    ),
    "50 ms": (lambda: audio_part(samples_at_16k(800)), 200),
    "silence": (lambda: audio_part(sound(np.zeros(16_000), 16_000, subtype="PCM_16")), 200),
    "clipping square wave": (
        lambda: audio_part(sound(np.sign(tone(1.0, 16_000)), 16_000, subtype="PCM_16")),
        200,
    ),
    "float samples far over full scale": (lambda: audio_part(float_wav_with(1e30)), 200),
    "float NaN samples": (lambda: audio_part(float_wav_with(float("nan"))), 400),
    "float infinite samples": (lambda: audio_part(float_wav_with(float("inf"))), 400),
    "white noise at the limit": (lambda: audio_part(white_noise(MAX_AUDIO_SECONDS)), 200),
    "white noise just over the limit": (
        lambda: audio_part(white_noise(MAX_AUDIO_SECONDS + 0.1)),
        413,
    ),
    "an hour of flac silence": (
        lambda: audio_part(sound(np.zeros(3600 * 8000, np.int16), 8000, "FLAC"), "flac"),
        413,
    ),
    "header-only wav": (lambda: audio_part(WAV[:44]), 400),
    "zero-frame wav": (lambda: audio_part(sound(np.zeros(0), 16_000, subtype="PCM_16")), 400),
    "truncated wav": (lambda: audio_part(WAV[: len(WAV) // 3]), 200),
    "random bytes": (lambda: audio_part(RNG.bytes(20_000)), 400),
    "zero bytes": (lambda: audio_part(b""), 400),
    "headerless raw pcm": (lambda: audio_part(WAV[44:]), 400),
    "wav sent as mp3": (lambda: audio_part(WAV, "mp3"), 200),
    "mp3 sent as wav": (
        lambda: audio_part(sound(tone(1.0, 44_100), 44_100, "MP3", "MPEG_LAYER_III"), "wav"),
        200,
    ),
    "png sent as audio": (lambda: audio_part(PNG), 400),
    "bad base64": (
        lambda: {"type": "input_audio", "input_audio": {"data": "UklGR%%%", "format": "wav"}},
        400,
    ),
}

CORPUS = {f"image: {name}": case for name, case in IMAGES.items()} | {
    f"audio: {name}": case for name, case in AUDIOS.items()
}


def chat(model: str, part: dict[str, Any]) -> dict[str, Any]:
    content = [part, {"type": "text", "text": "Describe it."}]
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 2}


def assert_answer(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text[:500]
    if status == 200:
        assert response.json()["choices"][0]["finish_reason"] in ("length", "stop")
        return
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    message = error["message"]
    assert message and len(message) <= 300 and error["param"].startswith("messages[0]")
    for leak in ("Traceback", "/work", "/tmp", "site-packages", 'File "'):
        assert leak not in message


@pytest.mark.parametrize("item", list(CORPUS))
async def test_media_item_is_answered_and_the_engine_lives(
    media_api: LiveServer, item: str
) -> None:
    make, status = CORPUS[item]
    part = make()
    async with httpx.AsyncClient(base_url=media_api.base_url, timeout=600) as http:
        answers = await asyncio.gather(
            *(http.post(CHAT, json=chat(model, part)) for model in (BASE, ADAPTER))
        )
        for answer in answers:
            assert_answer(answer, status)
        assert (await http.get("/ready")).status_code == 200
        hello = [{"role": "user", "content": "Hi"}]
        text = await http.post(CHAT, json={"model": ADAPTER, "messages": hello, "max_tokens": 2})
        assert text.status_code == 200 and text.json()["choices"][0]["message"]["content"]
