"""Mistral 3's images: the Pixtral vision encoder, its patch merger and projector, and the Pixtral processor.

Processor (as transformers' `PixtralProcessor` over `PixtralImageProcessor`): the image is scaled down
(floor) to fit `size` (`longest_edge`, or `height` x `width`), then each side is rounded *up* to a
multiple of patch_size * spatial_merge_size and resampled (bicubic by default). The prompt takes one
`[IMG]` per merged patch, rows ended by `[IMG_BREAK]` and the last row by `[IMG_END]`.

Tower: a 2-D-RoPE transformer over each image's own patches (no attention across images), the
`vision_feature_layer` hidden states, then the projector: RMSNorm, the learned 2x2 (spatial_merge_size^2)
patch merger, linear-GELU-linear into the text model's hidden size.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from pie.engine.vision.common import (
    CLIP_MEAN,
    CLIP_STD,
    CheckpointModule,
    PixelNorm,
    PreparedImage,
    activation,
    apply_rope,
    axial_rope,
    build_on,
    ceil_div,
    check_aspect,
    rgb_image,
    rms_norm,
    rope_inv_freq,
    rope_theta,
    segment_attention,
)

if TYPE_CHECKING:
    from PIL import Image

# Mistral's tekken vocabulary (Pixtral 12B, Mistral Small 3.1/3.2, Ministral 3) has [IMG] = 10,
# [IMG_BREAK] = 12, [IMG_END] = 13; config.json only carries [IMG] (`image_token_index`). A caller with
# another vocabulary passes `image_break_token_id` / `image_end_token_id` in the processor config.
_IMG_BREAK_ID = 12
_IMG_END_ID = 13
_LN_EPS = 1e-5  # Pixtral's RMSNorms (ln_pre, attention_norm, ffn_norm) use a fixed epsilon


class PixtralImageProcessor:
    def __init__(self, preprocessor_config: dict[str, Any], hf_config: Any) -> None:
        self.patch_size = int(hf_config.vision_config.patch_size)
        self.merge = int(getattr(hf_config, "spatial_merge_size", 1))
        size = preprocessor_config.get("size") or {"longest_edge": 1024}
        if size.get("longest_edge"):
            self.max_height = self.max_width = int(size["longest_edge"])
        elif size.get("height") and size.get("width"):
            self.max_height, self.max_width = int(size["height"]), int(size["width"])
        else:
            raise ValueError(f"Pixtral preprocessor `size` needs `longest_edge` or `height` and `width`, got {size}")
        self.do_resize = bool(preprocessor_config.get("do_resize", True))
        self.norm = PixelNorm.from_config(preprocessor_config, CLIP_MEAN, CLIP_STD)
        image_id = getattr(hf_config, "image_token_index", None)
        self.image_token_id = int(image_id if image_id is not None else hf_config.image_token_id)
        self.break_token_id = int(preprocessor_config.get("image_break_token_id", _IMG_BREAK_ID))
        self.end_token_id = int(preprocessor_config.get("image_end_token_id", _IMG_END_ID))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) in pixels after resizing: a whole number of merged patches each way."""
        check_aspect(height, width, limit=1000.0)
        ratio = max(height / self.max_height, width / self.max_width)
        if ratio > 1:  # floor, not round: never over the limit
            height, width = math.floor(height / ratio), math.floor(width / ratio)
        unit = self.patch_size * self.merge
        return ceil_div(height, unit) * unit, ceil_div(width, unit) * unit

    def token_layout(self, rows: int, cols: int) -> tuple[list[int], list[int]]:
        """tokens and embed_rows for a grid of rows x cols merged patches."""
        tokens: list[int] = []
        for _ in range(rows):
            tokens += [self.image_token_id] * cols + [self.break_token_id]
        tokens[-1] = self.end_token_id
        embed_rows = [i for i, t in enumerate(tokens) if t == self.image_token_id]
        return tokens, embed_rows

    def prepare(self, image: Image.Image) -> PreparedImage:
        rgb = rgb_image(image)
        width, height = rgb.size
        if self.do_resize:
            height, width = self.output_size(height, width)
        elif height % (self.patch_size * self.merge) or width % (self.patch_size * self.merge):
            raise ValueError(f"do_resize is off but the image ({width}x{height}) is not a multiple of "
                             f"{self.patch_size * self.merge} pixels each way")
        pixels = self.norm.resize_and_normalize(rgb, height, width)  # [3, H, W]
        grid = (1, height // self.patch_size, width // self.patch_size)
        tokens, embed_rows = self.token_layout(grid[1] // self.merge, grid[2] // self.merge)
        return PreparedImage(pixel_values=pixels, grid=grid, tokens=tokens, embed_rows=embed_rows, positions=None)


class _Norm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class _Attention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim, bias=False) for _ in range(4))


class _FeedForward(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, inner, bias=False)
        self.up_proj = nn.Linear(dim, inner, bias=False)
        self.down_proj = nn.Linear(inner, dim, bias=False)


