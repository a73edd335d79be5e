"""Qwen3-VL's (and Qwen 3.5's) images: the vision tower with its patch mergers, and the `smart_resize` processor.

Processor (as transformers' `Qwen2VLImageProcessor`, which Qwen3-VL's processor uses): both sides are
rounded to a multiple of patch_size * merge_size with the pixel count kept within [min_pixels,
max_pixels] (`smart_resize`), the image is resampled (bicubic), normalised, and cut into patches of
(channels, temporal_patch_size, patch, patch) -- a still image is its own frame repeated -- listed
block by block: each merge_size x merge_size block of patches is consecutive, blocks row-major.

Prompt: `<|vision_start|>`, one `<|image_pad|>` per merged block, `<|vision_end|>`. M-RoPE positions
(temporal, height, width) relative to `<|vision_start|>` at 0: the pad of block (i, j) sits at
(1, 1 + i, 1 + j); `<|vision_end|>` at 1 + max(rows, cols) on all three axes, and the text after it
goes on from there (position_span = 2 + max(rows, cols), fewer than the 2 + rows * cols tokens).

Tower: patch embedding (a Conv3d over the patch, applied as one matmul), a learned position table
bilinearly resized to the patch grid, bidirectional blocks with 2-D rotary embeddings within each
image, and the merger (LayerNorm, merge_size^2 patches concatenated, MLP) into the text hidden size.

DeepStack (Qwen3-VL, not Qwen 3.5): after each block listed in `deepstack_visual_indexes` a merger of
its own (LayerNorm after the concatenation) turns that block's hidden states into one more
[rows, text_hidden] matrix. The text decoder adds the k-th of them to its hidden states at the
image's rows after its decoder layer k (k = 0, 1, ...): a hook in the decoder, not an input row, so
`embed_images` returns them beside the embeddings (`forward` returns only the embeddings).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pie.engine.vision.base import ImageEmbeddings
from pie.engine.vision.common import (
    CLIP_MEAN,
    CLIP_STD,
    CheckpointModule,
    ImageInputError,
    PixelNorm,
    PreparedImage,
    activation,
    apply_rope,
    axial_rope,
    build_on,
    check_aspect,
    rgb_image,
    rope_inv_freq,
    rope_theta,
    segment_attention,
)

if TYPE_CHECKING:
    from PIL import Image

_LN_EPS = 1e-6
_MAX_ASPECT = 200.0  # transformers' smart_resize refuses more elongated images


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width): multiples of `factor`, near the aspect ratio, pixel count in [min, max]."""
    check_aspect(height, width, limit=_MAX_ASPECT)
    h, w = round(height / factor) * factor, round(width / factor) * factor  # Python's round (to even)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def image_positions(rows: int, cols: int) -> torch.Tensor:
    """M-RoPE (3, rows * cols + 2) offsets of <|vision_start|>, the pads (row-major), <|vision_end|>."""
    i, j = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    pads = torch.stack([torch.zeros(rows * cols, dtype=torch.long), i.flatten(), j.flatten()]) + 1
    end = torch.full((3, 1), 1 + max(rows, cols), dtype=torch.long)
    return torch.cat([torch.zeros(3, 1, dtype=torch.long), pads, end], dim=1)


def prompt_positions(parts: list[list[int] | PreparedImage], start: int = 0) -> tuple[torch.Tensor, int]:
    """M-RoPE positions [3, num_tokens] of a prompt of text runs and images, and the next position.

    Text takes three equal positions, one per token; an image its offsets from where it starts and
    then advances the counter by its `position_span`.
    """
    out: list[torch.Tensor] = []
    pos = start
    for part in parts:
        if isinstance(part, PreparedImage):
            assert part.positions is not None, "an image without M-RoPE offsets"
            out.append(part.positions + pos)
            pos += part.position_span
        else:
            out.append(torch.arange(pos, pos + len(part)).expand(3, -1))
            pos += len(part)
    return torch.cat(out, dim=1), pos


