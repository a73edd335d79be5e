"""CUDA-only kernels of the engine step, each with the torch path it replaces as its definition.

- `KVAppend`: a step's new K/V written into the paged pool by FlashInfer's
  `append_paged_kv_cache` (one kernel per layer for K and V together) instead
  of two advanced-index assignments (`KVCache.write`, several kernels each).
  FlashInfer addresses a slot as (request, position in the request); the
  engine already knows every new token's (page, offset), so each token is
  passed as its own one-page request: page table `[write_page[i]]`, position
  `write_offset[i]`, last-page length `write_offset[i] + 1`. The int32 index
  tensors are built once per forward (inside a captured graph: once per
  replay) and shared by every layer.
- `PinnedRing`: the small host arrays FlashInfer's `plan` must read on the
  host (indptr, last-page lengths), kept in pinned memory so the copies
  `plan` makes of them are asynchronous (a copy from pageable memory waits
  for the stream).

Nothing here runs on a CPU: the engine uses these only when the device is
CUDA and FlashInfer is importable (`flashinfer_available`), so the CPU path
is untouched.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from typing import Any

import numpy as np
import torch


@cache
def flashinfer_available() -> bool:
    return importlib.util.find_spec("flashinfer") is not None


@cache
def _append_fn() -> Any:
    import flashinfer

    return flashinfer.page.append_paged_kv_cache


class KVAppend:
    """Writes one forward's new K/V at (write_page[i], write_offset[i]) of a layer's pages."""

    def __init__(self, write_page: torch.Tensor, write_offset: torch.Tensor) -> None:
        n = write_page.shape[0]
        dev = write_page.device
        self.pages = write_page.to(torch.int32)  # each token's one-page table
        self.positions = write_offset.to(torch.int32)
        self.last_page_len = self.positions + 1
        self.batch_indices = torch.arange(n, dtype=torch.int32, device=dev)  # token i is request i
        self.indptr = torch.arange(n + 1, dtype=torch.int32, device=dev)

    def __call__(self, kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """kv_layer: [pages, 2, page_size, kv_heads, head_dim] (NHD); k, v: [T, kv_heads, head_dim]."""
        k, v = _as_cache(k, kv_layer), _as_cache(v, kv_layer)
        _append_fn()(k, v, self.batch_indices, self.positions, kv_layer, self.pages, self.indptr,
                     self.last_page_len, kv_layout="NHD")


def _as_cache(x: torch.Tensor, kv_layer: torch.Tensor) -> torch.Tensor:
    """The kernel reads rows and heads by stride but wants the head dimension dense and the pool's dtype."""
    if x.dtype != kv_layer.dtype:
        x = x.to(kv_layer.dtype)
    return x if x.stride(-1) == 1 else x.contiguous()


class PinnedRing:
    """Pinned host copies of small int32 arrays, reused once the device has consumed the last ones.

    `plan` copies them to the device with non_blocking=True; before a buffer is overwritten, the event
    recorded after the previous plan is waited on (already passed in a serial step: the step's
    download synchronised after it)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._done: torch.cuda.Event | None = None

    def put(self, name: str, values: np.ndarray) -> torch.Tensor:
        if self._done is not None:
            self._done.synchronize()
            self._done = None
        n = values.size
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n:
            buf = self._buffers[name] = torch.empty(max(256, 1 << max(n - 1, 0).bit_length()), dtype=torch.int32,
                                                    pin_memory=True)
        view = buf[:n]
        view.copy_(torch.from_numpy(np.ascontiguousarray(values, np.int32)))
        return view

    def planned(self) -> None:
        """Call after the plans that read the buffers were issued."""
        self._done = torch.cuda.Event()
        self._done.record()
