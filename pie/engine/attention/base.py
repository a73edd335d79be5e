"""The attention backend interface, its registry and the per-batch layout it plans from.

A backend is planned once per batch (`plan`), then run once per layer
(`run`). Layers that differ in window, soft-cap or sinks name a
`AttentionLayerSpec`; backends that must plan per variant (FlashInfer) do so
for each distinct spec.

KV writes are not the backend's job: `KVCache.write` puts the new K/V at the
slots the runtime chose before `run` reads them.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
import torch

from pie.errors import ConfigError


@dataclass(frozen=True)
class AttentionLayerSpec:
    """What varies between attention layers.

    window_left: attend to kv slots j with q_slot - window_left <= j <= q_slot; -1 = unlimited.
    softcap: scores = softcap * tanh(scores / softcap) when > 0 (Gemma 2).
    sinks: the layer has per-head sink logits (GPT-OSS), passed to `run`.
    """

    scale: float
    window_left: int = -1
    softcap: float = 0.0
    sinks: bool = False


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int  # query heads on this rank
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: torch.dtype
    device: torch.device


@dataclass
class BatchLayout:
    """Host-side description of a batch, the input of `plan` (all int32 numpy arrays).

    Request r owns query rows qo_indptr[r]:qo_indptr[r+1] and pages
    kv_page_indices[kv_page_indptr[r]:kv_page_indptr[r+1]]; its kv length after
    the pass is kv_lens[r]. custom_masks[r] is a bool [q_len, kv_len] array or
    None (causal). window_masks[r], where present, replaces custom_masks[r] on the
    layers with a sliding window (their window is still ANDed on top): Gemma 4's
    image rows attend both ways on those layers only.
    """

    qo_indptr: np.ndarray
    kv_page_indptr: np.ndarray
    kv_page_indices: np.ndarray
    kv_last_page_len: np.ndarray
    kv_lens: np.ndarray
    custom_masks: list[np.ndarray | None]
    window_masks: dict[int, np.ndarray] = field(default_factory=dict)
    # kv_page_indices on the device, a view of the step's one upload (CUDA with FlashInfer: the page table
    # reaches the kernels without a copy of its own); None: backends read the host array.
    device_page_indices: torch.Tensor | None = None

    @property
    def num_requests(self) -> int:
        return len(self.kv_lens)

    @property
    def has_custom_mask(self) -> bool:
        return bool(self.window_masks) or any(m is not None for m in self.custom_masks)

    def is_masked(self, r: int) -> bool:
        """Request r has a mask on some layer (it is attended on the custom-mask path)."""
        return self.custom_masks[r] is not None or r in self.window_masks

    def mask_of(self, r: int, windowed: bool) -> np.ndarray | None:
        """Request r's [q_len, kv_len] mask on a layer with (`windowed`) or without a sliding window,
        before the window; None: causal."""
        if windowed and r in self.window_masks:
            return self.window_masks[r]
        return self.custom_masks[r]

    @property
    def is_pure_decode(self) -> bool:
        return bool(np.all(np.diff(self.qo_indptr) == 1)) and not self.has_custom_mask


class AttentionBackend(ABC):
    name: str = ""
    # Backends that can run inside a captured CUDA graph implement the two graph hooks below.
    supports_cuda_graphs: bool = False

    def __init__(self, shape: AttentionShape, layer_specs: list[AttentionLayerSpec]) -> None:
        self.shape = shape
        self.layer_specs = layer_specs

    @abstractmethod
    def plan(self, layout: BatchLayout) -> None:
        """Prepare per-batch metadata once; `run` is then called for every layer."""

    @abstractmethod
    def run(self, layer_idx: int, q: torch.Tensor, kv_layer: torch.Tensor,
            sinks: torch.Tensor | None = None) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim]; kv_layer: [num_pages, 2, page_size, kv_heads, head_dim].

        Returns [num_tokens, num_heads, head_dim] in q's dtype.
        """

    def init_graph_buckets(self, batch_sizes: list[int], max_pages: int) -> None:
        """Create fixed-size decode state for each captured batch size (before any capture)."""
        raise NotImplementedError(f"{self.name} attention cannot run in CUDA graphs")

    def plan_graph(self, batch_size: int, layout: BatchLayout) -> None:
        """Plan a pure-decode `layout` of exactly `batch_size` requests into that bucket's fixed
        buffers; `run` then uses them, inside capture and before every replay."""
        raise NotImplementedError(f"{self.name} attention cannot run in CUDA graphs")


# name -> "module:Class", imported lazily so optional dependencies load only when chosen.
_REGISTRY: dict[str, str] = {
    "torch_ref": "pie.engine.attention.torch_ref:TorchRefBackend",
    "flashinfer": "pie.engine.attention.flashinfer:FlashInferBackend",
}


def flashinfer_available() -> bool:
    return importlib.util.find_spec("flashinfer") is not None


def resolve_backend_name(requested: str, device: torch.device) -> str:
    """'auto' -> flashinfer on CUDA when importable, else torch_ref."""
    if requested == "auto":
        return "flashinfer" if device.type == "cuda" and flashinfer_available() else "torch_ref"
    if requested == "flashinfer":
        if device.type != "cuda":
            raise ConfigError(f"attention_backend = 'flashinfer' needs a CUDA device, got {device}; use 'auto'")
        if not flashinfer_available():
            raise ConfigError("attention_backend = 'flashinfer' but flashinfer is not installed; "
                              "install the cuda extra (pip install 'pie[cuda]') or use 'torch_ref'")
    return requested


def create_backend(name: str, shape: AttentionShape, layer_specs: list[AttentionLayerSpec],
                   **options: object) -> AttentionBackend:
    """The backend called `name`; `options` go to its constructor (torch_ref: `paged`)."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown attention backend {name!r}; choose one of {', '.join(_REGISTRY)}")
    module_name, cls_name = _REGISTRY[name].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    backend: AttentionBackend = cls(shape, layer_specs, **options)
    return backend
