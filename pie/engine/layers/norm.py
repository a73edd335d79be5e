"""RMSNorm, computed in float32 like the reference implementations."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = x / rms(x) * (offset + weight).

    offset is 0 for Llama/Qwen and 1 for Gemma, whose checkpoints store weight - 1.
    """

    def __init__(self, dim: int, eps: float, *, offset: float = 0.0, cast_before_weight: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps
        self.offset = offset
        # Llama/Qwen cast back to the input dtype before the weight multiply; Gemma multiplies in float32.
        self.cast_before_weight = cast_before_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.cast_before_weight:
            w = self.weight if self.offset == 0.0 else self.weight + self.offset
            return w * x32.to(dtype)
        return (x32 * (self.offset + self.weight.float())).to(dtype)
