"""Linear layers that load from one or several checkpoint tensors.

A fused layer (q/k/v -> qkv_proj, gate/up -> gate_up_proj) is one matmul at
run time but is loaded shard by shard from the source tensors, so the mapping
from checkpoint names stays data on the model class (`packed_modules_mapping`).
Tensor-parallel and quantized variants override `load_shard` / `finalize`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pie.engine.layers.quant import QuantizedWeight, quantize
from pie.errors import CheckpointError

if TYPE_CHECKING:
    from pie.engine.layers.lora import LoRABatch


def _has_onednn_linear() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return torch.ops.mkldnn._linear_pointwise.default is not None
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = _has_onednn_linear()


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ b), through oneDNN for float32 on the CPU.

    PyTorch sends a float32 CPU `F.linear` to MKL's sgemm, which on AMD CPUs (this project's CPU machines)
    does not take its AVX-512 path; oneDNN's matmul does, on any x86 CPU. Measured one thread, AMD EPYC
    (Zen 4): M=128 x K=512 x N=3072 7.0 -> 5.6 ms, the 32000-row LM head 82 -> 61 ms; M=1 3072 rows
    0.61 -> 0.33 ms. Same sums in another order: equal to F.linear within float32 rounding. Other dtypes
    (bf16 already goes to oneDNN inside PyTorch) and other devices keep `F.linear`.
    """
    if _ONEDNN and x.dtype == torch.float32 and x.device.type == "cpu" and weight.dtype == torch.float32:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Module):
    """y = x W^T (+ b). `shard_sizes` lists the output rows each source tensor fills, in order.

    `quant_mode` ("" or one of layers.quant.QUANT_MODES) is set by the engine before loading;
    `finalize` then replaces the float weight by its quantised form.
    """

    quant_mode: str = ""
    fp8_activations: bool = False

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False,
                 shard_sizes: list[int] | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.shard_sizes = shard_sizes or [out_features]
        assert sum(self.shard_sizes) == out_features, (self.shard_sizes, out_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.qweight: QuantizedWeight | None = None

    def shard_rows(self, shard: int) -> slice:
        start = sum(self.shard_sizes[:shard])
        return slice(start, start + self.shard_sizes[shard])

    def load_shard(self, param_name: str, tensor: torch.Tensor, shard: int, source: str) -> None:
        """Copy checkpoint tensor `source` into shard `shard` of `weight` or `bias`."""
        target = getattr(self, param_name)
        rows = self.shard_rows(shard)
        expected = (rows.stop - rows.start, *target.shape[1:])
        if tuple(tensor.shape) != expected:
            raise CheckpointError(
                f"tensor {source!r} has shape {tuple(tensor.shape)}, expected {expected} for this architecture"
            )
        target.data[rows].copy_(tensor)

    def finalize(self) -> None:
        """Called once every shard is loaded: quantise now, as one matrix, if asked to."""
        if not self.quant_mode:
            return
        self.qweight = quantize(self.weight.data, self.quant_mode, fp8_activations=self.fp8_activations)
        # Free the float copy; an empty parameter keeps the module's parameter names intact.
        self.weight = nn.Parameter(self.weight.data.new_empty(0), requires_grad=False)

    def forward(self, x: torch.Tensor, lora: LoRABatch | None = None) -> torch.Tensor:
        if self.qweight is None:
            y = dense_linear(x, self.weight, self.bias)
        else:
            y = self.qweight.matmul(x)
            if self.bias is not None:
                y = y + self.bias
        return y if lora is None else lora.apply(self, x, y)  # the rows' LoRA adapters, if any
