"""FlashInfer paged attention (CUDA).

Planned once per batch and per layer variant (window, soft-cap, scale): a
pure-decode batch (one causal query per request) uses the decode wrapper;
anything else uses the prefill wrapper, causal requests in one planned group
and custom-mask requests in another (each variant planned with the mask of
its kind of layer, `BatchLayout.mask_of`: Gemma 4's image blocks are on the
windowed layers only). Layers with attention sinks, which these wrappers do
not take, run on the torch reference path.

Workspace: one float workspace buffer is shared by every wrapper. That is
safe because all runs are issued in order on the current stream and a run
never overlaps another; each wrapper keeps its own int workspace and plan.

Page table: `plan` reads indptr and last-page lengths on the host (they
decide the kernel's split), so those small arrays go through pinned buffers
(`cuda_ops.PinnedRing`: the copies `plan` makes are asynchronous); the page
indices themselves, the large array, are the device view of the step's one
upload (`BatchLayout.device_page_indices`) when the engine provides it, so
they are never copied from the host a second time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pie.engine.attention.base import AttentionBackend, AttentionLayerSpec, AttentionShape, BatchLayout
from pie.engine.attention.torch_ref import TorchRefBackend
from pie.engine.cuda_ops import PinnedRing

_WORKSPACE_BYTES = 128 << 20


@dataclass(frozen=True)
class _Variant:
    window_left: int
    softcap: float
    scale: float


@dataclass
class _PrefillGroup:
    """Requests planned together on one prefill wrapper per variant."""

    wrappers: dict[_Variant, object]
    rows: torch.Tensor | None  # query rows of the group in the batch; None = every row, in order


class FlashInferBackend(AttentionBackend):
    name = "flashinfer"
    supports_cuda_graphs = True

    def __init__(self, shape: AttentionShape, layer_specs: list[AttentionLayerSpec]) -> None:
        super().__init__(shape, layer_specs)
        import flashinfer

        self._fi = flashinfer
        self._workspace = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=shape.device)
        self._layer_variant = [_Variant(s.window_left, s.softcap, s.scale) for s in layer_specs]
        self._variants = sorted({v for v, s in zip(self._layer_variant, layer_specs, strict=True) if not s.sinks},
                                key=lambda v: (v.window_left, v.softcap, v.scale))
        # GQA groups of 4+ query heads per kv head run faster on the tensor-core decode kernel.
        tensor_cores = shape.num_heads // shape.num_kv_heads >= 4
        self._decode = {v: flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace, "NHD", use_tensor_cores=tensor_cores) for v in self._variants}
        self._causal = {v: flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD")
                        for v in self._variants}
        self._masked = {v: flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD")
                        for v in self._variants}
        self._fallback = TorchRefBackend(shape, layer_specs) if any(s.sinks for s in layer_specs) else None
        self._tensor_cores = tensor_cores
        self._graph_decode: dict[int, dict[_Variant, object]] = {}
        self._graph_bs = 0
        self._mode = "decode"
        self._groups: list[_PrefillGroup] = []
        self._pinned = PinnedRing()

    def _common(self, v: _Variant) -> dict[str, object]:
        s = self.shape
        return {"num_qo_heads": s.num_heads, "num_kv_heads": s.num_kv_heads, "page_size": s.page_size,
                "window_left": v.window_left, "logits_soft_cap": v.softcap or None, "sm_scale": v.scale,
                "q_data_type": s.dtype, "kv_data_type": s.dtype}

    def plan(self, layout: BatchLayout) -> None:
        if self._fallback is not None:
            self._fallback.plan(layout)
        if layout.is_pure_decode:
            self._mode = "decode"
            indptr, indices, last = self._page_table(layout, "decode")
            for v in self._variants:
                self._decode[v].plan(indptr, indices, last, head_dim=self.shape.head_dim,
                                     pos_encoding_mode="NONE", **self._common(v))
            self._pinned.planned()
            return
        self._mode = "prefill"
        masked = [r for r in range(layout.num_requests) if layout.is_masked(r)]
        causal = [r for r in range(layout.num_requests) if not layout.is_masked(r)]
        self._groups = []
        if causal:
            self._groups.append(self._plan_group(layout, causal, self._causal, masked=False))
        if masked:
            self._groups.append(self._plan_group(layout, masked, self._masked, masked=True))
        self._pinned.planned()

    def _page_table(self, layout: BatchLayout, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indptr, indices, last_page_len) for `plan`: the small arrays pinned on the host, the indices on
        the device when the step uploaded them."""
        indptr = self._pinned.put(f"{key}_indptr", layout.kv_page_indptr)
        last = self._pinned.put(f"{key}_last", layout.kv_last_page_len)
        indices = layout.device_page_indices
        if indices is None:
            indices = torch.from_numpy(layout.kv_page_indices)
        return indptr, indices, last

    def init_graph_buckets(self, batch_sizes: list[int], max_pages: int) -> None:
        if self._fallback is not None:
            raise NotImplementedError("CUDA graphs with attention-sink layers are not supported; "
                                      "set use_cuda_graphs = false for this model")
        dev = self.shape.device
        for bs in batch_sizes:
            # Fixed buffers per bucket: FlashInfer's graph mode reads the plan from them at replay.
            self._graph_decode[bs] = {v: self._fi.BatchDecodeWithPagedKVCacheWrapper(
                self._workspace, "NHD", use_cuda_graph=True, use_tensor_cores=self._tensor_cores,
                paged_kv_indptr_buffer=torch.zeros(bs + 1, dtype=torch.int32, device=dev),
                paged_kv_indices_buffer=torch.zeros(max_pages, dtype=torch.int32, device=dev),
                paged_kv_last_page_len_buffer=torch.zeros(bs, dtype=torch.int32, device=dev))
                for v in self._variants}

    def plan_graph(self, batch_size: int, layout: BatchLayout) -> None:
        assert layout.is_pure_decode and layout.num_requests == batch_size
        indptr, indices, last = self._page_table(layout, "graph")
        for v, wrapper in self._graph_decode[batch_size].items():
            wrapper.plan(indptr, indices, last, head_dim=self.shape.head_dim,  # type: ignore[attr-defined]
                         pos_encoding_mode="NONE", **self._common(v))
        self._pinned.planned()
        self._mode, self._graph_bs = "graph", batch_size

    def _plan_group(self, layout: BatchLayout, reqs: list[int], wrappers: dict[_Variant, object],
                    masked: bool) -> _PrefillGroup:
        qo_lens = np.diff(layout.qo_indptr)[reqs]
        qo_indptr = np.concatenate(([0], np.cumsum(qo_lens))).astype(np.int32)
        page_counts = np.diff(layout.kv_page_indptr)[reqs]
        kv_indptr = np.concatenate(([0], np.cumsum(page_counts))).astype(np.int32)
        kv_indices = np.concatenate([layout.kv_page_indices[layout.kv_page_indptr[r]:layout.kv_page_indptr[r + 1]]
                                     for r in reqs]).astype(np.int32)
        last = layout.kv_last_page_len[reqs].astype(np.int32)
        every_row = len(reqs) == layout.num_requests
        if masked:  # FlashInfer packs custom masks on the device and wants the indptrs there too
            host = [torch.from_numpy(a).to(self.shape.device) for a in (qo_indptr, kv_indptr, kv_indices, last)]
        else:
            indices = layout.device_page_indices if every_row else None
            host = [self._pinned.put("prefill_qo", qo_indptr), self._pinned.put("prefill_indptr", kv_indptr),
                    indices if indices is not None else torch.from_numpy(kv_indices),
                    self._pinned.put("prefill_last", last)]
        for v in self._variants:
            mask = self._flat_mask(layout, reqs, v.window_left) if masked else None
            wrappers[v].plan(*host, head_dim_qk=self.shape.head_dim, causal=not masked,  # type: ignore[attr-defined]
                             custom_mask=mask, **self._common(v))
        rows = None if every_row else torch.from_numpy(np.concatenate(
            [np.arange(layout.qo_indptr[r], layout.qo_indptr[r + 1]) for r in reqs])).to(self.shape.device)
        return _PrefillGroup(wrappers, rows)

    def _flat_mask(self, layout: BatchLayout, reqs: list[int], window_left: int) -> torch.Tensor:
        """Row-major [q_len, kv_len] masks of `reqs` on a layer of this window, flattened and concatenated;
        windows ANDed in. A request masked only on the other kind of layer is causal here."""
        parts = []
        for r in reqs:
            m = layout.mask_of(r, windowed=window_left >= 0)
            kv_len = int(layout.kv_lens[r])
            q_len = int(layout.qo_indptr[r + 1] - layout.qo_indptr[r])
            q_slot = np.arange(kv_len - q_len, kv_len)[:, None]
            if m is None:
                m = np.arange(kv_len)[None, :] <= q_slot
            if window_left >= 0:
                m = m & (np.arange(kv_len)[None, :] >= q_slot - window_left)
            parts.append(m.reshape(-1))
        return torch.from_numpy(np.concatenate(parts)).to(self.shape.device)

    def run(self, layer_idx: int, q: torch.Tensor, kv_layer: torch.Tensor,
            sinks: torch.Tensor | None = None) -> torch.Tensor:
        if self.layer_specs[layer_idx].sinks:
            assert self._fallback is not None
            return self._fallback.run(layer_idx, q, kv_layer, sinks)
        v = self._layer_variant[layer_idx]
        if self._mode == "graph":
            return self._graph_decode[self._graph_bs][v].run(q, kv_layer)  # type: ignore[attr-defined,no-any-return,unused-ignore]
        if self._mode == "decode":
            return self._decode[v].run(q, kv_layer)  # type: ignore[no-any-return,unused-ignore]
        if len(self._groups) == 1 and self._groups[0].rows is None:
            return self._groups[0].wrappers[v].run(q, kv_layer)  # type: ignore[attr-defined,no-any-return,unused-ignore]
        out = torch.empty_like(q)
        for g in self._groups:
            assert g.rows is not None
            out[g.rows] = g.wrappers[v].run(q[g.rows], kv_layer)  # type: ignore[attr-defined]
        return out
