"""The paged KV pool: one tensor per layer, pages addressed by the runtime.

Per layer: [num_pages, 2, page_size, num_kv_heads, head_dim] (K at index 0,
V at 1; FlashInfer's NHD layout). The engine never decides which page a token
goes to: `write` puts K/V at the (page, offset) slots computed from the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pie.errors import BatchError


@dataclass(frozen=True)
class KVShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: torch.dtype

    @property
    def bytes_per_page(self) -> int:
        """Bytes one page takes across all layers (K and V), by the real element size of the dtype."""
        per_layer = 2 * self.page_size * self.num_kv_heads * self.head_dim
        return self.num_layers * per_layer * torch.empty((), dtype=self.dtype).element_size()


class KVCache:
    def __init__(self, shape: KVShape, num_pages: int, device: torch.device) -> None:
        self.shape = shape
        self.num_pages = num_pages
        # One allocation; per-layer views keep page copies a single indexed copy.
        self._storage = torch.zeros(
            (shape.num_layers, num_pages, 2, shape.page_size, shape.num_kv_heads, shape.head_dim),
            dtype=shape.dtype, device=device,
        )
        self.layers = list(self._storage.unbind(0))

    def write(self, layer: int, page_idx: torch.Tensor, offset: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [num_tokens, kv_heads, head_dim] written at (page_idx[i], offset[i])."""
        kv = self.layers[layer]
        kv[page_idx, 0, offset] = k.to(kv.dtype)
        kv[page_idx, 1, offset] = v.to(kv.dtype)

    def copy_pages(self, src: list[int], dst: list[int]) -> None:
        """Copy whole pages (all layers) src[i] -> dst[i]; used by fork and page moves."""
        if not src:
            return
        for p in (*src, *dst):
            if not 0 <= p < self.num_pages:
                raise BatchError(f"page copy names page {p}, outside the pool of {self.num_pages} pages")
        dev = self._storage.device
        s = torch.tensor(src, dtype=torch.long, device=dev)
        d = torch.tensor(dst, dtype=torch.long, device=dev)
        self._storage[:, d] = self._storage[:, s]



class SwapPool:
    """Host-memory page slots (pinned on CUDA) that suspended contexts' pages are copied to.

    Same per-page layout as the device pool, so a swap is one indexed copy per direction.
    """

    def __init__(self, shape: KVShape, num_slots: int, device: torch.device) -> None:
        self.num_slots = num_slots
        pin = device.type == "cuda"
        self._storage = torch.zeros(
            (shape.num_layers, num_slots, 2, shape.page_size, shape.num_kv_heads, shape.head_dim),
            dtype=shape.dtype, pin_memory=pin,
        )

    def swap_out(self, kv: KVCache, pairs: list[tuple[int, int]]) -> None:
        """(device_page, host_slot): device -> host."""
        if not pairs:
            return
        pages, slots = (list(x) for x in zip(*pairs, strict=True))
        idx = torch.tensor(pages, dtype=torch.long, device=kv._storage.device)
        self._storage[:, slots] = kv._storage[:, idx].to("cpu")

    def swap_in(self, kv: KVCache, pairs: list[tuple[int, int]]) -> None:
        """(host_slot, device_page): host -> device."""
        if not pairs:
            return
        slots, pages = (list(x) for x in zip(*pairs, strict=True))
        idx = torch.tensor(pages, dtype=torch.long, device=kv._storage.device)
        kv._storage[:, idx] = self._storage[:, slots].to(kv._storage.device, non_blocking=True)
