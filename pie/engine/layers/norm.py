"""RMSNorm, computed in float32 like the reference implementations.

On CUDA with FlashInfer, `add_and_norm` (a residual add followed by the norm,
what every pre-norm decoder layer does between attention and MLP) is FlashInfer's
single `fused_add_rmsnorm` kernel instead of about six torch kernels, and the
plain norm is its `rmsnorm` kernel (one instead of about eight: it runs four
times per layer with Qwen 3's q/k norms); elsewhere they are exactly the float32
computation below. Both kernels compute in float32 and round once, where the
torch path rounds before the weight multiply: equal within bf16 rounding.
"""

from __future__ import annotations

import importlib.util
from functools import cache

import torch
from torch import nn


@cache
def _flashinfer_norm() -> object | None:
    if importlib.util.find_spec("flashinfer") is None:
        return None
    import flashinfer

    return getattr(flashinfer, "fused_add_rmsnorm", None)


@cache
def _flashinfer_rmsnorm() -> object | None:
    if importlib.util.find_spec("flashinfer") is None:
        return None
    import flashinfer

    return getattr(flashinfer, "rmsnorm", None)


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

    def _fuses(self, x: torch.Tensor) -> bool:
        """FlashInfer's kernels apply: half-precision CUDA rows of this norm's dtype, the Llama/Qwen form."""
        return (self.offset == 0.0 and self.cast_before_weight and x.dtype in (torch.float16, torch.bfloat16)
                and x.dtype == self.weight.dtype and x.shape[-1] % 8 == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = _flashinfer_rmsnorm() if x.is_cuda else None
        if kernel is not None and self._fuses(x):
            rows = x.reshape(-1, x.shape[-1]).contiguous()
            return kernel(rows, self.weight, self.eps).view(x.shape)  # type: ignore[operator]
        dtype = x.dtype
        if dtype == torch.float32 and self.weight.dtype == torch.float32:
            # Float32 has no casts to place: PyTorch's one fused kernel computes the same float32 values
            # (equal to the six-kernel form below on the CPU) instead of six passes over x.
            w = self.weight if self.offset == 0.0 else self.weight + self.offset
            return torch.nn.functional.rms_norm(x, (x.shape[-1],), w, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.cast_before_weight:
            w = self.weight if self.offset == 0.0 else self.weight + self.offset
            return w * x32.to(dtype)
        return (x32 * (self.offset + self.weight.float())).to(dtype)

    def add_and_norm(self, delta: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + delta), residual + delta). May overwrite both inputs (they are the layer's own
        fresh activations): FlashInfer's kernel adds into `residual` and normalises into `delta`."""
        fused = _flashinfer_norm() if delta.is_cuda else None
        if (fused is None or not self._fuses(delta) or delta.dim() != 2 or delta.dtype != residual.dtype
                or not (delta.is_contiguous() and residual.is_contiguous())):
            summed = residual + delta
            return self(summed), summed
        fused(delta, residual, self.weight, self.eps)  # type: ignore[operator]
        return delta, residual
