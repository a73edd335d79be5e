"""The interface every vision family implements: an image processor and a tower.

    processor = <F>ImageProcessor(preprocessor_config, hf_config)
    prepared = processor.prepare(pil_image)            # -> PreparedImage
    tower = <F>VisionTower.from_config(hf_config, dtype, device)
    tower.load_tensor(name, tensor)                     # True: the tower took this checkpoint tensor
    embeddings = tower(list_of_prepared)                # [len(embed_rows), text_hidden] per image
    encoded = encode_images(tower, list_of_prepared)    # ImageEmbeddings: the above, plus DeepStack levels

`VisionTower` gives the loading by name (`checkpoint_name` maps a checkpoint
tensor onto one of the tower's parameters) and the strict check that every
parameter was loaded; a family writes its modules, `checkpoint_name` and
`forward`.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from PIL import Image
from torch import nn

from pie.engine.vision.common import PreparedImage
from pie.errors import CheckpointError


@dataclass(frozen=True)
class ImageEmbeddings:
    """What a tower gives for one image: the embeddings of its embedding rows and, for towers with
    DeepStack (Qwen3-VL), one more matrix per level, added to the same rows after text decoder layer k."""

    embeds: torch.Tensor  # [len(embed_rows), text_hidden]
    deepstack: tuple[torch.Tensor, ...] = ()  # k-th: [len(embed_rows), text_hidden]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.embeds, *self.deepstack))


def encode_images(tower: nn.Module, images: list[PreparedImage]) -> list[ImageEmbeddings]:
    """Every image's `ImageEmbeddings`: the tower's `embed_images` where it has outputs beyond the
    embeddings (DeepStack), else its `forward`."""
    embed = getattr(tower, "embed_images", None)
    if embed is not None:
        out: list[ImageEmbeddings] = embed(images)
        return out
    return [ImageEmbeddings(e) for e in tower(images)]


class ImageProcessor(Protocol):
    def __init__(self, preprocessor_config: dict[str, Any], hf_config: Any) -> None: ...
    def prepare(self, image: Image.Image) -> PreparedImage: ...


def config_value(config: Any, *names: str) -> Any:
    """The first of `names` the config has (transformers renamed some keys between versions)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    raise CheckpointError(f"the checkpoint's config has none of {', '.join(names)}")


class VisionTower(nn.Module):
    """A vision encoder and its projector into the text model's hidden size."""

    # The image's embedding rows attend to each other both ways in the text model's prefill (Gemma 3),
    # so an image must lie whole inside one forward pass.
    bidirectional: ClassVar[bool] = False
    # On which decoder layers they do: "all" (Gemma 3) or "sliding", the sliding-window layers only, causal on
    # the full-attention ones (Gemma 4). Towers that are not VisionTowers may declare it too (encoder.py).
    bidirectional_layers: ClassVar[str] = "all"

    def __init__(self, hf_config: Any) -> None:
        super().__init__()
        self._loaded: set[str] = set()

    @classmethod
    def from_config(cls, hf_config: Any, dtype: torch.dtype, device: torch.device | str) -> VisionTower:
        with torch.device("meta"):
            tower = cls(hf_config)
        tower = tower.to(dtype=dtype).to_empty(device=device)
        tower.requires_grad_(False)
        return tower.eval()

    @abstractmethod
    def checkpoint_name(self, name: str) -> str | None:
        """Checkpoint tensor name -> parameter name, "" for a tensor of this tower that is not used, None if
        the tensor is not the tower's."""

    @abstractmethod
    def forward(self, images: list[PreparedImage]) -> list[torch.Tensor]:
        """One [len(image.embed_rows), text_hidden] tensor per image, in the tower's dtype and device."""

    def load_tensor(self, name: str, tensor: torch.Tensor) -> bool:
        target = self.checkpoint_name(name)
        if target is None:
            return False
        if target == "":
            return True
        params = dict(self.named_parameters())
        if target not in params:
            raise CheckpointError(f"unexpected vision tensor {name!r}: no parameter {target!r} of "
                                  f"{type(self).__name__} takes it")
        param = params[target]
        if tuple(param.shape) != tuple(tensor.shape):
            raise CheckpointError(f"vision tensor {name!r} has shape {tuple(tensor.shape)}; "
                                  f"{type(self).__name__}.{target} expects {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensor.to(param.dtype))
        self._loaded.add(target)
        return True

    def check_loaded(self) -> None:
        missing = sorted(set(dict(self.named_parameters())) - self._loaded)
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise CheckpointError(f"the checkpoint is missing vision tensor(s) for {', '.join(missing[:5])}{more}")
