"""Rotary position embeddings for explicit (possibly repeating or skipping) positions.

The inverse frequencies come from transformers' own ROPE_INIT_FUNCTIONS, so
every scaling scheme a checkpoint declares (llama3, linear, yarn, longrope,
dynamic, ...) is computed exactly as the reference does.
"""

from __future__ import annotations

from typing import Any

import torch


def rope_inv_freq(hf_config: Any, device: torch.device, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim // 2], attention_scaling) for a Hugging Face config."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(hf_config, "rope_parameters", None) or {}
    if layer_type is not None and layer_type in params:  # per-layer-type rope (Gemma 3/4)
        params = params[layer_type]
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        dim = int(head_dim * params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0)))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv_freq.to(device), 1.0
    fn = ROPE_INIT_FUNCTIONS[rope_type]
    kwargs = {"layer_type": layer_type} if layer_type is not None else {}
    inv_freq, scaling = fn(hf_config, device, **kwargs)
    return inv_freq.to(device), float(scaling)


# Positions below this read cos/sin from a table cached per dtype on CUDA (one gather instead of about six
# kernels per table per step); 2 x 32768 x rotary_dim values, 16 MiB for rotary_dim 128 in bf16.
CACHED_POSITIONS = 1 << 15


class Rotary:
    """cos/sin for a batch of positions; applied in the non-interleaved (rotate-half) layout."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0) -> None:
        self.inv_freq = inv_freq.float()  # [rotary_dim // 2]
        self.scaling = attention_scaling
        self.rotary_dim = inv_freq.numel() * 2
        self._tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype,
                max_position: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """max_position: the batch's largest position, known on the host (None: unknown, e.g. in a captured
        graph); below CACHED_POSITIONS on CUDA the values are gathered from the cached table (the same
        elementwise computation, so equal)."""
        if max_position is not None and max_position < CACHED_POSITIONS and positions.is_cuda:
            cos, sin = self._table(dtype)
            return cos[positions], sin[positions]
        return self._compute(positions, dtype)

    def _table(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        table = self._tables.get(dtype)
        if table is None:
            positions = torch.arange(CACHED_POSITIONS, device=self.inv_freq.device)
            table = self._tables[dtype] = self._compute(positions, dtype)
        return table

    def _compute(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, rotary_dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, rotary_dim]
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos/sin: [T, rotary_dim]. Rotates the first rotary_dim dims."""
    rd = cos.shape[-1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    if rd == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
