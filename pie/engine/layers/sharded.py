"""Tensor-parallel layers: each rank holds a slice of a weight and the collectives restore the whole.

- `ColumnParallelLinear`: output rows sharded. A fused projection (q/k/v ->
  qkv_proj, gate/up -> gate_up_proj) is split *per source part*: rank r holds
  q[r], k[r], v[r] back to back, so its query heads and the kv heads they
  attend with (grouped-query attention) stay on the same rank, and its local
  gate and up halves still line up for `chunk(2)`. No collective: the next
  layer consumes the local slice. With tp > num_kv_heads each kv head is
  replicated on tp / num_kv_heads ranks (the ones whose query heads use it).
- `RowParallelLinear`: input columns sharded; each rank's partial product is
  all-reduced, then the bias (loaded whole on every rank) is added once.
- `ShardedRMSNorm`: a norm over a vector split over the ranks (OLMo 3's q/k
  norm over all heads): each rank's sum of squares is all-reduced first.
- `VocabParallelEmbedding` / `ParallelLMHead`: vocabulary rows sharded in
  ceil(vocab / size) blocks (the last block zero-padded). The embedding masks
  ids outside its block and all-reduces (exact: the other ranks add zeros);
  the LM head's partial logits are all-gathered by `CausalLM.compute_logits`.

The factories (`column_linear`, `row_linear`, `vocab_embedding`, `lm_head`)
return the plain layer at size 1, so the single-device model is exactly the
unsharded one. Quantisation still happens in `Linear.finalize`, on the slice.
Every sharded layer is `LoadsSlices`: the loader hands it the unread checkpoint
tensor, it checks the full shape and reads only its rank's block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pie.engine.layers.linear import Linear, dense_linear
from pie.engine.layers.norm import RMSNorm
from pie.engine.parallel import TPGroup
from pie.engine.tensor_source import LoadsSlices, MemoryTensor, TensorSource

if TYPE_CHECKING:
    from pie.engine.layers.lora import LoRABatch


def rank_block(total: int, tp: TPGroup, replicas: int = 1) -> slice:
    """Rank `tp.rank`'s contiguous block of `total` items, split in tp.size / replicas blocks.

    replicas > 1 when fewer blocks than ranks exist (kv heads with tp > num_kv_heads): ranks r with the
    same r // replicas hold the same block. Divisibility is checked by the model spec.
    """
    n = total * replicas // tp.size
    i = tp.rank // replicas
    return slice(i * n, (i + 1) * n)


class ColumnParallelLinear(Linear, LoadsSlices):
    """This rank's output rows of a (possibly fused) projection.

    `part_sizes` are the logical parts in output order (q, k, v or gate, up); each is split by rank.
    With `fused_source` all parts come from one checkpoint tensor (Phi-3), else one tensor per part.
    `replicas[i]` ranks share each block of part i (k and v when tp > num_kv_heads); 1 by default.
    """

    def __init__(self, in_features: int, part_sizes: list[int], tp: TPGroup, *, bias: bool = False,
                 fused_source: bool = False, replicas: list[int] | None = None) -> None:
        reps = replicas or [1] * len(part_sizes)
        assert all(p * r % tp.size == 0 for p, r in zip(part_sizes, reps, strict=True)), (part_sizes, tp.size)
        self.tp, self.part_replicas = tp, dict(enumerate(reps))
        indexed = list(enumerate(part_sizes))
        self.source_parts = [indexed] if fused_source else [[part] for part in indexed]  # (part index, size)
        local = [sum(p * reps[i] // tp.size for i, p in parts) for parts in self.source_parts]
        super().__init__(in_features, sum(local), bias=bias, shard_sizes=local)

    def load_slice(self, param_name: str, source: TensorSource, shard: int | None) -> None:
        assert shard is not None, "the loader gives every Linear tensor a shard index"
        target = getattr(self, param_name)
        parts = self.source_parts[shard]
        source.check_shape((sum(p for _, p in parts), *target.shape[1:]))
        row = self.shard_rows(shard).start
        offset = 0
        for i, part in parts:  # rank r's rows of each part sit back to back in this shard
            block = rank_block(part, self.tp, self.part_replicas[i])
            target.data[row:row + block.stop - block.start].copy_(
                source.read(slice(offset + block.start, offset + block.stop)))
            row, offset = row + block.stop - block.start, offset + part

    def load_shard(self, param_name: str, tensor: torch.Tensor, shard: int, source: str) -> None:
        self.load_slice(param_name, MemoryTensor(tensor, source), shard)


class RowParallelLinear(Linear, LoadsSlices):
    """This rank's input columns; forward all-reduces the partial products and adds the bias once."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup, *, bias: bool = False) -> None:
        assert in_features % tp.size == 0, (in_features, tp.size)  # checked by the model spec
        super().__init__(in_features // tp.size, out_features, bias=bias)
        self.tp, self.full_in_features = tp, in_features

    def load_slice(self, param_name: str, source: TensorSource, shard: int | None) -> None:
        if param_name == "bias":  # replicated: added once, after the all-reduce
            source.check_shape((self.out_features,))
            self.bias.data.copy_(source.full())  # type: ignore[union-attr]
            return
        source.check_shape((self.out_features, self.full_in_features))
        self.weight.data.copy_(source.read(slice(None), rank_block(self.full_in_features, self.tp)))

    def load_shard(self, param_name: str, tensor: torch.Tensor, shard: int, source: str) -> None:
        self.load_slice(param_name, MemoryTensor(tensor, source), shard)

    def forward(self, x: torch.Tensor, lora: LoRABatch | None = None) -> torch.Tensor:
        assert lora is None, "LoRA adapters are refused under tensor parallelism (Engine.load_adapter)"
        y = dense_linear(x, self.weight) if self.qweight is None else self.qweight.matmul(x)  # [T, out] partial
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

    def load(self, target: torch.Tensor, source: TensorSource, vocab_size: int) -> None:
        """Read this block's rows of a [vocab, hidden] checkpoint tensor; zero the padding."""
        source.check_shape((vocab_size, target.shape[1]))
        n = self.stop - self.start
        if n:
            target.data[:n].copy_(source.read(slice(self.start, self.stop)))
        target.data[n:].zero_()


class VocabParallelEmbedding(nn.Module, LoadsSlices):
    """Embedding of this rank's vocabulary block; ids elsewhere give zeros, and the ranks' rows are summed."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup) -> None:
        super().__init__()
        self.tp, self.vocab_size = tp, vocab_size
        self.block = VocabBlock.of(vocab_size, tp)
        self.weight = nn.Parameter(torch.empty(self.block.rows, hidden_size), requires_grad=False)

    def load_slice(self, param_name: str, source: TensorSource, shard: int | None) -> None:
        self.block.load(self.weight, source, self.vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mine = (input_ids >= self.block.start) & (input_ids < self.block.stop)  # [T]
        local_ids = torch.where(mine, input_ids - self.block.start, 0)
        x = F.embedding(local_ids, self.weight).masked_fill_(~mine[:, None], 0.0)  # [T, hidden]
        return self.tp.all_reduce(x)


class ParallelLMHead(Linear, LoadsSlices):
    """This rank's vocabulary block of the LM head (untied models); `CausalLM.compute_logits` gathers."""

    def __init__(self, hidden_size: int, vocab_size: int, tp: TPGroup) -> None:
        block = VocabBlock.of(vocab_size, tp)
        super().__init__(hidden_size, block.rows)
        self.vocab_size, self.block = vocab_size, block

    def load_slice(self, param_name: str, source: TensorSource, shard: int | None) -> None:
        self.block.load(getattr(self, param_name), source, self.vocab_size)

    def load_shard(self, param_name: str, tensor: torch.Tensor, shard: int, source: str) -> None:
        self.load_slice(param_name, MemoryTensor(tensor, source), shard)


class ShardedRMSNorm(RMSNorm, LoadsSlices):
    """RMSNorm over a vector split over the ranks (OLMo 3's q/k norm spans all heads): this rank's block of
    the weight. The mean square needs every rank's sum of squares; `sharded_rms_norms` all-reduces them."""

    def __init__(self, full_dim: int, eps: float, tp: TPGroup, *, offset: float = 0.0,
                 cast_before_weight: bool = True, replicas: int = 1) -> None:
        super().__init__(full_dim * replicas // tp.size, eps, offset=offset, cast_before_weight=cast_before_weight)
        self.full_dim, self.tp, self.replicas = full_dim, tp, replicas

    def load_slice(self, param_name: str, source: TensorSource, shard: int | None) -> None:
        source.check_shape((self.full_dim,))
        self.weight.data.copy_(source.read(rank_block(self.full_dim, self.tp, self.replicas)))

    def normalize(self, x: torch.Tensor, sum_sq: torch.Tensor) -> torch.Tensor:
        """x: [T, local] this rank's block; sum_sq: [T, 1] float32, the sum of squares over all ranks.

        A block held by `replicas` ranks is in that sum `replicas` times.
        """
        x32 = x.float() * torch.rsqrt(sum_sq / (self.full_dim * self.replicas) + self.eps)
        # The weight step of RMSNorm.forward, unchanged.
        if self.cast_before_weight:
            w = self.weight if self.offset == 0.0 else self.weight + self.offset
            return w * x32.to(x.dtype)
        return (x32 * (self.offset + self.weight.float())).to(x.dtype)


def sharded_rms_norms(pairs: list[tuple[ShardedRMSNorm, torch.Tensor]], tp: TPGroup) -> list[torch.Tensor]:
    """Normalise each (norm, x) over its full vector with one all-reduce for all of them (q and k together)."""
    sum_sq = torch.cat([x.float().pow(2).sum(-1, keepdim=True) for _, x in pairs], dim=-1)  # [T, len(pairs)]
    tp.all_reduce(sum_sq)
    return [norm.normalize(x, sum_sq[:, i:i + 1]) for i, (norm, x) in enumerate(pairs)]


def column_linear(in_features: int, part_sizes: list[int], tp: TPGroup, *, bias: bool = False,
                  fused_source: bool = False, replicas: list[int] | None = None) -> Linear:
    """A projection whose output is `part_sizes` concatenated; column-parallel when tp.size > 1."""
    if tp.size == 1:
        return Linear(in_features, sum(part_sizes), bias=bias, shard_sizes=None if fused_source else part_sizes)
    return ColumnParallelLinear(in_features, part_sizes, tp, bias=bias, fused_source=fused_source,
                                replicas=replicas)


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
