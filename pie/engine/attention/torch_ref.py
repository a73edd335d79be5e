"""Pure-PyTorch paged attention: gathers each request's pages and attends densely.

Runs anywhere torch does (CPU, MPS, CUDA) and is the reference the fast
backends are tested against, and the CPU path. Causal requests are batched:
decode rows (one query) and prefills apart, each sorted by kv length and cut
into a few groups of similar length, each group one padded gather + one
attention call per layer (one group padded to the longest sequence gathers
and attends up to twice the kv a mixed-length batch holds; a call per prefill
costs eight small kernels per request per layer). Requests with custom masks
are attended one by one (with a second mask for the sliding-window layers
where `BatchLayout.window_masks` gives one).

On the CPU, decode rows of causal requests skip the gathers: `cpu_paged`'s kernel reads their pages in
place, on every layer without soft-cap or sinks (`paged=False`, or no C++ compiler, keeps the gathers:
the reference the kernel is tested against).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pie.engine.attention.base import AttentionBackend, AttentionLayerSpec, AttentionShape, BatchLayout
from pie.engine.attention.cpu_paged import DTYPES, DecodePlan, PagedDecodeKernel, load_kernel


@dataclass
class _Group:
    """Query rows attending over whole gathered pages (padded to the group's longest page list)."""

    rows: torch.Tensor | slice  # query rows of this group in the batch
    pages: torch.Tensor  # [n * max_pages] page ids, row-major; padding repeats a valid page
    num_seqs: int
    kv_slots: int  # max_pages * page_size: gathered kv length per sequence (incl. padding)
    q_slot: np.ndarray  # [n, q_len] kv slot of each query row (for windows)
    kv_valid: np.ndarray  # [n, q_len, kv_slots] bool: causal / custom mask, and padding masked out
    masks: dict[int, torch.Tensor]  # window_left -> [n, 1, q_len, kv_slots] bool on device
    kv_valid_windowed: np.ndarray | None = None  # as kv_valid, for sliding-window layers where they differ
    keep: torch.Tensor | None = None  # padded groups: which of the n * q_len rows are real (None: all)
    out_rows: torch.Tensor | None = None  # their batch rows


class TorchRefBackend(AttentionBackend):
    name = "torch_ref"

    def __init__(self, shape: AttentionShape, layer_specs: list[AttentionLayerSpec], paged: bool = True) -> None:
        super().__init__(shape, layer_specs)
        # The CPU kernel, where asked for, on a CPU device, for its dtypes, and buildable here.
        use = paged and shape.device.type == "cpu" and shape.dtype in DTYPES
        self._kernel: PagedDecodeKernel | None = load_kernel() if use else None
        # Layers the kernel serves; the others (soft-cap, sinks) gather even on decode rows.
        self._paged_layers = [self._kernel is not None and s.softcap == 0.0 and not s.sinks for s in layer_specs]
        self._decode: DecodePlan | None = None

    @property
    def paged(self) -> bool:
        """Decode rows go through the CPU paged kernel (on the layers without soft-cap or sinks)."""
        return self._kernel is not None

    def plan(self, layout: BatchLayout) -> None:
        self._groups: list[_Group] = []
        self._decode_groups: list[_Group] = []  # decode rows' gathers, where the kernel does not serve them
        q_lens = np.diff(layout.qo_indptr)
        plain = np.ones(len(q_lens), bool)
        if layout.has_custom_mask:
            plain = np.array([not layout.is_masked(r) for r in range(layout.num_requests)])
        pages = np.diff(layout.kv_page_indptr)
        decode, multi = np.flatnonzero(plain & (q_lens == 1)), np.flatnonzero(plain & (q_lens > 1))
        self._decode = None
        if self._kernel is not None and decode.size:
            self._decode = DecodePlan.build(layout.qo_indptr, layout.kv_page_indptr, layout.kv_page_indices,
                                            layout.kv_lens, decode, self.shape.page_size)
        if self._decode is None or not all(self._paged_layers):
            for reqs in _length_groups(pages[decode], q_lens[decode], decode, MIN_GROUP):
                self._decode_groups.append(self._padded_group(layout, reqs))
        for reqs in _length_groups(pages[multi], q_lens[multi], multi, 1):
            self._groups.append(self._padded_group(layout, reqs))
        for r in np.flatnonzero(~plain).tolist():
            self._groups.append(self._request_group(layout, r))

    def _pages(self, layout: BatchLayout, r: int) -> np.ndarray:
        return layout.kv_page_indices[layout.kv_page_indptr[r]: layout.kv_page_indptr[r + 1]]

    def _padded_group(self, layout: BatchLayout, reqs: np.ndarray) -> _Group:
        """Causal requests attended as one [n, heads, q_max, kv_slots] call: queries and pages padded."""
        first = layout.kv_page_indptr[reqs].astype(np.int64)
        counts = layout.kv_page_indptr[reqs + 1] - first
        max_pages = int(counts.max())
        # [n, max_pages] page table in one gather; short lists repeat their last page (gathered, masked out).
        pages = layout.kv_page_indices[first[:, None] + np.minimum(np.arange(max_pages)[None, :], counts[:, None] - 1)]
        kv_lens = layout.kv_lens[reqs].astype(np.int64)
        starts = layout.qo_indptr[reqs].astype(np.int64)
        q_lens = layout.qo_indptr[reqs + 1] - starts
        q_max = int(q_lens.max())
        # Short requests repeat their last query row (a valid row, so no all-masked softmax); its output is dropped.
        j = np.minimum(np.arange(q_max)[None, :], q_lens[:, None] - 1)  # [n, q_max]
        q_slot = (kv_lens - q_lens)[:, None] + j
        valid = np.arange(max_pages * self.shape.page_size)[None, None, :] <= q_slot[:, :, None]  # causal, < kv_len
        dev = self.shape.device
        rows = torch.from_numpy((starts[:, None] + j).reshape(-1)).to(dev)
        group = self._group(rows, pages, q_slot, valid)
        real = (np.arange(q_max)[None, :] < q_lens[:, None]).reshape(-1)
        if not real.all():
            keep = torch.from_numpy(np.flatnonzero(real)).to(dev)
            group.keep, group.out_rows = keep, rows[keep]
        return group

    def _request_group(self, layout: BatchLayout, r: int) -> _Group:
        start, end = int(layout.qo_indptr[r]), int(layout.qo_indptr[r + 1])
        kv_len, q_len = int(layout.kv_lens[r]), end - start
        pages = self._pages(layout, r)
        kv_slots = len(pages) * self.shape.page_size
        q_slot = np.arange(kv_len - q_len, kv_len)

        def valid(mask: np.ndarray | None) -> np.ndarray:
            out = np.zeros((1, q_len, kv_slots), bool)
            out[0, :, :kv_len] = mask if mask is not None else np.arange(kv_len)[None, :] <= q_slot[:, None]
            return out

        windowed = valid(layout.window_masks[r]) if r in layout.window_masks else None
        return self._group(slice(start, end), pages[None], q_slot[None], valid(layout.custom_masks[r]), windowed)

    def _group(self, rows: torch.Tensor | slice, pages: np.ndarray, q_slot: np.ndarray,
               valid: np.ndarray, valid_windowed: np.ndarray | None = None) -> _Group:
        dev = self.shape.device
        group = _Group(rows, torch.from_numpy(pages.reshape(-1).astype(np.int64)).to(dev), pages.shape[0],
                       pages.shape[1] * self.shape.page_size, q_slot, valid, {}, valid_windowed)
        for spec in self.layer_specs:
            if spec.window_left not in group.masks:
                group.masks[spec.window_left] = self._mask(group, spec.window_left)
        return group

    @staticmethod
    def _window(group: _Group, window_left: int) -> np.ndarray:
        if window_left < 0:
            return group.kv_valid
        valid = group.kv_valid if group.kv_valid_windowed is None else group.kv_valid_windowed
        kv = np.arange(valid.shape[-1])
        return valid & (kv[None, None, :] >= group.q_slot[:, :, None] - window_left)

    def _mask(self, group: _Group, window_left: int) -> torch.Tensor:
        mask = np.ascontiguousarray(self._window(group, window_left))
        return torch.from_numpy(mask).to(self.shape.device)[:, None]  # [n, 1, q_len, kv_len]

    def run(self, layer_idx: int, q: torch.Tensor, kv_layer: torch.Tensor,
            sinks: torch.Tensor | None = None) -> torch.Tensor:
        spec = self.layer_specs[layer_idx]
        heads, dim = self.shape.num_kv_heads, self.shape.head_dim
        groups = self._groups
        if self._decode is not None and self._paged_layers[layer_idx]:
            assert self._kernel is not None
            qk = q.to(kv_layer.dtype).contiguous()  # a no-op where the model runs in the cache's dtype
            out = torch.empty_like(qk)
            self._kernel(qk, kv_layer, out, self._decode, spec.scale, spec.window_left)
            out = out.to(q.dtype)
        else:
            out = torch.empty_like(q)
            groups = self._decode_groups + groups
        for g in groups:
            # Whole-page gathers: index_select of contiguous [page_size, kv_heads, head_dim] blocks
            # yields a contiguous [n, kv_slots, kv_heads, head_dim] without per-slot indexing.
            k = kv_layer[:, 0].index_select(0, g.pages).view(g.num_seqs, g.kv_slots, heads, dim).transpose(1, 2)
            v = kv_layer[:, 1].index_select(0, g.pages).view(g.num_seqs, g.kv_slots, heads, dim).transpose(1, 2)
            if isinstance(g.rows, slice):
                qg = q[g.rows].transpose(0, 1)[None]  # [1, heads, q_len, head_dim]
                out[g.rows] = attend(qg, k, v, g.masks[spec.window_left], spec, sinks)[0].transpose(0, 1)
            else:
                n, q_len = g.q_slot.shape
                qg = q[g.rows].view(n, q_len, *q.shape[1:]).transpose(1, 2)  # [n, heads, q_len, head_dim]
                o = attend(qg, k, v, g.masks[spec.window_left], spec, sinks).transpose(1, 2).reshape(n * q_len,
                                                                                                 *q.shape[1:])
                if g.keep is None:
                    out[g.rows] = o
                else:
                    out[g.out_rows] = o[g.keep]
        return out


# A group is cut where the next (longer) request has more than this many times the group's shortest page
# count, or its query count leaves the group's range by that factor, once the group holds at least
# `min_group` requests (MIN_GROUP for decode rows, 1 for prefills): padding stays under ~1.5x the real work,
# and a batch of mixed lengths makes a handful of groups (each costs two gathers and one attention call
# per layer).
GROUP_SPREAD = 1.5
MIN_GROUP = 16


def _length_groups(pages: np.ndarray, q_lens: np.ndarray, reqs: np.ndarray, min_group: int) -> list[np.ndarray]:
    """`reqs` (with `pages` pages and `q_lens` queries each) sorted by page count and cut into groups."""
    if not reqs.size:
        return []
    order = np.argsort(pages, kind="stable")
    pages, q_lens, reqs = pages[order], q_lens[order], reqs[order]
    groups, start, q_lo, q_hi = [], 0, int(q_lens[0]), int(q_lens[0])
    for i in range(1, len(reqs)):
        q = int(q_lens[i])
        spread = max(q, q_hi) > GROUP_SPREAD * min(q, q_lo) or pages[i] > GROUP_SPREAD * max(int(pages[start]), 1)
        if i - start >= min_group and spread:
            groups.append(reqs[start:i])
            start, q_lo, q_hi = i, q, q
        else:
            q_lo, q_hi = min(q_lo, q), max(q_hi, q)
    groups.append(reqs[start:])
    return groups


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
           spec: AttentionLayerSpec, sinks: torch.Tensor | None) -> torch.Tensor:
    """Dense attention. q: [n, heads, q_len, d]; k, v: [n, kv_heads, kv_len, d]; mask: [n, 1, q_len, kv_len]."""
    if spec.softcap == 0.0 and sinks is None:
        if q.shape[2] == 1 and q.dtype != torch.float32:
            return _attend_one_query(q, k, v, mask, spec.scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=spec.scale, enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * spec.scale  # [n, heads, q_len, kv_len]
    if spec.softcap > 0.0:
        scores = torch.tanh(scores / spec.softcap) * spec.softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.float().view(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs.to(v.dtype), v)


def _attend_one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """Decode rows in bf16/fp16: two batched matmuls with each KV head's query group stacked, softmax in
    float32, no KV head repeated.

    PyTorch's CPU flash kernel is slow for one query row in bf16 (measured 1.67 ms vs 0.25 ms here for
    32 rows x 8 heads x 128 slots; a decode step at batch 32 of the small benchmark model: 49 -> 27 ms).
    In float32 the flash kernel is faster on the gathered (strided) pages, so it keeps that path."""
    n, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    qg = q.reshape(n, kv_heads, heads // kv_heads, dim)  # [n, kv_heads, group, dim]
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [n, kv_heads, group, kv_len]
    scores = scores.masked_fill(~mask.reshape(n, 1, 1, -1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(n, heads, 1, dim)
