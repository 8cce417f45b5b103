"""Let transformers' Gemma 4 processor load without torchvision: PIL images, no video.

transformers 5.19 cannot build `Gemma4Processor` when torchvision is absent (the CPU build of
vLLM ships without it, because no CPU torchvision exists for torch 2.13):

- `processing_gemma4` imports `image_processing_gemma4`, which imports torchvision at module
  level. Its PIL twin `image_processing_pil_gemma4` has the same helpers and the class
  `Gemma4ImageProcessorPil`; we register it under the torchvision module's name.
- `Gemma4Processor.__init__` needs a video processor, but the auto class for Gemma 4 video is
  torchvision-only and transformers' own check of the video argument looks its base class up
  among torchvision-gated names. We register a stand-in that refuses every video with a clear
  `ValueError`, and accept it in `Gemma4Processor`'s argument check. (vLLM's Gemma 4 code
  sends video frames through the image processor and never calls the video processor.)

Nothing changes when torchvision can be found, or when transformers has no Gemma 4 modules.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any

VIDEO_UNSUPPORTED_MESSAGE = (
    "video input is not supported on this build: torchvision is not installed"
)

_GEMMA4_PACKAGE = "transformers.models.gemma4"
_TORCHVISION_IMAGE_MODULE = f"{_GEMMA4_PACKAGE}.image_processing_gemma4"
_PIL_IMAGE_MODULE = f"{_GEMMA4_PACKAGE}.image_processing_pil_gemma4"
_PROCESSOR_MODULE = f"{_GEMMA4_PACKAGE}.processing_gemma4"
_CONFIG_MODULE = f"{_GEMMA4_PACKAGE}.configuration_gemma4"

# Marks the objects this module installs, so a second call recognises its own work.
_MARKER = "_gemma_adapter_server_stand_in"


def apply() -> bool:
    """Make `Gemma4Processor` loadable without torchvision; True if the fix was needed.

    Idempotent, safe in any process, and it must run before the first import of
    `transformers.models.gemma4.processing_gemma4` that would otherwise fail.
    """
    if importlib.util.find_spec("torchvision") is not None:
        return False
    if not _gemma4_modules_exist():
        return False
    _install_pil_image_module()
    _register_refusing_video_processor()
    _accept_refusing_video_processor()
    return True


def _gemma4_modules_exist() -> bool:
    try:
        return all(
            importlib.util.find_spec(name) is not None
            for name in (_PIL_IMAGE_MODULE, _PROCESSOR_MODULE, _CONFIG_MODULE)
        )
    except ImportError:
        return False


def _install_pil_image_module() -> None:
    """Register a module under the torchvision image module's name that serves the PIL class."""
    current = sys.modules.get(_TORCHVISION_IMAGE_MODULE)
    if current is not None and getattr(current, _MARKER, False):
        return
    pil = importlib.import_module(_PIL_IMAGE_MODULE)
    stand_in = types.ModuleType(_TORCHVISION_IMAGE_MODULE, pil.__doc__)
    stand_in.__dict__.update(
        {name: value for name, value in vars(pil).items() if not name.startswith("__")}
    )
    stand_in.__package__ = _GEMMA4_PACKAGE
    # find_spec() on a module in sys.modules reads its __spec__ and fails if it is None.
    stand_in.__spec__ = importlib.machinery.ModuleSpec(_TORCHVISION_IMAGE_MODULE, loader=None)
    stand_in.Gemma4ImageProcessor = pil.Gemma4ImageProcessorPil  # type: ignore[attr-defined]
    stand_in.__all__ = ["Gemma4ImageProcessor"]  # type: ignore[attr-defined]
    setattr(stand_in, _MARKER, True)
    sys.modules[_TORCHVISION_IMAGE_MODULE] = stand_in


def _refusing_video_processor_class() -> type:
    """Build the stand-in video processor class (transformers is imported lazily)."""
    from transformers.processing_utils import VideosKwargs
    from transformers.video_processing_utils import BaseVideoProcessor

    # The Gemma 4 keys of a checkpoint's video config, accepted without a warning.
    class Gemma4VideoProcessorKwargs(VideosKwargs, total=False):
        patch_size: int
        max_soft_tokens: int
        pooling_kernel_size: int

    class Gemma4VideoProcessor(BaseVideoProcessor):
        """Stand-in for transformers' `Gemma4VideoProcessor` that refuses every video.

        It keeps transformers' class name so that checkpoints naming `Gemma4VideoProcessor` in
        their processor config resolve to it, and saving a processor writes the real name.
        """

        valid_kwargs = Gemma4VideoProcessorKwargs  # type: ignore[assignment]
        patch_size = 16
        max_soft_tokens = 70
        pooling_kernel_size = 3

        def preprocess(self, videos: Any, **kwargs: Any) -> Any:
            raise ValueError(VIDEO_UNSUPPORTED_MESSAGE)

    Gemma4VideoProcessor.__qualname__ = Gemma4VideoProcessor.__name__
    setattr(Gemma4VideoProcessor, _MARKER, True)
    return Gemma4VideoProcessor


def _register_refusing_video_processor() -> None:
    from transformers.models.auto.video_processing_auto import (
        VIDEO_PROCESSOR_MAPPING,
        AutoVideoProcessor,
    )

    config_class = importlib.import_module(_CONFIG_MODULE).Gemma4Config
    registered = VIDEO_PROCESSOR_MAPPING._extra_content.get(config_class) or {}
    if any(getattr(cls, _MARKER, False) for cls in registered.values()):
        return
    refusing = _refusing_video_processor_class()
    # Both backend keys: callers may ask for either, and neither real class can load here.
    AutoVideoProcessor.register(
        config_class,
        video_processor_classes={"torchvision": refusing, "pil": refusing},
        exist_ok=True,
    )


def _accept_refusing_video_processor() -> None:
    """Check the video argument of `Gemma4Processor` against the real base class.

    transformers resolves `VideoProcessorMixin` through its top-level namespace and the video
    auto mapping, both of which are torchvision-gated placeholders here, so the stock check fails.
    """
    from transformers.video_processing_utils import VideoProcessorMixin

    processor_class = importlib.import_module(_PROCESSOR_MODULE).Gemma4Processor
    stock_check = processor_class.check_argument_for_proper_class
    if getattr(stock_check, _MARKER, False):
        return

    def check_argument_for_proper_class(self: Any, argument_name: str, argument: Any) -> Any:
        if argument_name != "video_processor":
            return stock_check(self, argument_name, argument)
        if not isinstance(argument, VideoProcessorMixin):
            raise TypeError(
                f"Received a {type(argument).__name__} for argument video_processor, "
                "but a VideoProcessorMixin was expected."
            )
        return VideoProcessorMixin

    setattr(check_argument_for_proper_class, _MARKER, True)
    processor_class.check_argument_for_proper_class = check_argument_for_proper_class
