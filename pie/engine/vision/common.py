"""What the vision towers of every family share: the prepared image, pixel normalisation, 2-D rotary
embeddings, per-image attention and checkpoint-name mapping.

A family module (`pixtral.py`, `qwen3_vl.py`) provides an `<Family>ImageProcessor` whose `prepare`
turns one decoded PIL image into a `PreparedImage`, and a `<Family>VisionTower` whose `forward` turns a
list of them into one embedding matrix per image, in the order of the image's `embed_rows`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from PIL import Image


class ImageInputError(ValueError):
    """An image this model's processor cannot take (too small, too elongated); the message says why."""


@dataclass(frozen=True)
class PreparedImage:
    """One image, preprocessed for one family's tower, and the place it takes in a prompt."""

    pixel_values: torch.Tensor  # exactly what the tower takes for this image (family-specific layout)
    grid: tuple[int, int, int]  # (t, h, w) in patches after the processor; t = 1 for images
    tokens: list[int]  # token ids the image occupies in the prompt, begin/end/break tokens included
    embed_rows: list[int]  # indices into `tokens` whose rows take the tower's embeddings, in output order
    positions: torch.Tensor | None  # M-RoPE (3, len(tokens)) offsets from the image's first token, or None

    def __post_init__(self) -> None:
        assert len(self.embed_rows) <= len(self.tokens), (len(self.embed_rows), len(self.tokens))
        assert self.positions is None or tuple(self.positions.shape) == (3, len(self.tokens)), (
            None if self.positions is None else tuple(self.positions.shape), len(self.tokens))

    @property
    def position_span(self) -> int:
        """How far the image advances the position counter: the next token sits at start + this."""
        if self.positions is None:
            return len(self.tokens)
        return int(self.positions.max()) + 1


# ---- pixels ---------------------------------------------------------------------------------------

