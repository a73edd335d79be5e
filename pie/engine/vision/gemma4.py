"""Gemma 4's images: the vision encoder, its pooler and the multimodal embedder, and the Gemma 4 processor.

Processor (as transformers' `Gemma4ImageProcessor`): the image is resampled (bicubic), keeping its
aspect ratio, to the largest size with at most max_soft_tokens * k^2 patches (k = pooling_kernel_size)
whose sides are multiples of k * patch_size; pixels are only rescaled to [0, 1]; patches of
(patch, patch, channels) are listed row by row. The prompt takes `<boi>`, one image token per
k x k block of patches (row-major), `<eoi>`.

Tower: patch projection of 2 * pixels - 1 plus learned x and y position embeddings; bidirectional
sandwich-norm layers with q/k/v RMSNorms, attention scale 1 and a 2-D RoPE that turns the first half
of each head with the patch's column and the second half with its row; the k x k average pool times
sqrt(hidden), optionally standardised; then the embedder (RMSNorm without scale, a projection into
the text hidden size). `use_clipped_linears` checkpoints clamp the inputs and outputs of every linear.

Checkpoints whose text config says `use_bidirectional_attention = "vision"` (transformers'
`create_masks_for_vision_model`) let an image's soft tokens attend to each other both ways on the
decoder's sliding-window layers, the window still ANDed on top, and causally on its full-attention
layers: `bidirectional` and `bidirectional_layers = "sliding"` tell the engine's encoder
(`vision/encoder.py`), which masks the prefill that way. Others (no such setting) are causal throughout.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pie.engine.vision.common import (
    CheckpointModule,
    ImageInputError,
    PixelNorm,
    PreparedImage,
    activation,
    apply_rope,
    build_on,
    rgb_image,
    rope_inv_freq,
    rope_theta,
    segment_attention,
)

if TYPE_CHECKING:
    from PIL import Image

_SOFT_TOKENS = (70, 140, 280, 560, 1120)  # the budgets Gemma 4 was trained with


def fit_size(height: int, width: int, patch: int, max_patches: int, k: int) -> tuple[int, int]:
    """The largest aspect-preserving (height, width), sides multiples of k * patch, within max_patches."""
    unit = k * patch
    factor = math.sqrt(max_patches * patch * patch / (height * width))
    h, w = math.floor(factor * height / unit) * unit, math.floor(factor * width / unit) * unit
    if h == 0 and w == 0:
        raise ImageInputError(f"image of {width}x{height} pixels is too small to resize to {unit}-pixel multiples")
    longest = (max_patches // (k * k)) * unit
    if h == 0:  # very wide: one block high
        h, w = unit, min(math.floor(width / height) * unit, longest)
    elif w == 0:
        w, h = unit, min(math.floor(height / width) * unit, longest)
    if h * w > max_patches * patch * patch:
        raise ImageInputError(f"image of {width}x{height} pixels: {h}x{w} exceeds {max_patches} patches; "
                              "its aspect ratio is too extreme")
    return h, w


class Gemma4ImageProcessor:
    def __init__(self, preprocessor_config: dict[str, Any], hf_config: Any) -> None:
        vc = hf_config.vision_config
        cfg = preprocessor_config
        self.patch_size = int(cfg.get("patch_size") or vc.patch_size)
        self.k = int(cfg.get("pooling_kernel_size") or vc.pooling_kernel_size)
        if (self.patch_size, self.k) != (vc.patch_size, vc.pooling_kernel_size):
            raise ValueError(f"preprocessor patch_size / pooling_kernel_size {self.patch_size} / {self.k} "
                             f"differ from the vision config's {vc.patch_size} / {vc.pooling_kernel_size}")
        self.max_soft_tokens = int(cfg.get("max_soft_tokens") or 280)
        if self.max_soft_tokens not in _SOFT_TOKENS:
            raise ValueError(f"max_soft_tokens must be one of {_SOFT_TOKENS}, got {self.max_soft_tokens}")
        self.do_resize = bool(cfg.get("do_resize", True))
        self.norm = PixelNorm.from_config(cfg, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), default_normalize=False)
        self.image_token_id = int(hf_config.image_token_id)
        self.boi_token_id = int(hf_config.boi_token_id)
        self.eoi_token_id = int(hf_config.eoi_token_id)

    def prepare(self, image: Image.Image) -> PreparedImage:
        rgb = rgb_image(image)
        width, height = rgb.size
        if self.do_resize:
            height, width = fit_size(height, width, self.patch_size, self.max_soft_tokens * self.k ** 2, self.k)
        pixels = self.norm.resize_and_normalize(rgb, height, width)  # [3, H, W]
        p = self.patch_size
        gh, gw = height // p, width // p
        if gh % self.k or gw % self.k or gh * gw > self.max_soft_tokens * self.k ** 2:
            raise ImageInputError(f"image of {width}x{height} pixels does not fit {self.max_soft_tokens} soft "
                                  f"tokens in {self.k * p}-pixel blocks; leave do_resize on")
        patches = pixels.view(3, gh, p, gw, p).permute(1, 3, 2, 4, 0).reshape(gh * gw, p * p * 3)
        n = gh * gw // self.k ** 2
        tokens = [self.boi_token_id, *[self.image_token_id] * n, self.eoi_token_id]
        return PreparedImage(pixel_values=patches, grid=(1, gh, gw), tokens=tokens,
                             embed_rows=list(range(1, n + 1)), positions=None)


def gemma_rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Gemma 4's RMSNorm: in float32, times the weight itself (not 1 + weight), cast back."""
    x32 = x.float()
    out = x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    return (out * weight.float() if weight is not None else out).type_as(x)


