"""CUDA-graph capture and replay of decode batches (`use_cuda_graphs = true`).

A small model's decode step is a few hundred tiny kernels; launching them one
by one from Python costs more than running them. A pure-decode batch (one
causal query per request, no adapter) of B requests runs instead as the replay
of a graph captured for the smallest bucket >= B:

- static input buffers (tokens, positions, KV write slots) are filled, padding
  rows write their K/V into a scratch page that no request owns;
- the attention backend re-plans the bucket's fixed-size state for the real
  page tables (FlashInfer's graph-mode decode wrappers), then the graph replays;
- sampling and probes stay eager: they depend on per-row parameters.

Captured largest bucket first, sharing one memory pool. The eager path stays
the reference (tests compare the two at temperature 0).
"""

from __future__ import annotations

import numpy as np
import torch

from pie.engine.attention.base import AttentionBackend, BatchLayout
from pie.engine.batch_prep import PreparedBatch
from pie.engine.forward_context import ForwardContext
from pie.engine.kv_cache import KVCache
from pie.engine.models.decoder import CausalLM


def graph_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to the limit (the last bucket is the limit itself)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size] + list(range(16, max_batch_size, 16))
    return [*sizes, max_batch_size]


class GraphRunner:
    def __init__(self, model: CausalLM, backend: AttentionBackend, kv: KVCache, scratch_page: int,
                 max_batch_size: int, max_pages_per_batch: int) -> None:
        self.model, self.backend, self.kv = model, backend, kv
        self.scratch_page = scratch_page
        self.buckets = graph_buckets(max_batch_size)
        dev = kv.layers[0].device
        n = self.buckets[-1]
        # Static inputs, shared by every bucket (a bucket reads the first bs rows).
        self._tokens = torch.zeros(n, dtype=torch.long, device=dev)
        self._positions = torch.zeros(n, dtype=torch.long, device=dev)
        self._w_page = torch.full((n,), scratch_page, dtype=torch.long, device=dev)
        self._w_off = torch.zeros(n, dtype=torch.long, device=dev)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        # Page-table capacity of the fixed buffers; a batch naming more page entries (possible with
        # shared prefixes) runs eagerly.
        self.max_page_entries = max_pages_per_batch + n
        backend.init_graph_buckets(self.buckets, self.max_page_entries)
        self._capture()

    def _forward(self, bs: int) -> torch.Tensor:
        fwd = ForwardContext(self.backend, self.kv, self._positions[:bs], self._w_page[:bs], self._w_off[:bs])
        return self.model(self._tokens[:bs], fwd)

    def _padding_layout(self, bs: int) -> BatchLayout:
        """bs requests that each own only the scratch page, one token in it."""
        ones = np.ones(bs, np.int32)
        return BatchLayout(np.arange(bs + 1, dtype=np.int32), np.arange(bs + 1, dtype=np.int32),
                           np.full(bs, self.scratch_page, np.int32), ones, ones, [None] * bs)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for bs in reversed(self.buckets):
            self.backend.plan_graph(bs, self._padding_layout(bs))
            self._forward(bs)  # warm-up outside capture: lazy library handles, allocator growth
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[bs] = self._forward(bs)
            pool = graph.pool()
            self._graphs[bs] = graph
        torch.cuda.synchronize()

    def bucket_for(self, prep: PreparedBatch, has_adapters: bool) -> int | None:
        """The bucket that can replay this batch, or None to run it eagerly."""
        b = prep.layout.num_requests
        if has_adapters or not prep.layout.is_pure_decode or b > self.buckets[-1]:
            return None
        if len(prep.layout.kv_page_indices) + self.buckets[-1] > self.max_page_entries:
            return None
        return next(bs for bs in self.buckets if bs >= b)

    @torch.inference_mode()
    def run(self, prep: PreparedBatch, bs: int, packed: torch.Tensor) -> torch.Tensor:
        """packed: [4, B] (tokens, positions, write page, write offset) on the device -> hidden [B, d]."""
        b = packed.shape[1]
        self._tokens[:b].copy_(packed[0])
        self._positions[:b].copy_(packed[1])
        self._w_page[:b].copy_(packed[2])
        self._w_off[:b].copy_(packed[3])
        if b < bs:  # padding rows: token 0 at position 0, written into the scratch page
            self._tokens[b:bs].zero_()
            self._positions[b:bs].zero_()
            self._w_page[b:bs].fill_(self.scratch_page)
            self._w_off[b:bs].zero_()
        self.backend.plan_graph(bs, _pad_layout(prep.layout, bs, self.scratch_page))
        self._graphs[bs].replay()
        return self._outputs[bs][:b]


def _pad_layout(layout: BatchLayout, bs: int, scratch_page: int) -> BatchLayout:
    pad = bs - layout.num_requests
    if pad == 0:
        return layout
    last_indptr = layout.kv_page_indptr[-1]
    return BatchLayout(
        qo_indptr=np.arange(bs + 1, dtype=np.int32),
        kv_page_indptr=np.concatenate([layout.kv_page_indptr,
                                       last_indptr + np.arange(1, pad + 1, dtype=np.int32)]).astype(np.int32),
        kv_page_indices=np.concatenate([layout.kv_page_indices, np.full(pad, scratch_page, np.int32)]),
        kv_last_page_len=np.concatenate([layout.kv_last_page_len, np.ones(pad, np.int32)]),
        kv_lens=np.concatenate([layout.kv_lens, np.ones(pad, np.int32)]),
        custom_masks=[*layout.custom_masks, *([None] * pad)],
    )