def rgb_image(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (what transformers' processors do)."""
    from PIL import Image as PILImage

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PILImage.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


# OpenAI CLIP's pixel statistics: the default mean / std of the Pixtral and Qwen-VL processors.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PixelNorm:
    """Resampling filter, rescale factor, mean and std of a `preprocessor_config.json`."""

    resample: int  # a PIL resampling filter id (3 = bicubic)
    rescale_factor: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_config(cls, cfg: dict[str, Any], default_mean: Sequence[float], default_std: Sequence[float],
                    default_normalize: bool = True) -> PixelNorm:
        return cls(resample=int(cfg.get("resample", 3)),
                   rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
                   mean=tuple(float(x) for x in cfg.get("image_mean") or default_mean),
                   std=tuple(float(x) for x in cfg.get("image_std") or default_std),
                   do_rescale=bool(cfg.get("do_rescale", True)),
                   do_normalize=bool(cfg.get("do_normalize", default_normalize)))

    def resize_and_normalize(self, image: Image.Image, height: int, width: int) -> torch.Tensor:
        """`image` (RGB) resized to (height, width) and normalised: float32 [3, height, width]."""
        if image.size != (width, height):
            image = image.resize((width, height), resample=self.resample)
        arr = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)  # (C, H, W)
        out = arr.astype(np.float64) * self.rescale_factor if self.do_rescale else arr.astype(np.float64)
        out32 = out.astype(np.float32)  # rescale in float64 then normalise in float32, like transformers
        if self.do_normalize:
            mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
            std = np.asarray(self.std, dtype=np.float32)[:, None, None]
            out32 = (out32 - mean) / std
        return torch.from_numpy(np.ascontiguousarray(out32))


# ---- layers ---------------------------------------------------------------------------------------

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"vision activation {name!r} is not supported; known: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama-style RMSNorm: normalised in float32, scaled by `weight` in the input dtype."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def axial_rope(h_pos: torch.Tensor, w_pos: torch.Tensor, h_freqs: torch.Tensor,
               w_freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, head_dim] (float32) of a 2-D rotary embedding for the rotate-half convention.

    The first half of each half-head turns with the patch's row (`h_freqs`), the second with its
    column (`w_freqs`); head_dim = 2 * (len(h_freqs) + len(w_freqs)).
    """
    angles = torch.cat([h_pos.float()[:, None] * h_freqs[None, :], w_pos.float()[:, None] * w_freqs[None, :]],
                       dim=-1)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, head_dim] rotated by cos/sin [N, head_dim] (rotate-half), computed in float32."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)


def rope_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """The standard 1 / theta^(2i/dim) frequencies, i = 0 .. dim/2 - 1 (float32)."""
    # on the CPU even while a tower is built under `torch.device("meta")`
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: Sequence[int],
                      scale: float | None = None) -> torch.Tensor:
    """Bidirectional attention within each segment of a packed sequence.

    q: [N, heads, head_dim], k, v: [N, kv_heads, head_dim] with N = sum(lengths); returns
    [N, heads * head_dim]. Each image (frame) attends only to itself, so one kernel call per segment
    needs no [N, N] mask. `scale`: the softmax scale, 1/sqrt(head_dim) when None.
    """
    if k.shape[1] != q.shape[1]:  # grouped kv heads
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    outs = []
    start = 0
    for n in lengths:
        qs, ks, vs = (t[start:start + n].transpose(0, 1) for t in (q, k, v))  # [heads, n, head_dim]
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, scale=scale).transpose(0, 1).reshape(n, -1))
        start += n
    assert start == q.shape[0], (start, q.shape[0])
    return torch.cat(outs, dim=0)


def rope_theta(vision_config: Any, default: float = 10_000.0) -> float:
    """`rope_parameters["rope_theta"]` (transformers >= 5) or the older `rope_theta` attribute."""
    params = getattr(vision_config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(vision_config, "rope_theta", None) or default)


# ---- checkpoint loading ---------------------------------------------------------------------------

class CheckpointModule(torch.nn.Module):
    """A module whose parameter names are the checkpoint's names after one of `prefixes` is stripped.

    `load_tensor` copies one checkpoint tensor into its parameter (shape checked) and remembers it;
    `check_loaded` raises naming every parameter no tensor filled.
    """

    # checkpoint prefix -> prefix of this module's own parameter names
    prefixes: tuple[tuple[str, str], ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self._loaded: set[str] = set()

    def local_name(self, name: str) -> str | None:
        for src, dst in self.prefixes:
            if name.startswith(src):
                return dst + name[len(src):]
        return None

    def load_tensor(self, name: str, tensor: torch.Tensor) -> bool:
        local = self.local_name(name)
        if local is None:
            return False
        if local.endswith("inv_freq"):  # rotary tables some exports include; recomputed here
            return True
        params = self._params()
        if local not in params:
            raise KeyError(f"checkpoint tensor {name!r} ({local!r}) has no parameter in {type(self).__name__}; "
                           "the checkpoint's vision config and this tower disagree")
        param = params[local]
        if tuple(param.shape) != tuple(tensor.shape):
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"{type(self).__name__} expects {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensor.to(device=param.device, dtype=param.dtype))
        self._loaded.add(local)
        return True

    def _params(self) -> dict[str, nn.Parameter]:
        cache: dict[str, nn.Parameter] | None = self.__dict__.get("_param_cache")
        if cache is None:  # one walk of the module tree, not one per checkpoint tensor
            cache = dict(self.named_parameters())
            self.__dict__["_param_cache"] = cache
        return cache

    def check_loaded(self) -> None:
        missing = sorted(set(dict(self.named_parameters())) - self._loaded)
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise ValueError(f"{type(self).__name__}: {len(missing)} parameters not in the checkpoint: {shown}")


def build_on(device: torch.device, dtype: torch.dtype, make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """`make()` built on the meta device, then given uninitialised storage on `device` in `dtype`.

    Every parameter is then filled by `load_tensor`; `check_loaded` finds any that were not.
    """
    with torch.device("meta"):
        module = make()
    return module.to_empty(device=device).to(dtype)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def check_aspect(height: int, width: int, limit: float) -> None:
    ratio = max(height, width) / max(1, min(height, width))
    if min(height, width) < 1 or ratio > limit or not math.isfinite(ratio):
        raise ImageInputError(f"image of {width}x{height} pixels: the aspect ratio {ratio:.1f} exceeds "
                              f"{limit:g}; crop or pad it")
