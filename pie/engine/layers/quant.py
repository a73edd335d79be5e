"""Weight-only quantization of Linear layers: int8, int4 (grouped) and float8, plus fp8 activations.

Kernels come from PyTorch itself, the same ones torchao dispatches to for these
formats, so no extra dependency is needed:

- int8: per-output-channel symmetric scales; `torch._weight_int8pack_mm`.
- int4: groups of `group_size` inputs, asymmetric (scale + zero per group) in
  tinygemm's convention w = (q - 8) * scale + zero; `torch._weight_int4pack_mm`
  (CUDA, bf16) or `torch._weight_int4pack_mm_for_cpu`.
- float8 (e4m3): per-output-channel scales. Weight-only, the weight is
  dequantised per call; with `runtime_quant = "fp8"` on a GPU of compute
  capability >= 8.9, activations are quantised per token on the fly and the
  product runs on `torch._scaled_mm` (FP8 tensor cores).

Every format also has `dequantize()`, the reference its fast path is tested
against and the fallback where a kernel does not take a shape or device.
Quantisation happens in `Linear.finalize()`, once all of a layer's shards are
loaded, so fused projections are quantised as one matrix.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F

QUANT_MODES = ("int8", "int4", "float8")
FP8 = torch.float8_e4m3fn
_FP8_MAX = float(torch.finfo(FP8).max)


class QuantizedWeight(ABC):
    """A quantised [out, in] weight that multiplies activations of `dtype`."""

    bits: ClassVar[int]

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    @abstractmethod
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in] -> x @ W^T: [T, out]."""

    @abstractmethod
    def dequantize(self) -> torch.Tensor:
        """The weight as the model will see it: [out, in] in `dtype`."""

    @property
    @abstractmethod
    def nbytes(self) -> int: ...


class Int8Weight(QuantizedWeight):
    bits = 8

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__(w.dtype)
        w32 = w.float()
        self.scale = (w32.abs().amax(dim=1).clamp(min=1e-12) / 127.0).to(w.dtype)  # [out]
        self.q = torch.round(w32 / self.scale.float()[:, None]).clamp(-127, 127).to(torch.int8)  # [out, in]
        self._kernel = _int8_kernel_works(self.q, self.scale)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel:
            return torch._weight_int8pack_mm(x, self.q, self.scale)
        # No int8 kernel for this device/dtype: scale after an int8->float product (still exact
        # with respect to the dequantised weight, since the scale is per output column).
        return F.linear(x, self.q.to(x.dtype)) * self.scale.to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return (self.q.float() * self.scale.float()[:, None]).to(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * self.scale.element_size()


class Int4Weight(QuantizedWeight):
    bits = 4

    def __init__(self, w: torch.Tensor, group_size: int = 128) -> None:
        super().__init__(w.dtype)
        out_f, in_f = w.shape
        g = group_size if in_f % group_size == 0 else _largest_group(in_f)
        self.group_size = g
        grouped = w.float().reshape(out_f, in_f // g, g)
        lo, hi = grouped.amin(dim=-1), grouped.amax(dim=-1)  # [out, groups]
        scale = ((hi - lo) / 15.0).clamp(min=1e-12)
        q = torch.round((grouped - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
        self.q = q.reshape(out_f, in_f)  # [out, in] values 0..15
        zero = lo + 8.0 * scale  # tinygemm: w = (q - 8) * scale + zero
        self.scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).contiguous()  # [groups, out, 2]
        self._packed, self._kernel = self._pack(w.device)

    def _pack(self, device: torch.device) -> tuple[torch.Tensor | None, str]:
        out_f, in_f = self.q.shape
        if device.type == "cpu" and hasattr(torch, "_weight_int4pack_mm_for_cpu"):
            return torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.q, 2), "cpu"
        # tinygemm's CUDA kernel: bf16 only, out multiple of 8, in multiple of inner_k_tiles * 16.
        if device.type == "cuda" and self.dtype == torch.bfloat16 and out_f % 8 == 0 and in_f % 128 == 0:
            nibbles = ((self.q[:, ::2] << 4) | self.q[:, 1::2]).to(torch.uint8)
            return torch._convert_weight_to_int4pack(nibbles, 8), "cuda"
        return None, "dequant"

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        sz = self.scales_and_zeros.to(x.dtype)
        if self._packed is None:
            return F.linear(x, self.dequantize())
        if self._kernel == "cpu":
            return torch._weight_int4pack_mm_for_cpu(x, self._packed, self.group_size, sz)
        if self._kernel == "cuda":
            return torch._weight_int4pack_mm(x, self._packed, self.group_size, sz)
        raise AssertionError(f"unknown int4 kernel {self._kernel!r}")

    def dequantize(self) -> torch.Tensor:
        g = self.group_size
        scale = self.scales_and_zeros[..., 0].t().repeat_interleave(g, dim=1)  # [out, in]
        zero = self.scales_and_zeros[..., 1].t().repeat_interleave(g, dim=1)
        return ((self.q.float() - 8.0) * scale + zero).to(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.q.numel() // 2 + self.scales_and_zeros.numel() * 4


class Fp8Weight(QuantizedWeight):
    bits = 8

    def __init__(self, w: torch.Tensor, dynamic_activations: bool = False) -> None:
        super().__init__(w.dtype)
        w32 = w.float()
        self.scale = (w32.abs().amax(dim=1).clamp(min=1e-12) / _FP8_MAX)  # [out] float32
        self.q = (w32 / self.scale[:, None]).clamp(-_FP8_MAX, _FP8_MAX).to(FP8)  # [out, in]
        self.dynamic = dynamic_activations and _scaled_mm_available(w.device)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dynamic:
            return F.linear(x, self.dequantize())
        # Per-token activation scales; _scaled_mm wants a row-major A and a column-major B.
        x_scale = (x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / _FP8_MAX)  # [T, 1]
        x_q = (x.float() / x_scale).clamp(-_FP8_MAX, _FP8_MAX).to(FP8)
        return torch._scaled_mm(x_q, self.q.t(), scale_a=x_scale, scale_b=self.scale[None, :],
                                out_dtype=x.dtype)

    def dequantize(self) -> torch.Tensor:
        return (self.q.float() * self.scale[:, None]).to(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 4


def _int8_kernel_works(q: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether torch has `_weight_int8pack_mm` for this device and dtype (it varies by build)."""
    try:
        torch._weight_int8pack_mm(torch.zeros(1, q.shape[1], dtype=scale.dtype, device=q.device), q, scale)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def _largest_group(in_features: int) -> int:
    for g in (128, 64, 32, 16, 8):
        if in_features % g == 0:
            return g
    return in_features


def _scaled_mm_available(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize(w: torch.Tensor, mode: str, *, fp8_activations: bool = False) -> QuantizedWeight:
    if mode == "int8":
        return Int8Weight(w)
    if mode == "int4":
        return Int4Weight(w)
    if mode == "float8":
        return Fp8Weight(w, dynamic_activations=fp8_activations)
    raise ValueError(f"unknown quantization mode {mode!r}; one of {', '.join(QUANT_MODES)}")
