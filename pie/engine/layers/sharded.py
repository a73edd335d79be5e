"""Tensor-parallel layers: each rank holds a slice of a weight and the collectives restore the whole.

- `ColumnParallelLinear`: output rows sharded. A fused projection (q/k/v ->
  qkv_proj, gate/up -> gate_up_proj) is split *per source part*: rank r holds
  q[r], k[r], v[r] back to back, so its query heads and the kv heads they
  attend with (grouped-query attention) stay on the same rank, and its local
  gate and up halves still line up for `chunk(2)`. No collective: the next
  layer consumes the local slice.
- `RowParallelLinear`: input columns sharded; each rank's partial product is
  all-reduced, then the bias (loaded whole on every rank) is added once.
- `VocabParallelEmbedding` / `ParallelLMHead`: vocabulary rows sharded in
  ceil(vocab / size) blocks (the last block zero-padded). The embedding masks
  ids outside its block and all-reduces (exact: the other ranks add zeros);
  the LM head's partial logits are all-gathered by `CausalLM.compute_logits`.

The factories (`column_linear`, `row_linear`, `vocab_embedding`, `lm_head`)
return the plain layer at size 1, so the single-device model is exactly the
unsharded one. Quantisation still happens in `Linear.finalize`, on the slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pie.engine.layers.linear import Linear
from pie.engine.parallel import TPGroup
from pie.errors import CheckpointError

if TYPE_CHECKING:
    from pie.engine.layers.lora import LoRABatch


def _check_shape(tensor: torch.Tensor, expected: tuple[int, ...], source: str) -> None:
    if tuple(tensor.shape) != expected:
        raise CheckpointError(f"tensor {source!r} has shape {tuple(tensor.shape)}, expected {expected} "
                              f"for this architecture")


class ColumnParallelLinear(Linear):
    """This rank's output rows of a (possibly fused) projection.

    `part_sizes` are the logical parts in output order (q, k, v or gate, up); each is split by rank.
    With `fused_source` all parts come from one checkpoint tensor (Phi-3), else one tensor per part.
    """

    def __init__(self, in_features: int, part_sizes: list[int], tp: TPGroup, *, bias: bool = False,
                 fused_source: bool = False) -> None:
        assert all(p % tp.size == 0 for p in part_sizes), (part_sizes, tp.size)  # checked by the model spec
        source_parts = [list(part_sizes)] if fused_source else [[p] for p in part_sizes]
        local = [sum(parts) // tp.size for parts in source_parts]
        super().__init__(in_features, sum(local), bias=bias, shard_sizes=local)
        self.tp, self.source_parts = tp, source_parts

    def load_shard(self, param_name: str, tensor: torch.Tensor, shard: int, source: str) -> None:
        target = getattr(self, param_name)
        parts = self.source_parts[shard]
        _check_shape(tensor, (sum(parts), *target.shape[1:]), source)
        r, n = self.tp.rank, self.tp.size
        mine = [p[r * (len(p) // n):(r + 1) * (len(p) // n)] for p in tensor.split(parts, dim=0)]
        target.data[self.shard_rows(shard)].copy_(torch.cat(mine, dim=0))


class RowParallelLinear(Linear):
    """This rank's input columns; forward all-reduces the partial products and adds the bias once."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup, *, bias: bool = False) -> None:
        assert in_features % tp.size == 0, (in_features, tp.size)  # checked by the model spec
        super().__init__(in_features // tp.size, out_features, bias=bias)
        self.tp, self.full_in_features = tp, in_features

    def load_shard(self, param_name: str, tensor: torch.Tensor, shard: int, source: str) -> None:
        if param_name == "bias":
            _check_shape(tensor, (self.out_features,), source)
            self.bias.data.copy_(tensor)  # type: ignore[union-attr]
            return
        _check_shape(tensor, (self.out_features, self.full_in_features), source)
        cols = self.in_features
        self.weight.data.copy_(tensor[:, self.tp.rank * cols:(self.tp.rank + 1) * cols])

    def forward(self, x: torch.Tensor, lora: LoRABatch | None = None) -> torch.Tensor:
        assert lora is None, "LoRA adapters are refused under tensor parallelism (Engine.load_adapter)"
        y = F.linear(x, self.weight) if self.qweight is None else self.qweight.matmul(x)  # [T, out] partial
        self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias


@dataclass(frozen=True)
class VocabBlock:
    """Rank `rank`'s vocabulary rows: ids start..stop-1, stored in `rows` (>= stop - start, zero-padded)."""

    start: int
    stop: int
    rows: int

    @classmethod
    def of(cls, vocab_size: int, tp: TPGroup) -> VocabBlock:
        rows = -(-vocab_size // tp.size)  # ceil: every rank the same block size, so gathers are uniform
        start = min(tp.rank * rows, vocab_size)
        return cls(start, min(start + rows, vocab_size), rows)

    def load(self, target: torch.Tensor, tensor: torch.Tensor, vocab_size: int, source: str) -> None:
        """Copy this block's rows of a [vocab, hidden] checkpoint tensor; zero the padding."""
        _check_shape(tensor, (vocab_size, target.shape[1]), source)
        n = self.stop - self.start
        target.data[:n].copy_(tensor[self.start:self.stop])
        target.data[n:].zero_()


class VocabParallelEmbedding(nn.Module):
    """Embedding of this rank's vocabulary block; ids elsewhere give zeros, and the ranks' rows are summed."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup) -> None:
        super().__init__()
        self.tp, self.vocab_size = tp, vocab_size
        self.block = VocabBlock.of(vocab_size, tp)
        self.weight = nn.Parameter(torch.empty(self.block.rows, hidden_size), requires_grad=False)

    def load_weight(self, tensor: torch.Tensor, source: str) -> None:
        self.block.load(self.weight, tensor, self.vocab_size, source)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mine = (input_ids >= self.block.start) & (input_ids < self.block.stop)  # [T]
        local_ids = torch.where(mine, input_ids - self.block.start, 0)
        x = F.embedding(local_ids, self.weight).masked_fill_(~mine[:, None], 0.0)  # [T, hidden]
        return self.tp.all_reduce(x)


class ParallelLMHead(Linear):
    """This rank's vocabulary block of the LM head (untied models); `CausalLM.compute_logits` gathers."""

    def __init__(self, hidden_size: int, vocab_size: int, tp: TPGroup) -> None:
        block = VocabBlock.of(vocab_size, tp)
        super().__init__(hidden_size, block.rows)
        self.vocab_size, self.block = vocab_size, block

    def load_shard(self, param_name: str, tensor: torch.Tensor, shard: int, source: str) -> None:
        self.block.load(getattr(self, param_name), tensor, self.vocab_size, source)


def column_linear(in_features: int, part_sizes: list[int], tp: TPGroup, *, bias: bool = False,
                  fused_source: bool = False) -> Linear:
    """A projection whose output is `part_sizes` concatenated; column-parallel when tp.size > 1."""
    if tp.size == 1:
        return Linear(in_features, sum(part_sizes), bias=bias, shard_sizes=None if fused_source else part_sizes)
    return ColumnParallelLinear(in_features, part_sizes, tp, bias=bias, fused_source=fused_source)


def row_linear(in_features: int, out_features: int, tp: TPGroup, *, bias: bool = False) -> Linear:
    """A projection back to the residual stream; row-parallel (all-reduced) when tp.size > 1."""
    if tp.size == 1:
        return Linear(in_features, out_features, bias=bias)
    return RowParallelLinear(in_features, out_features, tp, bias=bias)


def vocab_embedding(vocab_size: int, hidden_size: int, tp: TPGroup) -> nn.Embedding | VocabParallelEmbedding:
    if tp.size == 1:
        embedding = nn.Embedding(vocab_size, hidden_size)
        embedding.weight.requires_grad_(False)
        return embedding
    return VocabParallelEmbedding(vocab_size, hidden_size, tp)


def lm_head(hidden_size: int, vocab_size: int, tp: TPGroup) -> Linear:
    return Linear(hidden_size, vocab_size) if tp.size == 1 else ParallelLMHead(hidden_size, vocab_size, tp)
