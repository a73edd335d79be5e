"""Which model families take images and audio, and their processor and tower classes (imported lazily).

The registries map a checkpoint's `model_type` to "module:Class" names of its
processor and tower per media kind (`ImageProcessor` and `VisionTower` of
`pie.engine.vision.base` for images; an audio processor that turns a waveform
into a `PreparedImage` of features, and its tower), so this package stays
torch-free for the runtime and the CLI (`serves_images`, `serves_audio`) and a
family adds one line here and its own module.
"""

from __future__ import annotations

import importlib
from typing import Any

from pie.engine.vision.info import MediaKind

# model_type -> (processor, tower)
_FAMILIES: dict[str, tuple[str, str]] = {
    "gemma3": ("pie.engine.vision.siglip:Gemma3ImageProcessor", "pie.engine.vision.siglip:Gemma3VisionTower"),
    "gemma4": ("pie.engine.vision.gemma4:Gemma4ImageProcessor", "pie.engine.vision.gemma4:Gemma4VisionTower"),
    "mistral3": ("pie.engine.vision.pixtral:PixtralImageProcessor", "pie.engine.vision.pixtral:PixtralVisionTower"),
    **dict.fromkeys(("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"),
                    ("pie.engine.vision.qwen3_vl:Qwen3VLImageProcessor", "pie.engine.vision.qwen3_vl:Qwen3VLVisionTower")),
}

_AUDIO_FAMILIES: dict[str, tuple[str, str]] = {
    "gemma4": ("pie.engine.vision.gemma4_audio:Gemma4AudioProcessor", "pie.engine.vision.gemma4_audio:Gemma4AudioTower"),
}
_REGISTRIES = {MediaKind.IMAGE: _FAMILIES, MediaKind.AUDIO: _AUDIO_FAMILIES}
# The config.json key whose presence says a checkpoint has the kind's tower.
CONFIG_KEYS = {MediaKind.IMAGE: "vision_config", MediaKind.AUDIO: "audio_config"}


def serves_audio(model_type: str) -> bool:
    """Whether pie runs this family's audio tower (for checkpoints that have one: an `audio_config`)."""
    return model_type in _AUDIO_FAMILIES


def audio_families() -> list[str]:
    return sorted(_AUDIO_FAMILIES)


def serves_images(model_type: str) -> bool:
    """Whether pie runs this family's vision tower (checkpoints of other image-text families serve text only)."""
    return model_type in _FAMILIES


def image_families() -> list[str]:
    return sorted(_FAMILIES)


def _load(ref: str) -> Any:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def family_classes(model_type: str, kind: MediaKind = MediaKind.IMAGE) -> tuple[Any, Any]:
    """(processor class, tower class) of a family that serves `kind` (`serves_images`, `serves_audio`)."""
    processor, tower = _REGISTRIES[kind][model_type]
    return _load(processor), _load(tower)
