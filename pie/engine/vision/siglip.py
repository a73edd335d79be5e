"""Gemma 3's vision side: SigLIP's ViT encoder, then Gemma 3's pooling projector into the text model.

Processor (from `preprocessor_config.json`): RGB, resized to `size` (896 x 896
for the released checkpoints) with the configured PIL filter, scaled by
`rescale_factor`, normalised by `image_mean` / `image_std`. Pan-and-scan crops
are not supported (the released configs leave it off).

Tower: patches of `patch_size` -> a conv patch embedding plus a learned
position embedding -> pre-norm transformer layers (bidirectional attention,
tanh-GELU MLP) -> a final LayerNorm. Projector: the (side x side) patch grid is
average-pooled down to `mm_tokens_per_image` tokens, RMS-normalised Gemma-style
(x * (1 + w), in float32) and multiplied by `mm_input_projection_weight`
[vision_hidden, text_hidden]. Every token of the image's run of soft tokens takes
one row; the begin/end-of-image tokens are embedded as ordinary tokens.

Checkpoint names: transformers >= 5 writes `model.vision_tower.<...>` and
`model.multi_modal_projector.<...>`; hub checkpoints written earlier use
`vision_tower.vision_model.<...>` and `multi_modal_projector.<...>`. SigLIP's
pooling head (`head.*`) is not used by Gemma 3 and is dropped.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pie.engine.vision.base import VisionTower, config_value
from pie.engine.vision.common import PreparedImage
from pie.errors import UnsupportedModelError

_TOWER_PREFIXES = ("model.vision_tower.vision_model.", "model.vision_tower.", "vision_tower.vision_model.",
                   "vision_tower.")
_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")


class Gemma3ImageProcessor:
    """PIL image -> the tower's [3, H, W] float32 pixels and the image's prompt tokens."""

    # transformers' Gemma 3 processor writes an image as "\n\n<start_of_image>...<end_of_image>\n\n"
    text_around = ("\n\n", "\n\n")

    def __init__(self, preprocessor_config: dict[str, Any], hf_config: Any) -> None:
        if preprocessor_config.get("do_pan_and_scan"):
            raise UnsupportedModelError("this Gemma 3 checkpoint's preprocessor_config.json turns on pan-and-scan "
                                        "crops, which pie does not implement; set do_pan_and_scan to false")
        vision = hf_config.vision_config
        size = preprocessor_config.get("size") or {}
        self.height = int(size.get("height", vision.image_size))
        self.width = int(size.get("width", vision.image_size))
        if (self.height, self.width) != (vision.image_size, vision.image_size):
            raise UnsupportedModelError(f"preprocessor_config.json resizes to {self.height}x{self.width} but the "
                                        f"vision tower takes {vision.image_size}x{vision.image_size} images")
        self.resample = Image.Resampling(int(preprocessor_config.get("resample", Image.Resampling.BILINEAR)))
        self.do_resize = bool(preprocessor_config.get("do_resize", True))
        self.do_rescale = bool(preprocessor_config.get("do_rescale", True))
        self.rescale_factor = float(preprocessor_config.get("rescale_factor", 1 / 255))
        self.do_normalize = bool(preprocessor_config.get("do_normalize", True))
        self.mean = np.asarray(preprocessor_config.get("image_mean", [0.5, 0.5, 0.5]), np.float32)
        self.std = np.asarray(preprocessor_config.get("image_std", [0.5, 0.5, 0.5]), np.float32)
        n = int(hf_config.mm_tokens_per_image)
        side = vision.image_size // vision.patch_size
        self.grid = (1, side, side)
        image_token = int(config_value(hf_config, "image_token_id", "image_token_index"))
        self.tokens = [int(hf_config.boi_token_index), *([image_token] * n), int(hf_config.eoi_token_index)]
        self.embed_rows = list(range(1, n + 1))

    def prepare(self, image: Image.Image) -> PreparedImage:
        rgb = image.convert("RGB")
        if self.do_resize and rgb.size != (self.width, self.height):
            rgb = rgb.resize((self.width, self.height), resample=self.resample)
        if rgb.size != (self.width, self.height):
            raise ValueError(f"the image is {rgb.size[0]}x{rgb.size[1]} and the processor does not resize; the "
                             f"tower takes {self.width}x{self.height}")
        x = np.asarray(rgb, dtype=np.float32)
        if self.do_rescale:
            x = x * np.float32(self.rescale_factor)
        if self.do_normalize:
            x = (x - self.mean) / self.std
        pixels = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))
        return PreparedImage(pixels, self.grid, list(self.tokens), list(self.embed_rows), None)


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(hidden, hidden) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.head_dim ** -0.5
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # float32 softmax, as SigLIP's
        return self.out_proj(torch.matmul(probs, v).transpose(1, 2).reshape(b, n, d))


class _MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str) -> None:
        super().__init__()
        if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu"):
            raise UnsupportedModelError(f"SigLIP hidden_act {act!r} is not supported (gelu_pytorch_tanh or gelu)")
        self.approximate = "none" if act == "gelu" else "tanh"
        self.fc1, self.fc2 = nn.Linear(hidden, intermediate), nn.Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class _Layer(nn.Module):
    def __init__(self, c: Any) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = _Attention(c.hidden_size, c.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = _MLP(c.hidden_size, c.intermediate_size, c.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Embeddings(nn.Module):
    def __init__(self, c: Any) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, kernel_size=c.patch_size,
                                         stride=c.patch_size)
        self.position_embedding = nn.Embedding((c.image_size // c.patch_size) ** 2, c.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        return x + self.position_embedding.weight[None]


class _Encoder(nn.Module):
    def __init__(self, c: Any) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Layer(c) for _ in range(c.num_hidden_layers)])


class _Projector(nn.Module):
    def __init__(self, hf_config: Any) -> None:
        super().__init__()
        v, text_hidden = hf_config.vision_config, hf_config.get_text_config(decoder=True).hidden_size
        self.mm_input_projection_weight = nn.Parameter(torch.empty(v.hidden_size, text_hidden), requires_grad=False)
        self.mm_soft_emb_norm_weight = nn.Parameter(torch.empty(v.hidden_size), requires_grad=False)
        self.eps = v.layer_norm_eps
        self.side = v.image_size // v.patch_size
        per_side = math.isqrt(int(hf_config.mm_tokens_per_image))
        if per_side * per_side != hf_config.mm_tokens_per_image or self.side % per_side:
            raise UnsupportedModelError(f"mm_tokens_per_image = {hf_config.mm_tokens_per_image} must be a square "
                                        f"whose side divides the {self.side}-patch grid")
        self.kernel = self.side // per_side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, d = x.shape
        grid = x.transpose(1, 2).reshape(b, d, self.side, self.side)
        pooled = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)
        h = pooled.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.mm_soft_emb_norm_weight.float())
        return torch.matmul(h.to(x.dtype), self.mm_input_projection_weight).to(x.dtype)


class Gemma3VisionTower(VisionTower):
    """SigLIP encoder + Gemma 3 projector: [n, 3, H, W] pixels -> [n, mm_tokens_per_image, text_hidden]."""

    bidirectional: ClassVar[bool] = True  # Gemma 3's text model attends both ways within an image's soft tokens

    def __init__(self, hf_config: Any) -> None:
        super().__init__(hf_config)
        c = hf_config.vision_config
        self.embeddings = _Embeddings(c)
        self.encoder = _Encoder(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.projector = _Projector(hf_config)

    def checkpoint_name(self, name: str) -> str | None:
        if name.startswith(_PROJECTOR_PREFIXES):
            sub = name.split("multi_modal_projector.", 1)[1]
            return "projector." + sub.replace("mm_soft_emb_norm.weight", "mm_soft_emb_norm_weight")
        for prefix in _TOWER_PREFIXES:
            if name.startswith(prefix):
                sub = name[len(prefix):]
                return "" if sub.startswith("head.") else sub  # "": SigLIP's pooling head, unused here
        return None

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.projector(self.post_layernorm(x))

    def forward(self, images: list[PreparedImage]) -> list[torch.Tensor]:
        dev = self.post_layernorm.weight.device
        out = self.encode(torch.stack([im.pixel_values for im in images]).to(dev))
        return list(out.unbind(0))