class _Layer(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.attention_norm = _Norm(dim)
        self.attention = _Attention(dim)
        self.ffn_norm = _Norm(dim)
        self.feed_forward = _FeedForward(dim, inner)


class _Transformer(nn.Module):
    def __init__(self, dim: int, inner: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer(dim, inner) for _ in range(depth))


class _Encoder(nn.Module):
    def __init__(self, vc: Any) -> None:
        super().__init__()
        self.patch_conv = nn.Conv2d(vc.num_channels, vc.hidden_size, vc.patch_size, vc.patch_size, bias=False)
        self.ln_pre = _Norm(vc.hidden_size)
        self.transformer = _Transformer(vc.hidden_size, vc.intermediate_size, vc.num_hidden_layers)


class _PatchMerger(nn.Module):
    def __init__(self, dim: int, merge: int) -> None:
        super().__init__()
        self.merging_layer = nn.Linear(dim * merge * merge, dim, bias=False)


class _Projector(nn.Module):
    def __init__(self, dim: int, text_dim: int, merge: int, bias: bool) -> None:
        super().__init__()
        self.norm = _Norm(dim)
        self.patch_merger = _PatchMerger(dim, merge)
        self.linear_1 = nn.Linear(dim, text_dim, bias=bias)
        self.linear_2 = nn.Linear(text_dim, text_dim, bias=bias)


class PixtralVisionTower(CheckpointModule):
    """Mistral 3's Pixtral encoder + multimodal projector; names as in the checkpoint."""

    bidirectional: ClassVar[bool] = False  # Mistral 3's text model attends causally over image rows too

    prefixes = (
        ("model.vision_tower.", "vision_tower."),  # transformers >= 5
        ("vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("multi_modal_projector.", "multi_modal_projector."),
    )

    def __init__(self, hf_config: Any) -> None:
        super().__init__()
        vc = hf_config.vision_config
        text = hf_config.get_text_config(decoder=True)
        layer = hf_config.vision_feature_layer
        if not isinstance(layer, int):  # transformers' projector (norm and merger of one layer's width) too
            raise ValueError(f"Mistral 3 vision_feature_layer {layer!r}: only one layer (an int) is supported")
        # hidden state `layer` of [ln_pre output, layer 1 output, ..., layer N output]
        self.feature_layer = layer % (int(vc.num_hidden_layers) + 1)
        self.merge = int(getattr(hf_config, "spatial_merge_size", 1))
        self.num_heads = int(vc.num_attention_heads)
        self.head_dim = int(vc.hidden_size) // self.num_heads
        self.act = activation(vc.hidden_act)
        self.projector_act = activation(hf_config.projector_hidden_act)
        self.projector_eps = float(text.rms_norm_eps)
        inv = rope_inv_freq(rope_theta(vc), self.head_dim)
        # Pixtral interleaves the frequencies between the axes: rows take the even ones, columns the odd.
        self.h_freqs, self.w_freqs = inv[0::2], inv[1::2]
        self.vision_tower = _Encoder(vc)
        self.multi_modal_projector = _Projector(vc.hidden_size, text.hidden_size, self.merge,
                                                bool(hf_config.multimodal_projector_bias))

    @classmethod
    def from_config(cls, hf_config: Any, dtype: torch.dtype, device: torch.device) -> PixtralVisionTower:
        tower = build_on(device, dtype, lambda: cls(hf_config))
        assert isinstance(tower, cls)
        return tower

    def _layer(self, layer: _Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               lengths: list[int]) -> torch.Tensor:
        n = x.shape[0]
        h = rms_norm(x, layer.attention_norm.weight, _LN_EPS)
        att = layer.attention
        q, k, v = (p(h).view(n, self.num_heads, self.head_dim) for p in (att.q_proj, att.k_proj, att.v_proj))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        x = x + att.o_proj(segment_attention(q, k, v, lengths))
        h = rms_norm(x, layer.ffn_norm.weight, _LN_EPS)
        ff = layer.feed_forward
        return x + ff.down_proj(self.act(ff.gate_proj(h)) * ff.up_proj(h))

    def _encode(self, images: list[PreparedImage]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """The `vision_feature_layer` hidden states of all images' patches, packed: [sum(h*w), dim]."""
        conv = self.vision_tower.patch_conv
        patches, h_pos, w_pos, grids = [], [], [], []
        for img in images:
            pix = img.pixel_values.to(device=conv.weight.device, dtype=conv.weight.dtype)
            emb = conv(pix[None])[0]  # [dim, h, w]
            _, h, w = emb.shape
            assert (h, w) == img.grid[1:], ((h, w), img.grid)
            patches.append(emb.flatten(1).T)
            rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            h_pos.append(rows.flatten())
            w_pos.append(cols.flatten())
            grids.append((h, w))
        x = rms_norm(torch.cat(patches), self.vision_tower.ln_pre.weight, _LN_EPS)
        cos, sin = axial_rope(torch.cat(h_pos), torch.cat(w_pos), self.h_freqs, self.w_freqs)
        cos, sin = cos.to(x.device), sin.to(x.device)
        lengths = [h * w for h, w in grids]
        layers: list[_Layer] = list(self.vision_tower.transformer.layers)  # type: ignore[arg-type]
        for layer in layers[:self.feature_layer]:
            x = self._layer(layer, x, cos, sin, lengths)
        return x, grids

    def _merge(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """[h*w, d] patches -> [(h/m)*(w/m), d*m*m]: each m x m block's features, channel-major."""
        m = self.merge
        d = x.shape[-1]
        blocks = x.view(h // m, m, w // m, m, d).permute(0, 2, 4, 1, 3)  # [h/m, w/m, d, m, m]
        return blocks.reshape((h // m) * (w // m), d * m * m)

    @torch.no_grad()
    def forward(self, images: list[PreparedImage]) -> list[torch.Tensor]:
        if not images:
            return []
        feats, grids = self._encode(images)
        proj = self.multi_modal_projector
        feats = rms_norm(feats, proj.norm.weight, self.projector_eps)
        merged = [self._merge(part, h, w) for part, (h, w) in zip(feats.split([h * w for h, w in grids]), grids,
                                                                  strict=True)]
        hidden = proj.patch_merger.merging_layer(torch.cat(merged))
        out = proj.linear_2(self.projector_act(proj.linear_1(hidden)))
        sizes = [len(img.embed_rows) for img in images]
        assert sum(sizes) == out.shape[0], (sizes, out.shape)
        return list(out.split(sizes))
