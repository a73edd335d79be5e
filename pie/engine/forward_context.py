"""Per-batch state that every layer needs: where to write K/V and how to attend.

Passed explicitly down the model's forward (no globals). Built once per batch
by the engine after the attention backend has planned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pie.engine.attention.base import AttentionBackend
from pie.engine.kv_cache import KVCache


@dataclass
class ForwardContext:
    backend: AttentionBackend
    kv: KVCache
    positions: torch.Tensor  # [num_tokens] int64, logical (RoPE) positions
    write_page: torch.Tensor  # [num_tokens] page each new token's K/V goes to
    write_offset: torch.Tensor  # [num_tokens] slot within that page
    # Extra per-batch inputs some layers read (e.g. LoRA row->adapter index); keyed by feature name.
    extras: dict[str, Any] = field(default_factory=dict)
    # The batch's largest position, known on the host (None inside captured graphs, whose replays see any).
    max_position: int | None = None
    # (layer's pages, k, v) -> None: writes the new K/V instead of `KVCache.write` (CUDA: FlashInfer's append
    # kernel, `cuda_ops.KVAppend`); None: `KVCache.write`.
    kv_append: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  sinks: torch.Tensor | None = None) -> torch.Tensor:
        """Append this batch's K/V for `layer`, then attend. q: [T, heads, d]; k, v: [T, kv_heads, d]."""
        if self.kv_append is not None:
            self.kv_append(self.kv.layers[layer], k, v)
        else:
            self.kv.write(layer, self.write_page, self.write_offset, k, v)
        return self.backend.run(layer, q, self.kv.layers[layer], sinks)
