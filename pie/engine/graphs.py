"""CUDA-graph capture and replay of whole decode steps (`use_cuda_graphs = true`).

A small model's decode step is a few hundred tiny kernels; launching them one
by one from Python costs more than running them. A pure-decode batch (one
causal query per request, no adapter, positions below the cached RoPE table's
end) of B requests runs instead as replays of graphs captured for the
smallest bucket >= B:

- the forward graph of the bucket: embedding, every layer (RoPE gathered from
  the cached cos/sin table, K/V appended by FlashInfer, FlashInfer's
  graph-mode decode attention, fused residual-add + RMSNorm) and the final
  norm. Static inputs (tokens, positions, KV write slots) are filled first;
  padding rows write their K/V into a scratch page that no request owns, and
  the attention backend re-plans the bucket's fixed-size state for the real
  page tables (the page indices come from the step's one upload).
- a sampling graph of the bucket: the LM head, the logit masks, and
  `sampling.sample_tokens` for the step's sampler mix, when every request has
  exactly one output, a sampler drawing one token without penalties or logit
  bias (every plain decode loop). The graph is specialised by the mix's
  host-known flags (`SamplerVariant`: greedy only, or random with top-k up
  to a static width, top-p, min-p, masks), exactly the flags the eager
  sampler branches on, so it runs the same computation and gives the same
  tokens. Per-row parameters are copied into static buffers
  (`StepSampler.fill`); padding rows are greedy. The greedy variant is
  captured for every bucket up front, other variants on first use (at most
  `MAX_SAMPLER_GRAPHS`; past that the step samples eagerly).
- any other decode step (probes, several outputs, penalties) replays the
  forward graph and computes its outputs eagerly.

Captured largest bucket first, sharing one memory pool: every tensor a later
graph reads (static inputs, each graph's outputs) stays alive, so no capture
can reuse it. The eager path stays the reference (gpu tests compare the two
at temperature 0, and the sampler on equal logits for every mix).

`GraphRunner(..., capture=False)` runs every "graph" eagerly on its static
buffers instead (`EagerReplay`), with the backend's ordinary `plan`: the
same bucketing, padding, scratch-page writes and sampler dispatch on any
device, which is how the CPU tests check them against the plain engine.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pie.engine import sampling
from pie.engine.attention.base import AttentionBackend, BatchLayout
from pie.engine.batch_prep import PreparedBatch
from pie.engine.cuda_ops import KVAppend, flashinfer_available
from pie.engine.forward_context import ForwardContext
from pie.engine.kv_cache import KVCache
from pie.engine.layers.rotary import CACHED_POSITIONS
from pie.engine.models.decoder import CausalLM
from pie.engine.outputs import OutputPlan
from pie.engine.packing import ResultPacker, Sections

# Sampling graphs captured on first use, across all buckets; a workload that keeps changing its sampler
# mix past this samples eagerly (still correct, only slower) instead of capturing without end.
MAX_SAMPLER_GRAPHS = 64
_MASK32 = 0xFFFFFFFF


def graph_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to the limit (the last bucket is the limit itself)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size] + list(range(16, max_batch_size, 16))
    return [*sizes, max_batch_size]


def smallest_bucket(n: int, buckets: list[int]) -> int | None:
    """The smallest bucket holding n rows (buckets ascending); None when n is over the largest."""
    return next((b for b in buckets if b >= n), None)


@dataclass(frozen=True)
class SamplerVariant:
    """The host-known shape of a step's sampler mix that a sampling graph is specialised for.

    random: some row samples (temperature > 0); False: every row is argmax and the filters do not run.
    top_k: the static top-k width (>= every row's top_k; 0: no row uses top-k).
    """

    random: bool
    top_k: int
    top_p: bool
    min_p: bool
    masked: bool


def top_k_width(max_top_k: int, vocab: int) -> int:
    """The static top-k width for a largest top_k: a power of two from 16 (few variants), at most vocab.
    `sample_tokens` keeps the values above each row's own k-th largest, so any width >= max_top_k gives
    the same tokens."""
    if max_top_k <= 0:
        return 0
    return min(vocab, max(16, 1 << (max_top_k - 1).bit_length()))


def sampler_variant(plan: OutputPlan, num_requests: int, vocab: int) -> SamplerVariant | None:
    """The variant a step's outputs fit, or None when they are not one plain sampler per request (probes,
    several outputs or draws, penalties, logit bias: those steps sample eagerly)."""
    n = num_requests
    k = plan.num_steps  # decode step rows: one one-draw sampler each, kept out of kinds/draws/num_outputs
    if (len(plan.kinds) + k != n or len(plan.draws) + k != n or sum(plan.draws) + k != n or plan.num_logit_rows != n
            or plan.has_penalties or plan.has_bias or any(c != 1 for c in plan.num_outputs)):
        return None
    max_top_k, any_top_p, any_min_p, _, any_random = plan.sampler_flags
    masked = plan.num_masks > 0
    if not any_random:  # the eager sampler returns the argmax before any filter
        return SamplerVariant(False, 0, False, False, masked)
    return SamplerVariant(True, top_k_width(max_top_k, vocab), any_top_p, any_min_p, masked)


class StepSampler:
    """Static per-row sampler inputs for up to `rows` rows, and the sampling a graph captures.

    Device-agnostic: the CPU tests run `fill` + `sample` eagerly and compare with the eager sampler."""

    def __init__(self, rows: int, vocab: int, device: torch.device) -> None:
        self.vocab = vocab
        self.num_words = -(-vocab // 32)
        self.temperature = torch.zeros(rows, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(rows, dtype=torch.long, device=device)
        self.top_p = torch.ones(rows, dtype=torch.float32, device=device)
        self.min_p = torch.zeros(rows, dtype=torch.float32, device=device)
        self.seeds = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.mask_words = torch.full((rows, self.num_words), -1, dtype=torch.int32, device=device)  # all allowed
        self.draw_row = torch.arange(rows, dtype=torch.long, device=device)
        self.draw_index = torch.zeros(rows, dtype=torch.long, device=device)

    def fill(self, plan: OutputPlan, inp: Sections, num_rows: int, bucket: int) -> None:
        """The step's sampler parameters into rows [0, num_rows), greedy padding in [num_rows, bucket).
        Device-to-device copies only (no host sync)."""
        b = num_rows
        self.temperature[:b].copy_(inp.floats("s_temperature"))
        self.top_k[:b].copy_(inp.ints("s_top_k"))
        self.top_p[:b].copy_(inp.floats("s_top_p"))
        self.min_p[:b].copy_(inp.floats("s_min_p"))
        self.seeds[:b].copy_((inp.longs("s_seed_hi") << 32) | (inp.longs("s_seed_lo") & _MASK32))
        self.positions[:b].copy_(inp.ints("s_position"))
        if b < bucket:
            for t, value in ((self.temperature, 0.0), (self.top_k, 0), (self.top_p, 1.0), (self.min_p, 0.0),
                             (self.seeds, 0), (self.positions, 0)):
                t[b:bucket].fill_(value)
        if plan.num_masks:
            words = inp.ints("mask_words").view(plan.num_masks, self.num_words)
            every = torch.full((1, self.num_words), -1, dtype=torch.int32, device=words.device)
            self.mask_words[:b].copy_(torch.cat([every, words])[inp.longs("s_mask") + 1])
            self.mask_words[b:bucket].fill_(-1)

    def sample(self, logits: torch.Tensor, variant: SamplerVariant) -> torch.Tensor:
        """logits: [rows, vocab] float32 for the first `rows` static rows -> [rows] int32 tokens."""
        rows = logits.shape[0]
        allowed = sampling.unpack_bits(self.mask_words[:rows], self.vocab) if variant.masked else None
        params = sampling.SamplerInputs(
            temperature=self.temperature[:rows], top_k=self.top_k[:rows], top_p=self.top_p[:rows],
            min_p=self.min_p[:rows], seeds=self.seeds[:rows], positions=self.positions[:rows],
            draw_row=self.draw_row[:rows], draw_index=self.draw_index[:rows], max_top_k=variant.top_k,
            any_top_p=variant.top_p, any_min_p=variant.min_p,
            # Greedy rows (and the padding) take the argmax; computing it for an all-random mix changes no
            # real row's token and saves a variant.
            any_greedy=True, any_random=variant.random)
        return sampling.sample_tokens(logits, params, allowed).to(torch.int32)


class EagerReplay:
    """What stands in for a captured graph with `capture=False`: replaying runs the body again and copies its
    result into the tensor the first run returned (the output a graph would rewrite in place)."""

    def __init__(self, body: Callable[[], torch.Tensor]) -> None:
        self.body = body
        self.out = body()

    def replay(self) -> None:
        self.out.copy_(self.body())


class GraphRunner:
    def __init__(self, model: CausalLM, backend: AttentionBackend, kv: KVCache, scratch_page: int,
                 max_batch_size: int, max_pages_per_batch: int, capture: bool = True) -> None:
        self.model, self.backend, self.kv = model, backend, kv
        self.capture = capture
        self.scratch_page = scratch_page
        self.buckets = graph_buckets(max_batch_size)
        dev = self.device = kv.layers[0].device
        n = self.buckets[-1]
        # Static inputs, shared by every bucket (a bucket reads the first bs rows).
        self._tokens = torch.zeros(n, dtype=torch.long, device=dev)
        self._positions = torch.zeros(n, dtype=torch.long, device=dev)
        self._w_page = torch.full((n,), scratch_page, dtype=torch.long, device=dev)
        self._w_off = torch.zeros(n, dtype=torch.long, device=dev)
        self.sampler = StepSampler(n, model.spec.vocab_size, dev)
        self._graphs: dict[int, _Graph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._sampler_graphs: dict[tuple[int, SamplerVariant], tuple[_Graph, torch.Tensor]] = {}
        self._pool: Any = None  # the graphs' shared memory pool, from the first capture
        self.replays = {"forward": 0, "sampler": 0}  # steps run through each kind of graph (tests, benchmarks)
        # FlashInfer appends K/V when importable (one kernel per layer); else the index writes are captured.
        self._kv_append = flashinfer_available()
        # Page-table capacity of the fixed buffers; a batch naming more page entries (possible with
        # shared prefixes) runs eagerly.
        self.max_page_entries = max_pages_per_batch + n
        if capture:
            backend.init_graph_buckets(self.buckets, self.max_page_entries)
        self._capture()

    def _plan(self, bs: int, layout: BatchLayout) -> None:
        if self.capture:
            self.backend.plan_graph(bs, layout)
        else:
            self.backend.plan(layout)

    def _on_device(self) -> contextlib.AbstractContextManager[object]:
        """The engine's device as the current CUDA device while capturing or replaying."""
        return torch.cuda.device(self.device) if self.capture else contextlib.nullcontext()

    def _forward(self, bs: int) -> torch.Tensor:
        w_page, w_off = self._w_page[:bs], self._w_off[:bs]
        # max_position 0: RoPE from the cached table (bucket_for sends only batches below its end here).
        fwd = ForwardContext(self.backend, self.kv, self._positions[:bs], w_page, w_off, max_position=0,
                             kv_append=KVAppend(w_page, w_off) if self._kv_append else None)
        return self.model(self._tokens[:bs], fwd)

    def _padding_layout(self, bs: int) -> BatchLayout:
        """bs requests that each own only the scratch page, one token in it."""
        ones = np.ones(bs, np.int32)
        return BatchLayout(np.arange(bs + 1, dtype=np.int32), np.arange(bs + 1, dtype=np.int32),
                           np.full(bs, self.scratch_page, np.int32), ones, ones, [None] * bs)

    def _capture_one(self, body: Callable[[], torch.Tensor]) -> tuple[_Graph, torch.Tensor]:
        """Run `body` once eagerly (lazy library state, allocator growth), then capture it into the pool.

        On the engine's device (the thread's current device may be another), and thread-local: engines of
        other data-parallel groups keep running on their threads while this one captures."""
        if not self.capture:
            eager = EagerReplay(body)
            return eager, eager.out
        with torch.cuda.device(self.device):
            body()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                out = body()
        self._pool = graph.pool()
        return graph, out

    @torch.inference_mode()
    def _capture(self) -> None:
        greedy = SamplerVariant(False, 0, False, False, False)
        for bs in reversed(self.buckets):
            self._plan(bs, self._padding_layout(bs))
            self._graphs[bs], self._outputs[bs] = self._capture_one(functools.partial(self._forward, bs))
            self._sampler_graphs[bs, greedy] = self._capture_sampler(bs, greedy)
        if self.capture:
            torch.cuda.synchronize()

    def _capture_sampler(self, bs: int, variant: SamplerVariant) -> tuple[_Graph, torch.Tensor]:
        hidden = self._outputs[bs]

        def body() -> torch.Tensor:
            return self.sampler.sample(self.model.compute_logits(hidden), variant)

        return self._capture_one(body)

    def bucket_for(self, prep: PreparedBatch, has_adapters: bool) -> int | None:
        """The bucket that can replay this batch, or None to run it eagerly."""
        b = prep.layout.num_requests
        if has_adapters or not prep.layout.is_pure_decode or b > self.buckets[-1]:
            return None
        if len(prep.layout.kv_page_indices) + self.buckets[-1] > self.max_page_entries:
            return None
        if int(prep.positions.max()) >= CACHED_POSITIONS:  # past the RoPE table the graphs gather from
            return None
        return smallest_bucket(b, self.buckets)

    def padded_layout(self, layout: BatchLayout, bs: int) -> BatchLayout:
        """The batch's layout with padding requests up to the bucket (each on the scratch page)."""
        return pad_layout(layout, bs, self.scratch_page)

    @torch.inference_mode()
    def run(self, layout: BatchLayout, bs: int, packed: torch.Tensor) -> torch.Tensor:
        """layout: padded to bs (`padded_layout`); packed: [4, B] (tokens, positions, write page, write
        offset) on the device -> hidden [B, d]."""
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
        self._plan(bs, layout)
        with self._on_device():
            self._graphs[bs].replay()
        self.replays["forward"] += 1
        return self._outputs[bs][:b]

    @torch.inference_mode()
    def sample(self, plan: OutputPlan, bs: int, inp: Sections) -> ResultPacker | None:
        """After `run`: the step's sampled tokens from the bucket's sampling graph, packed for the download;
        None when the outputs need the eager path."""
        b = len(plan.num_outputs) + plan.num_steps
        variant = sampler_variant(plan, b, self.sampler.vocab)
        if variant is None:
            return None
        self.sampler.fill(plan, inp, b, bs)
        entry = self._sampler_graphs.get((bs, variant))
        if entry is None:
            if len(self._sampler_graphs) >= MAX_SAMPLER_GRAPHS + len(self.buckets):
                return None
            entry = self._sampler_graphs[bs, variant] = self._capture_sampler(bs, variant)
        graph, tokens = entry
        with self._on_device():
            graph.replay()
        self.replays["sampler"] += 1
        out = ResultPacker()
        out.add("tokens", tokens[:b])
        return out


_Graph = torch.cuda.CUDAGraph | EagerReplay


def pad_layout(layout: BatchLayout, bs: int, scratch_page: int) -> BatchLayout:
    """`layout` with bs - B padding requests appended, each owning only `scratch_page` with one token."""
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
