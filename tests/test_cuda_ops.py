"""The CUDA kernels that replace torch code on the GPU, against the torch code they replace (gpu only)."""

from __future__ import annotations

import pytest
import torch

from pie.engine.cuda_ops import KVAppend
from pie.engine.kv_cache import KVCache, KVShape
from pie.engine.layers.norm import RMSNorm

pytestmark = pytest.mark.gpu


def test_flashinfer_kv_append_equals_the_indexed_write() -> None:
    pytest.importorskip("flashinfer")
    dev = torch.device("cuda:0")
    shape = KVShape(num_layers=2, num_kv_heads=2, head_dim=64, page_size=16, dtype=torch.bfloat16)
    by_index, by_append = KVCache(shape, 8, dev), KVCache(shape, 8, dev)
    pages = torch.tensor([3, 3, 5, 0, 7, 3], device=dev)
    offsets = torch.tensor([0, 15, 4, 9, 1, 7], device=dev)
    k = torch.randn(6, 2, 64, device=dev, dtype=torch.bfloat16)
    v = torch.randn(6, 2, 128, device=dev, dtype=torch.bfloat16)[:, :, :64]  # a strided view, as a qkv split gives
    by_index.write(1, pages, offsets, k, v)
    KVAppend(pages, offsets)(by_append.layers[1], k, v)
    torch.cuda.synchronize()
    assert torch.equal(by_index.layers[1], by_append.layers[1]) and not by_append.layers[0].any()


@pytest.mark.parametrize("shape", [(37, 256), (5, 8, 64)])  # hidden rows; per-head rows (Qwen 3's q/k norms)
def test_flashinfer_rmsnorm_matches_the_torch_path(shape: tuple[int, ...]) -> None:
    pytest.importorskip("flashinfer")
    norm = RMSNorm(shape[-1], 1e-6).to("cuda", torch.bfloat16)
    torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 2
    got = norm(x)
    x32 = x.float()
    want = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert got.shape == x.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
