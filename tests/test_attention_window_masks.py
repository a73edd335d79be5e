"""Masks on the sliding-window layers only (`BatchLayout.window_masks`, Gemma 4's image blocks): torch_ref
attends with them on the windowed layers and causally on the others, next to a causal request, equal to
dense attention under the masks written out; FlashInfer's custom-mask path plans the same masks per layer
variant (its mask builder, checked on the CPU; the kernels in test_engine_gpu.py)."""

from __future__ import annotations

import numpy as np
import torch

from pie.engine.attention.base import AttentionLayerSpec, AttentionShape, BatchLayout
from pie.engine.attention.flashinfer import FlashInferBackend
from pie.engine.attention.torch_ref import TorchRefBackend

PAGE, HEADS, KV_HEADS, DIM, WINDOW = 4, 4, 2, 8, 2
SPECS = [AttentionLayerSpec(scale=0.5, window_left=WINDOW), AttentionLayerSpec(scale=0.5)]
SHAPE = AttentionShape(HEADS, KV_HEADS, DIM, PAGE, torch.float32, torch.device("cpu"))
BLOCK = (3, 9)  # request 0's rows 3..8 see each other (an image), on the windowed layer only


def _layout() -> BatchLayout:
    """Request 0: a 10-token prefill on pages 0-2 with the block; request 1: 3 causal rows after 4 cached."""
    block = np.tril(np.ones((10, 10), bool))
    block[BLOCK[0]:BLOCK[1], BLOCK[0]:BLOCK[1]] = True
    return BatchLayout(qo_indptr=np.array([0, 10, 13], np.int32), kv_page_indptr=np.array([0, 3, 5], np.int32),
                       kv_page_indices=np.array([0, 1, 2, 3, 4], np.int32),
                       kv_last_page_len=np.array([2, 3], np.int32), kv_lens=np.array([10, 7], np.int32),
                       custom_masks=[None, None], window_masks={0: block})


def _expected_masks(windowed: bool) -> list[np.ndarray]:
    """[q_len, kv_len] of each request on a layer with (`windowed`) or without the window, written out."""
    out = []
    for q_len, kv_len, block in ((10, 10, windowed), (3, 7, False)):
        q = np.arange(kv_len - q_len, kv_len)[:, None]
        kv = np.arange(kv_len)[None, :]
        mask = kv <= q
        if block:
            mask = mask | ((q >= BLOCK[0]) & (q < BLOCK[1]) & (kv >= BLOCK[0]) & (kv < BLOCK[1]))
        if windowed:
            mask = mask & (kv >= q - WINDOW)
        out.append(mask)
    return out


def test_torch_ref_uses_the_window_masks_on_windowed_layers_only() -> None:
    gen = torch.Generator().manual_seed(0)
    kv_layer = torch.randn(5, 2, PAGE, KV_HEADS, DIM, generator=gen)
    q = torch.randn(13, HEADS, DIM, generator=gen)
    layout = _layout()
    assert layout.has_custom_mask and not layout.is_pure_decode and layout.is_masked(0) and not layout.is_masked(1)
    backend = TorchRefBackend(SHAPE, SPECS)
    backend.plan(layout)
    for layer, windowed in ((0, True), (1, False)):
        out = backend.run(layer, q, kv_layer)
        for r, (pages, rows, mask) in enumerate(zip(([0, 1, 2], [3, 4]), (slice(0, 10), slice(10, 13)),
                                                    _expected_masks(windowed), strict=True)):
            kv_len = mask.shape[1]
            k, v = (kv_layer[pages, i].reshape(-1, KV_HEADS, DIM)[:kv_len].transpose(0, 1) for i in (0, 1))
            ref = torch.nn.functional.scaled_dot_product_attention(
                q[rows].transpose(0, 1), k, v, attn_mask=torch.from_numpy(mask), scale=0.5, enable_gqa=True)
            torch.testing.assert_close(out[rows], ref.transpose(0, 1), atol=1e-5, rtol=1e-5, msg=f"{layer=} {r=}")


def test_flashinfer_plans_each_variant_with_its_layers_masks() -> None:
    backend = object.__new__(FlashInferBackend)  # only the mask builder: no kernels, no flashinfer import
    backend.shape = SHAPE
    layout = _layout()
    for window, windowed in ((WINDOW, True), (-1, False)):
        flat = backend._flat_mask(layout, [0, 1], window)
        expected = np.concatenate([m.reshape(-1) for m in _expected_masks(windowed)])
        np.testing.assert_array_equal(flat.numpy(), expected)
