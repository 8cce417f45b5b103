"""Decoding of images and audio sent in requests, with size limits, into what the engine takes."""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import httpx
import numpy as np
import soundfile
from PIL import Image, ImageOps, UnidentifiedImageError

from server.engine.protocol import AUDIO_SAMPLE_RATE, MIN_AUDIO_SAMPLES
from server.http.errors import BadRequest, PayloadTooLarge

IMAGE_FORMATS = {"PNG", "JPEG", "WEBP"}
# transformers' Gemma4AudioFeatureExtractor keeps at most `max_length` = 480,000 samples (30 s at
# 16 kHz) and drops the rest without a word; vLLM calls it with that default.
FEATURE_EXTRACTOR_MAX_SAMPLES = 480_000
# Gemma4Processor's defaults, when processor_config.json does not set them.
AUDIO_SEQ_LENGTH = 750
AUDIO_MS_PER_TOKEN = 40


@dataclass(frozen=True)
class MediaLimits:
    """Per-item limits; a request over them gets 413."""

    max_image_bytes: int
    max_image_pixels: int
    max_audio_bytes: int
    max_audio_seconds: float
    allow_remote_images: bool
    remote_timeout_seconds: float


def _b64decode(data: str, what: str, param: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{what} is not valid base64", param=param) from None


def _check_size(size: int, limit: int, what: str, param: str) -> None:
    if size > limit:
        raise PayloadTooLarge(f"{what} is {size} bytes; the limit is {limit}", param=param)


async def _fetch(url: str, limits: MediaLimits, param: str) -> bytes:
    """Download an image URL, refusing it as soon as it passes the size limit."""
    try:
        async with (
            httpx.AsyncClient(timeout=limits.remote_timeout_seconds) as client,
            client.stream("GET", url, follow_redirects=True) as response,
        ):
            if response.status_code != 200:
                raise BadRequest(f"image URL answered HTTP {response.status_code}", param=param)
            data = bytearray()
            async for piece in response.aiter_bytes():
                data.extend(piece)
                _check_size(len(data), limits.max_image_bytes, "image", param)
            return bytes(data)
    except httpx.HTTPError as exc:
        raise BadRequest(f"could not fetch image URL ({type(exc).__name__})", param=param) from None


async def load_image(url: str, limits: MediaLimits, param: str) -> Image.Image:
    """An RGB image from a base64 data URL (or an http(s) URL when allowed)."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise BadRequest("image data URLs must be base64 encoded", param=param)
        _check_size(len(payload) * 3 // 4, limits.max_image_bytes, "image", param)
        data = _b64decode(payload, "image data", param)
    elif url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise BadRequest(
                "image URLs are disabled on this server; send a base64 data URL", param=param
            )
        data = await _fetch(url, limits, param)
    else:
        raise BadRequest("image_url must be a data URL or an http(s) URL", param=param)
    return decode_image(data, limits, param)


def decode_image(data: bytes, limits: MediaLimits, param: str) -> Image.Image:
    """Open PNG, JPEG or WebP bytes (read by content, whatever the data URL's type says), refusing
    anything else and decompression bombs; EXIF orientation applied, first frame of animations."""
    _check_size(len(data), limits.max_image_bytes, "image", param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in IMAGE_FORMATS:
                raise BadRequest("image must be PNG, JPEG or WebP", param=param)
            width, height = image.size
            if width * height > limits.max_image_pixels:
                raise PayloadTooLarge(
                    f"image is {width}x{height}; the limit is {limits.max_image_pixels} pixels",
                    param=param,
                )
            image.load()
            # Phone cameras store the orientation in EXIF: the model sees the photo upright.
            return ImageOps.exif_transpose(image).convert("RGB")
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombWarning,
    ):
        raise BadRequest("image data is not a readable image", param=param) from None
    except Image.DecompressionBombError:  # Pillow's own limit: far over any sane pixel limit
        raise PayloadTooLarge(
            f"image is larger than the limit of {limits.max_image_pixels} pixels", param=param
        ) from None


def decode_audio(data_b64: str, limits: MediaLimits, param: str) -> np.ndarray:
    """16 kHz mono float32 samples from base64 audio (WAV, FLAC, OGG, MP3: libsndfile's formats).

    The bytes are read by their content; the request's `format` field is not needed.
    """
    _check_size(len(data_b64) * 3 // 4, limits.max_audio_bytes, "audio", param)
    data = _b64decode(data_b64, "audio data", param)
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as audio:
            rate = audio.samplerate
            # Read at most one frame past the limit: a small compressed file can decode to hours.
            most = int(limits.max_audio_seconds * rate) + 1
            if audio.frames > most:
                _too_long(audio.frames / rate, limits, param)
            samples = audio.read(frames=most, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError):
        raise BadRequest("audio data is not a readable audio file", param=param) from None
    if len(samples) == 0:
        raise BadRequest("audio is empty", param=param)
    if len(samples) / rate > limits.max_audio_seconds:
        _too_long(len(samples) / rate, limits, param)
    if not np.isfinite(samples).all():
        raise BadRequest("audio has samples that are NaN or infinite", param=param)
    mono = resample(samples.mean(axis=1), rate)
    if len(mono) < MIN_AUDIO_SAMPLES:
        raise BadRequest(
            f"audio is {len(mono) / AUDIO_SAMPLE_RATE * 1000:.1f} ms long; the shortest the model "
            f"takes is {MIN_AUDIO_SAMPLES / AUDIO_SAMPLE_RATE * 1000:.2f} ms "
            f"({MIN_AUDIO_SAMPLES} samples at {AUDIO_SAMPLE_RATE} Hz)",
            param=param,
        )
    return mono


def _too_long(seconds: float, limits: MediaLimits, param: str) -> NoReturn:
    raise PayloadTooLarge(
        f"audio is {seconds:.1f} s long; the limit is {limits.max_audio_seconds} s", param=param
    )


def resample(samples: np.ndarray, rate: int) -> np.ndarray:
    """Linear resampling to 16 kHz; enough for speech features, and needs no extra library."""
    if rate == AUDIO_SAMPLE_RATE:
        return samples.astype(np.float32)
    count = round(len(samples) * AUDIO_SAMPLE_RATE / rate)
    positions = np.linspace(0, len(samples) - 1, count)
    return np.interp(positions, np.arange(len(samples)), samples).astype(np.float32)


def model_audio_seconds(model_dir: Path) -> float | None:
    """The longest audio clip the model hears whole, or None when it takes no audio.

    The smaller of the processor's soft-token cap (`audio_seq_length` tokens of
    `audio_ms_per_token` ms) and the feature extractor's window; audio past it is cut.
    """
    config = json.loads((model_dir / "config.json").read_text())
    if not config.get("audio_config"):
        return None
    processor_file = model_dir / "processor_config.json"
    processor = json.loads(processor_file.read_text()) if processor_file.is_file() else {}
    extractor = processor.get("feature_extractor") or {}
    rate = extractor.get("sampling_rate", AUDIO_SAMPLE_RATE)
    tokens = processor.get("audio_seq_length", AUDIO_SEQ_LENGTH)
    ms_per_token = processor.get("audio_ms_per_token", AUDIO_MS_PER_TOKEN)
    return float(min(tokens * ms_per_token / 1000, FEATURE_EXTRACTOR_MAX_SAMPLES / rate))


def check_audio_limit(max_audio_seconds: float, model_dir: Path) -> None:
    """Refuse a `--max-audio-seconds` above what the model hears: longer audio would be cut."""
    longest = model_audio_seconds(model_dir)
    if longest is not None and max_audio_seconds > longest:
        raise ValueError(
            f"--max-audio-seconds {max_audio_seconds:g} is above the longest audio this model "
            f"takes ({longest:g} s; the rest of a longer clip would be dropped without a word): "
            f"set it to {longest:g} or less"
        )
