"""The gated MLP of every dense family: down(act(gate(x)) * up(x)), with gate/up fused."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pie.engine.layers.linear import Linear


def act_fn(name: str):  # type: ignore[no-untyped-def]
    """The activation named by an HF config's `hidden_act` / `hidden_activation`."""
    if name in ("silu", "swish"):
        return F.silu
    if name in ("gelu_pytorch_tanh", "gelu_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise ValueError(f"unsupported activation {name!r}")


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str, *, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=bias,
                                   shard_sizes=[intermediate_size, intermediate_size])
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)
        self.act = act_fn(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)
