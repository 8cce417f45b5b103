"""Deterministic test media: an image and an audio clip the tiny model accepts."""

from __future__ import annotations

import numpy as np
from PIL import Image

from server.engine.protocol import AUDIO_SAMPLE_RATE


def seeded_image(seed: int = 0, size: int = 64) -> Image.Image:
    """A seeded RGB noise image."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def seeded_audio(seed: int = 0, seconds: float = 1.0) -> np.ndarray:
    """A seeded 16 kHz mono clip: a tone plus a little noise, float32 in [-1, 1]."""
    t = np.arange(int(AUDIO_SAMPLE_RATE * seconds)) / AUDIO_SAMPLE_RATE
    noise = np.random.default_rng(seed).normal(0, 0.05, t.shape)
    return (0.5 * np.sin(2 * np.pi * 440 * t) + noise).astype(np.float32)