class Qwen3VLImageProcessor:
    def __init__(self, preprocessor_config: dict[str, Any], hf_config: Any) -> None:
        vc = hf_config.vision_config
        cfg = preprocessor_config
        self.patch_size = int(cfg.get("patch_size") or vc.patch_size)
        self.temporal_patch_size = int(cfg.get("temporal_patch_size") or vc.temporal_patch_size)
        self.merge = int(cfg.get("merge_size") or vc.spatial_merge_size)
        if (self.patch_size, self.temporal_patch_size, self.merge) != (
                vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size):
            raise ValueError(f"preprocessor patch/temporal/merge sizes {self.patch_size}/"
                             f"{self.temporal_patch_size}/{self.merge} differ from the vision config's "
                             f"{vc.patch_size}/{vc.temporal_patch_size}/{vc.spatial_merge_size}")
        size = cfg.get("size") or {}
        self.min_pixels = int(cfg.get("min_pixels") or size.get("shortest_edge") or 56 * 56)
        self.max_pixels = int(cfg.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280)
        self.do_resize = bool(cfg.get("do_resize", True))
        self.norm = PixelNorm.from_config(cfg, CLIP_MEAN, CLIP_STD)
        self.image_token_id = int(hf_config.image_token_id)
        self.start_token_id = int(hf_config.vision_start_token_id)
        self.end_token_id = int(hf_config.vision_end_token_id)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        factor = self.patch_size * self.merge
        if not self.do_resize:
            if height % factor or width % factor:
                raise ImageInputError(f"do_resize is off but the image ({width}x{height}) is not a multiple "
                                      f"of {factor} pixels each way")
            return height, width
        return smart_resize(height, width, factor, self.min_pixels, self.max_pixels)

    def patchify(self, pixels: torch.Tensor) -> torch.Tensor:
        """[C, H, W] -> [H/p * W/p, C * T * p * p]: patches block by block, the frame repeated T times."""
        c, height, width = pixels.shape
        p, m, t = self.patch_size, self.merge, self.temporal_patch_size
        gh, gw = height // p, width // p
        x = pixels.view(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # [bh, bw, m, m, C, p, p]
        x = x[:, :, :, :, :, None].expand(-1, -1, -1, -1, -1, t, -1, -1)
        return x.reshape(gh * gw, c * t * p * p)

    def prepare(self, image: Image.Image) -> PreparedImage:
        rgb = rgb_image(image)
        height, width = self.output_size(rgb.size[1], rgb.size[0])
        pixels = self.norm.resize_and_normalize(rgb, height, width)
        grid = (1, height // self.patch_size, width // self.patch_size)
        rows, cols = grid[1] // self.merge, grid[2] // self.merge
        tokens = [self.start_token_id, *[self.image_token_id] * (rows * cols), self.end_token_id]
        return PreparedImage(pixel_values=self.patchify(pixels), grid=grid, tokens=tokens,
                             embed_rows=list(range(1, 1 + rows * cols)), positions=image_positions(rows, cols))


class _PatchEmbed(nn.Module):
    def __init__(self, vc: Any) -> None:
        super().__init__()
        kernel = (vc.temporal_patch_size, vc.patch_size, vc.patch_size)
        self.proj = nn.Conv3d(vc.in_channels, vc.hidden_size, kernel, kernel, bias=True)


class _Attention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


class _MLP(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(dim, inner)
        self.linear_fc2 = nn.Linear(inner, dim)


class _Block(nn.Module):
    def __init__(self, vc: Any) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(vc.hidden_size, eps=_LN_EPS)
        self.norm2 = nn.LayerNorm(vc.hidden_size, eps=_LN_EPS)
        self.attn = _Attention(vc.hidden_size)
        self.mlp = _MLP(vc.hidden_size, vc.intermediate_size)


class _Merger(nn.Module):
    """merge^2 patches -> one text-hidden row; `post_shuffle`: LayerNorm after the concatenation."""

    def __init__(self, vc: Any, post_shuffle: bool) -> None:
        super().__init__()
        self.post_shuffle = post_shuffle
        wide = vc.hidden_size * vc.spatial_merge_size ** 2
        self.norm = nn.LayerNorm(wide if post_shuffle else vc.hidden_size, eps=_LN_EPS)
        self.linear_fc1 = nn.Linear(wide, wide)
        self.linear_fc2 = nn.Linear(wide, vc.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = self.linear_fc1.in_features
        x = self.norm(x.reshape(-1, wide)) if self.post_shuffle else self.norm(x).reshape(-1, wide)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class _Visual(nn.Module):
    def __init__(self, vc: Any, deepstack_layers: list[int]) -> None:
        super().__init__()
        self.patch_embed = _PatchEmbed(vc)
        self.pos_embed = nn.Embedding(vc.num_position_embeddings, vc.hidden_size)
        self.blocks = nn.ModuleList(_Block(vc) for _ in range(vc.depth))
        self.merger = _Merger(vc, post_shuffle=False)
        if deepstack_layers:
            self.deepstack_merger_list = nn.ModuleList(_Merger(vc, post_shuffle=True) for _ in deepstack_layers)


class Qwen3VLVisionTower(CheckpointModule):
    """Qwen3-VL's / Qwen 3.5's vision tower and mergers; names as in the checkpoint."""

    prefixes = (("model.visual.", "visual."), ("visual.", "visual."))  # transformers >= 5, older
    bidirectional: ClassVar[bool] = False  # the text model attends causally over image rows

    def __init__(self, hf_config: Any) -> None:
        super().__init__()
        vc = hf_config.vision_config
        self.merge = int(vc.spatial_merge_size)
        self.num_heads = int(vc.num_heads)
        self.head_dim = int(vc.hidden_size) // self.num_heads
        self.side = math.isqrt(int(vc.num_position_embeddings))
        assert self.side ** 2 == vc.num_position_embeddings, vc.num_position_embeddings
        self.act = activation(vc.hidden_act)
        # the same frequencies for rows and columns, each over a quarter of the head
        self.freqs = rope_inv_freq(rope_theta(vc), self.head_dim // 2)
        self.deepstack_layers: list[int] = list(getattr(vc, "deepstack_visual_indexes", None) or [])
        self.visual = _Visual(vc, self.deepstack_layers)

    @classmethod
    def from_config(cls, hf_config: Any, dtype: torch.dtype, device: torch.device) -> Qwen3VLVisionTower:
        tower = build_on(device, dtype, lambda: cls(hf_config))
        assert isinstance(tower, cls)
        return tower

    def _block_order(self, x: torch.Tensor) -> torch.Tensor:
        """[h, w, ...] -> [h*w, ...] listed merge block by merge block, as the processor lists patches."""
        h, w = x.shape[:2]
        m = self.merge
        return x.reshape(h // m, m, w // m, m, *x.shape[2:]).transpose(1, 2).reshape(h * w, *x.shape[2:])

    def _grid_inputs(self, t: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Learned positions [t*h*w, dim] and the rows / columns of each patch, in patch order."""
        table = self.visual.pos_embed.weight
        grid = table.view(self.side, self.side, -1).permute(2, 0, 1)[None]  # [1, dim, side, side]
        pos = F.interpolate(grid.float(), size=(h, w), mode="bilinear", align_corners=True)[0]
        pos = self._block_order(pos.permute(1, 2, 0)).to(table.dtype).repeat(t, 1)
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        return pos, self._block_order(rows).repeat(t), self._block_order(cols).repeat(t)

    def _block(self, blk: _Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               lengths: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = blk.attn.qkv(blk.norm1(x)).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        x = x + blk.attn.proj(segment_attention(q, k, v, lengths))
        return x + blk.mlp.linear_fc2(self.act(blk.mlp.linear_fc1(blk.norm2(x))))

    @torch.no_grad()
    def embed_images(self, images: list[PreparedImage]) -> list[ImageEmbeddings]:
        if not images:
            return []
        proj = self.visual.patch_embed.proj
        weight = proj.weight.flatten(1)  # the Conv3d over one whole patch is a matmul
        pixels = torch.cat([img.pixel_values for img in images]).to(device=weight.device, dtype=weight.dtype)
        x = F.linear(pixels, weight, proj.bias)
        pos, rows, cols, lengths = [], [], [], []
        for img in images:
            t, h, w = img.grid
            p, r, c = self._grid_inputs(t, h, w)
            pos.append(p)
            rows.append(r)
            cols.append(c)
            lengths += [h * w] * t  # each frame attends within itself
        x = x + torch.cat(pos).to(x.device)
        cos, sin = axial_rope(torch.cat(rows), torch.cat(cols), self.freqs, self.freqs)
        cos, sin = cos.to(x.device), sin.to(x.device)
        deepstack: list[torch.Tensor] = []
        blocks: list[_Block] = list(self.visual.blocks)  # type: ignore[arg-type]
        for i, blk in enumerate(blocks):
            x = self._block(blk, x, cos, sin, lengths)
            if i in self.deepstack_layers:
                deepstack.append(self.visual.deepstack_merger_list[self.deepstack_layers.index(i)](x))
        merged = self.visual.merger(x)
        sizes = [len(img.embed_rows) for img in images]
        assert sum(sizes) == merged.shape[0], (sizes, merged.shape)
        per_layer = [d.split(sizes) for d in deepstack]
        return [ImageEmbeddings(embeds=e, deepstack=tuple(d[i] for d in per_layer))
                for i, e in enumerate(merged.split(sizes))]

    def forward(self, images: list[PreparedImage]) -> list[torch.Tensor]:
        return [e.embeds for e in self.embed_images(images)]
