"""LoRA on the projections of a batch that mixes adapters (and rows with none).

Each resident adapter holds, per `Linear` it targets, one low-rank pair
`LoRAWeights(a, b)` with `y += (x @ a.T) @ b.T`. A fused projection (qkv_proj,
gate_up_proj) keeps one pair whose `b` is zero outside the output rows of the
shards the adapter targets, so a LoRA on `q_proj` only moves the q columns.

Per batch, `LoRABatch` groups the token rows by adapter: one gather, two small
matmuls and one `index_add_` per (distinct adapter, projection), never a loop
over tokens. Rows without an adapter are untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from pie.engine.forward_context import ForwardContext

EXTRAS_KEY = "lora"  # ForwardContext.extras[EXTRAS_KEY] holds the batch's LoRABatch, if any


@dataclass(frozen=True)
class LoRAWeights:
    """One adapter's update of one Linear. a: [rank, in]; b: [out, rank], scaling folded in."""

    a: torch.Tensor
    b: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class LoRAGroup:
    """The rows of a batch that use one adapter."""

    weights: Mapping[nn.Module, LoRAWeights]  # that adapter's pairs, keyed by the Linear they update
    rows: torch.Tensor | None  # [n] int64 row ids on the device; None = every row of the batch


class LoRABatch:
    """The adapters of one forward batch; `Linear.forward(x, lora)` calls `apply`."""

    def __init__(self, groups: list[LoRAGroup]) -> None:
        self.groups = groups

    def apply(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: [T, in] the projection's input, y: [T, out] its base output; returns y plus every LoRA delta."""
        for g in self.groups:
            w = g.weights.get(module)
            if w is None:
                continue
            if g.rows is None:
                y = y + (x @ w.a.t()) @ w.b.t()
            else:
                delta = (x.index_select(0, g.rows) @ w.a.t()) @ w.b.t()  # [n, out]
                y = y.index_add(0, g.rows, delta)
        return y


def lora_of(fwd: ForwardContext) -> LoRABatch | None:
    """The batch's LoRA groups, or None when no request in it uses an adapter."""
    batch: LoRABatch | None = fwd.extras.get(EXTRAS_KEY)
    return batch
