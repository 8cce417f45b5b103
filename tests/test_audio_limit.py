"""`--max-audio-seconds` cannot promise more audio than the model hears.

Gemma 4's audio feature extractor keeps 30 s at most and drops the rest without a word, so a
limit above that would accept clips whose end the model never hears: the service refuses to
start with it, naming the model's limit.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

from server.engine.protocol import AUDIO_SAMPLE_RATE
from server.inference.media import check_audio_limit, model_audio_seconds
from server.testbed.default_model import DefaultModel
from tests.live_server import free_port, server_command


def mel_frames(extractor: Gemma4AudioFeatureExtractor, seconds: float) -> int:
    clip = np.random.default_rng(0).normal(0, 0.1, int(seconds * AUDIO_SAMPLE_RATE))
    features = extractor([clip.astype(np.float32)], sampling_rate=AUDIO_SAMPLE_RATE)
    return int(np.asarray(features["input_features"]).shape[1])


def test_the_model_hears_30_seconds_and_the_extractor_drops_the_rest(tiny: DefaultModel) -> None:
    longest = model_audio_seconds(tiny.model_dir)
    assert longest == 30.0
    processor = json.loads((tiny.model_dir / "processor_config.json").read_text())
    extractor = Gemma4AudioFeatureExtractor(**processor["feature_extractor"])
    # Past the limit the features stop growing: that audio never reaches the model.
    assert mel_frames(extractor, longest + 10) == mel_frames(extractor, longest)
    assert mel_frames(extractor, longest - 1) < mel_frames(extractor, longest)


def test_a_limit_above_the_models_is_refused_and_one_within_it_accepted(
    tiny: DefaultModel,
) -> None:
    check_audio_limit(30.0, tiny.model_dir)
    check_audio_limit(1.5, tiny.model_dir)
    with pytest.raises(ValueError, match=r"--max-audio-seconds 30\.5 is above .* \(30 s;"):
        check_audio_limit(30.5, tiny.model_dir)


def test_a_model_without_audio_has_no_audio_limit(tiny: DefaultModel, tmp_path: Path) -> None:
    model_dir = tmp_path / "no-audio"
    model_dir.mkdir()
    config = json.loads((tiny.model_dir / "config.json").read_text())
    config.pop("audio_config")
    (model_dir / "config.json").write_text(json.dumps(config))
    shutil.copy(tiny.model_dir / "processor_config.json", model_dir)
    assert model_audio_seconds(model_dir) is None
    check_audio_limit(600.0, model_dir)


def test_the_server_refuses_to_start_with_a_limit_above_the_models(
    tiny: DefaultModel, tmp_path: Path
) -> None:
    command = server_command(tiny.model_dir.parent, free_port(), "--max-audio-seconds", "45")
    command += ["--state-dir", str(tmp_path / "state")]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 1
    assert "--max-audio-seconds 45 is above the longest audio this model takes (30 s" in (
        finished.stderr
    )
    assert "EngineCore" not in finished.stderr, "refused before any engine starts"
