"""Which model families take images, and their processor and tower classes (imported lazily).

The registry maps a checkpoint's `model_type` to "module:Class" names of its
`ImageProcessor` and `VisionTower` (`pie.engine.vision.base`), so this package
stays torch-free for the runtime and the CLI (`serves_images`) and a family
adds one line here and its own module.
"""

from __future__ import annotations

import importlib
from typing import Any

# model_type -> (processor, tower)
_FAMILIES: dict[str, tuple[str, str]] = {
    "gemma3": ("pie.engine.vision.siglip:Gemma3ImageProcessor", "pie.engine.vision.siglip:Gemma3VisionTower"),
    "gemma4": ("pie.engine.vision.gemma4:Gemma4ImageProcessor", "pie.engine.vision.gemma4:Gemma4VisionTower"),
    "mistral3": ("pie.engine.vision.pixtral:PixtralImageProcessor", "pie.engine.vision.pixtral:PixtralVisionTower"),
    **dict.fromkeys(("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"),
                    ("pie.engine.vision.qwen3_vl:Qwen3VLImageProcessor", "pie.engine.vision.qwen3_vl:Qwen3VLVisionTower")),
}


def serves_images(model_type: str) -> bool:
    """Whether pie runs this family's vision tower (checkpoints of other image-text families serve text only)."""
    return model_type in _FAMILIES


def image_families() -> list[str]:
    return sorted(_FAMILIES)


def _load(ref: str) -> Any:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def family_classes(model_type: str) -> tuple[Any, Any]:
    """(processor class, tower class) of a family that `serves_images`."""
    processor, tower = _FAMILIES[model_type]
    return _load(processor), _load(tower)