class NormWeight(nn.Module):
    """The weight of a Gemma 4 RMSNorm (applied by `gemma_rms`), named as the checkpoint names it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class ClippableLinear(nn.Module):
    """A bias-free linear whose input and output are clamped to checkpoint bounds when `clipped`."""

    def __init__(self, n_in: int, n_out: int, clipped: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(n_in, n_out, bias=False)
        self.clipped = clipped
        if clipped:  # buffers in transformers; parameters here so that load_tensor fills them
            self.input_min = nn.Parameter(torch.zeros(()), requires_grad=False)
            self.input_max = nn.Parameter(torch.zeros(()), requires_grad=False)
            self.output_min = nn.Parameter(torch.zeros(()), requires_grad=False)
            self.output_max = nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.clipped:
            return self.linear(x)
        x = torch.clamp(x, self.input_min, self.input_max)
        return torch.clamp(self.linear(x), self.output_min, self.output_max)


class _Attention(nn.Module):
    def __init__(self, vc: Any) -> None:
        super().__init__()
        c, d = bool(vc.use_clipped_linears), int(vc.head_dim)
        self.q_proj = ClippableLinear(vc.hidden_size, vc.num_attention_heads * d, c)
        self.k_proj = ClippableLinear(vc.hidden_size, vc.num_key_value_heads * d, c)
        self.v_proj = ClippableLinear(vc.hidden_size, vc.num_key_value_heads * d, c)
        self.o_proj = ClippableLinear(vc.num_attention_heads * d, vc.hidden_size, c)
        self.q_norm = NormWeight(d)
        self.k_norm = NormWeight(d)


class _MLP(nn.Module):
    def __init__(self, vc: Any) -> None:
        super().__init__()
        c = bool(vc.use_clipped_linears)
        self.gate_proj = ClippableLinear(vc.hidden_size, vc.intermediate_size, c)
        self.up_proj = ClippableLinear(vc.hidden_size, vc.intermediate_size, c)
        self.down_proj = ClippableLinear(vc.intermediate_size, vc.hidden_size, c)


class _Layer(nn.Module):
    def __init__(self, vc: Any) -> None:
        super().__init__()
        self.self_attn = _Attention(vc)
        self.mlp = _MLP(vc)
        self.input_layernorm = NormWeight(vc.hidden_size)
        self.post_attention_layernorm = NormWeight(vc.hidden_size)
        self.pre_feedforward_layernorm = NormWeight(vc.hidden_size)
        self.post_feedforward_layernorm = NormWeight(vc.hidden_size)


class _PatchEmbedder(nn.Module):
    def __init__(self, vc: Any) -> None:
        super().__init__()
        self.input_proj = nn.Linear(3 * vc.patch_size ** 2, vc.hidden_size, bias=False)
        self.position_embedding_table = nn.Parameter(torch.zeros(2, vc.position_embedding_size, vc.hidden_size))


class _Encoder(nn.Module):
    def __init__(self, vc: Any) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer(vc) for _ in range(vc.num_hidden_layers))


class _VisionTower(nn.Module):
    def __init__(self, vc: Any) -> None:
        super().__init__()
        self.patch_embedder = _PatchEmbedder(vc)
        self.encoder = _Encoder(vc)
        if vc.standardize:
            self.std_bias = nn.Parameter(torch.zeros(vc.hidden_size), requires_grad=False)
            self.std_scale = nn.Parameter(torch.ones(vc.hidden_size), requires_grad=False)


class _Embedder(nn.Module):
    def __init__(self, vision_dim: int, text_dim: int) -> None:
        super().__init__()
        self.embedding_projection = nn.Linear(vision_dim, text_dim, bias=False)


class Gemma4VisionTower(CheckpointModule):
    """Gemma 4's vision encoder + pooler + `embed_vision`; names as in the checkpoint."""

    prefixes = (
        ("model.vision_tower.", "vision_tower."),
        ("vision_tower.", "vision_tower."),
        ("model.embed_vision.", "embed_vision."),
        ("embed_vision.", "embed_vision."),
    )
    bidirectional_layers: ClassVar[str] = "sliding"

    def __init__(self, hf_config: Any) -> None:
        super().__init__()
        vc = hf_config.vision_config
        text = hf_config.get_text_config(decoder=True)
        # Per checkpoint, unlike the other families' class-level flag.
        self.bidirectional = getattr(text, "use_bidirectional_attention", None) == "vision"
        self.k = int(vc.pooling_kernel_size)
        self.num_heads, self.num_kv_heads = int(vc.num_attention_heads), int(vc.num_key_value_heads)
        self.head_dim = int(vc.head_dim)
        self.eps = float(vc.rms_norm_eps)
        self.hidden = int(vc.hidden_size)
        self.act = activation(vc.hidden_activation)
        self.standardize = bool(vc.standardize)
        self.freqs = rope_inv_freq(rope_theta(vc, default=100.0), self.head_dim // 2)  # per half-head axis
        self.vision_tower = _VisionTower(vc)
        self.embed_vision = _Embedder(int(getattr(vc, "output_proj_dims", None) or vc.hidden_size),
                                      int(text.hidden_size))

    @classmethod
    def from_config(cls, hf_config: Any, dtype: torch.dtype, device: torch.device) -> Gemma4VisionTower:
        tower = build_on(device, dtype, lambda: cls(hf_config))
        assert isinstance(tower, cls)
        return tower

    def _rope(self, x: torch.Tensor, cols: tuple[torch.Tensor, torch.Tensor],
              rows: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        first, second = x.chunk(2, dim=-1)
        return torch.cat([apply_rope(first, *cols), apply_rope(second, *rows)], dim=-1)

    def _layer(self, layer: _Layer, x: torch.Tensor, cols: tuple[torch.Tensor, torch.Tensor],
               rows: tuple[torch.Tensor, torch.Tensor], lengths: list[int]) -> torch.Tensor:
        n, att, d = x.shape[0], layer.self_attn, self.head_dim
        h = gemma_rms(x, layer.input_layernorm.weight, self.eps)
        q = gemma_rms(att.q_proj(h).view(n, self.num_heads, d), att.q_norm.weight, self.eps)
        k = gemma_rms(att.k_proj(h).view(n, self.num_kv_heads, d), att.k_norm.weight, self.eps)
        v = gemma_rms(att.v_proj(h).view(n, self.num_kv_heads, d), None, self.eps)
        q, k = self._rope(q, cols, rows), self._rope(k, cols, rows)
        a = att.o_proj(segment_attention(q, k, v, lengths, scale=1.0))
        x = x + gemma_rms(a, layer.post_attention_layernorm.weight, self.eps)
        h = gemma_rms(x, layer.pre_feedforward_layernorm.weight, self.eps)
        m = layer.mlp
        f = m.down_proj(self.act(m.gate_proj(h)) * m.up_proj(h))
        return x + gemma_rms(f, layer.post_feedforward_layernorm.weight, self.eps)

    @staticmethod
    def _angles(pos: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = pos.float()[:, None] * freqs[None, :]
        a = torch.cat([a, a], dim=-1)
        return a.cos(), a.sin()

    def _pool(self, x: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        """[gh*gw, d] -> [(gh/k)*(gw/k), d] float32: k x k block means (row-major blocks), times sqrt(d)."""
        k = self.k
        blocks = x.float().view(gh // k, k, gw // k, k, -1).mean(dim=(1, 3))
        return blocks.reshape((gh // k) * (gw // k), -1) * self.hidden ** 0.5

    @torch.no_grad()
    def forward(self, images: list[PreparedImage]) -> list[torch.Tensor]:
        if not images:
            return []
        emb = self.vision_tower.patch_embedder
        weight = emb.input_proj.weight
        pixels = torch.cat([img.pixel_values for img in images]).to(device=weight.device, dtype=weight.dtype)
        cols_l, rows_l, lengths = [], [], []
        for img in images:
            _, gh, gw = img.grid
            r, c = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
            rows_l.append(r.flatten())
            cols_l.append(c.flatten())
            lengths.append(gh * gw)
        cols, rows = torch.cat(cols_l).to(weight.device), torch.cat(rows_l).to(weight.device)
        table = emb.position_embedding_table
        x = emb.input_proj(2 * (pixels - 0.5)) + F.embedding(cols, table[0]) + F.embedding(rows, table[1])
        cos_sin_cols = tuple(t.to(x.device) for t in self._angles(cols.cpu(), self.freqs))
        cos_sin_rows = tuple(t.to(x.device) for t in self._angles(rows.cpu(), self.freqs))
        layers: list[_Layer] = list(self.vision_tower.encoder.layers)  # type: ignore[arg-type]
        for layer in layers:
            x = self._layer(layer, x, cos_sin_cols, cos_sin_rows, lengths)  # type: ignore[arg-type]
        pooled = torch.cat([self._pool(part, img.grid[1], img.grid[2])
                            for part, img in zip(x.split(lengths), images, strict=True)])
        if self.standardize:
            pooled = (pooled - self.vision_tower.std_bias.float()) * self.vision_tower.std_scale.float()
        soft = gemma_rms(pooled.to(x.dtype), None, self.eps)
        out = self.embed_vision.embedding_projection(soft)
        sizes = [len(img.embed_rows) for img in images]
        assert sum(sizes) == out.shape[0], (sizes, out.shape)
        return list(out.split(sizes))
