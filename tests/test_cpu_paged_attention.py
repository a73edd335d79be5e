"""The CPU paged-attention decode kernel (pie.engine.attention.cpu_paged) against the gather path
(torch_ref with paged=False) and against softmax(q k^T) v written out in float64: shuffled page tables,
mixed kv lengths, GQA, windows, float32 and bfloat16, batches mixing decode rows with prefills and
custom masks; the engine's greedy tokens with the kernel on and off; the build cache and the fallback
when no compiler works."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import VOCAB
from engine_helpers import greedy_generate, make_engine, random_prompts

from pie.engine.attention import cpu_paged
from pie.engine.attention.base import AttentionLayerSpec, AttentionShape, BatchLayout
from pie.engine.attention.torch_ref import TorchRefBackend

CPU = torch.device("cpu")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# The gather path rounds the probabilities to bfloat16 before P @ V (the kernel keeps them in float32).
GATHER_TOL = {torch.float32: 1e-5, torch.bfloat16: 6e-2}


def _layout(q_lens: list[int], kv_lens: list[int], page_size: int, num_pages: int, seed: int,
            masks: dict[int, np.ndarray] | None = None) -> BatchLayout:
    """Requests with these query and kv lengths on pages drawn at random (shuffled) from the pool."""
    rng = np.random.default_rng(seed)
    counts = [math.ceil(n / page_size) for n in kv_lens]
    pool = rng.permutation(num_pages)[: sum(counts)]
    masks = masks or {}
    return BatchLayout(
        qo_indptr=np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32),
        kv_page_indptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int32),
        kv_page_indices=pool.astype(np.int32),
        kv_last_page_len=np.array([(n - 1) % page_size + 1 for n in kv_lens], np.int32),
        kv_lens=np.array(kv_lens, np.int32),
        custom_masks=[masks.get(r) for r in range(len(q_lens))])


def _dense(q: torch.Tensor, kv_layer: torch.Tensor, layout: BatchLayout, spec: AttentionLayerSpec) -> torch.Tensor:
    """softmax(q k^T * scale) v per request in float64, causal (or its custom mask), with the window."""
    out = torch.empty(q.shape, dtype=torch.float64)
    heads, kv_heads = q.shape[1], kv_layer.shape[3]
    for r in range(layout.num_requests):
        rows = slice(int(layout.qo_indptr[r]), int(layout.qo_indptr[r + 1]))
        pages = layout.kv_page_indices[layout.kv_page_indptr[r]: layout.kv_page_indptr[r + 1]]
        kv_len, q_len = int(layout.kv_lens[r]), rows.stop - rows.start
        k, v = (kv_layer[torch.from_numpy(pages.astype(np.int64)), i].reshape(-1, kv_heads, q.shape[2])[:kv_len]
                .double().repeat_interleave(heads // kv_heads, dim=1) for i in (0, 1))
        scores = torch.einsum("qhd,khd->hqk", q[rows].double(), k) * spec.scale
        q_slot = torch.arange(kv_len - q_len, kv_len)[:, None]
        slot = torch.arange(kv_len)[None, :]
        mask = layout.custom_masks[r]
        allowed = torch.from_numpy(mask) if mask is not None else slot <= q_slot
        if spec.window_left >= 0:
            allowed = allowed & (slot >= q_slot - spec.window_left)
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        out[rows] = torch.einsum("hqk,khd->qhd", probs, v)
    return out


def _run(layout: BatchLayout, specs: list[AttentionLayerSpec], heads: int, kv_heads: int, dim: int,
         page_size: int, num_pages: int, dtype: torch.dtype, seed: int = 0) -> None:
    """Every layer: the paged backend and the gather backend both equal the float64 reference."""
    gen = torch.Generator().manual_seed(seed)
    shape = AttentionShape(heads, kv_heads, dim, page_size, dtype, CPU)
    paged, gather = TorchRefBackend(shape, specs), TorchRefBackend(shape, specs, paged=False)
    assert paged.paged and not gather.paged
    paged.plan(layout)
    gather.plan(layout)
    q = torch.randn(int(layout.qo_indptr[-1]), heads, dim, generator=gen).to(dtype)
    for layer, spec in enumerate(specs):
        kv_layer = torch.randn(num_pages, 2, page_size, kv_heads, dim, generator=gen).to(dtype)
        ref = _dense(q, kv_layer, layout, spec)
        for name, backend, tol in (("paged", paged, TOL), ("gather", gather, GATHER_TOL)):
            out = backend.run(layer, q, kv_layer)
            assert out.dtype == dtype and out.shape == q.shape
            err = (out.double() - ref).abs().max().item()
            assert err < tol[dtype], f"{name} {layer=} {spec=} {err=}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 4), (8, 2)])
@pytest.mark.parametrize("dim", [64, 128, 256])  # the kernel's compile-time head dims
def test_decode_rows_match_dense_attention(dtype: torch.dtype, heads: int, kv_heads: int, dim: int) -> None:
    page_size = 16
    kv_lens = [1, page_size - 1, page_size, page_size + 1, 5 * page_size + 3, 300, 2, 64]
    specs = [AttentionLayerSpec(scale=dim ** -0.5), AttentionLayerSpec(scale=0.3, window_left=7),
             AttentionLayerSpec(scale=dim ** -0.5, window_left=40)]
    layout = _layout([1] * len(kv_lens), kv_lens, page_size, 64, seed=heads + dim)
    _run(layout, specs, heads, kv_heads, dim, page_size, 64, dtype, seed=kv_heads)


@pytest.mark.parametrize("page_size", [1, 5, 32])
def test_page_sizes_and_window_edges(page_size: int) -> None:
    """Also a head_dim (80) without a compile-time variant."""
    kv_lens = [1, 2, page_size, 3 * page_size - 1, 50]
    specs = [AttentionLayerSpec(scale=0.125, window_left=w) for w in (-1, 0, 1, page_size, 49, 1000)]
    num_pages = sum(math.ceil(n / page_size) for n in kv_lens) + 3
    _run(_layout([1] * len(kv_lens), kv_lens, page_size, num_pages, seed=page_size), specs, 4, 2, 80, page_size,
         num_pages, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_decode_prefill_and_custom_masks(dtype: torch.dtype) -> None:
    """Only the decode rows of causal requests go to the kernel; prefills, a masked prefill and a masked
    decode row keep the gather path, and every row is right."""
    page_size = 8
    q_lens, kv_lens = [1, 7, 1, 5, 1, 1, 3], [40, 20, 1, 9, 17, 12, 3]
    masks = {3: np.tril(np.ones((5, 9), bool), k=4) | (np.arange(9)[None, :] < 2),  # a masked prefill
             5: (np.arange(12) % 3 == 0)[None, :]}  # a masked decode row
    layout = _layout(q_lens, kv_lens, page_size, 40, seed=7, masks=masks)
    specs = [AttentionLayerSpec(scale=0.125), AttentionLayerSpec(scale=0.125, window_left=4)]
    _run(layout, specs, 8, 2, 64, page_size, 40, dtype)
    backend = TorchRefBackend(AttentionShape(8, 2, 64, page_size, dtype, CPU), specs)
    backend.plan(layout)
    assert backend._decode is not None and backend._decode.rows.tolist() == [0, 8, 14]  # requests 0, 2, 4
    assert not backend._decode_groups  # no decode gathers left where the kernel serves every layer


def test_softcap_and_sink_layers_keep_the_gather_path() -> None:
    """A model mixing plain, soft-capped and sink layers: the kernel serves the plain ones only."""
    specs = [AttentionLayerSpec(scale=0.125), AttentionLayerSpec(scale=0.125, softcap=30.0),
             AttentionLayerSpec(scale=0.125, sinks=True)]
    shape = AttentionShape(4, 2, 64, 16, torch.float32, CPU)
    paged, gather = TorchRefBackend(shape, specs), TorchRefBackend(shape, specs, paged=False)
    layout = _layout([1, 1, 1], [5, 40, 100], 16, 16, seed=3)
    paged.plan(layout)
    gather.plan(layout)
    assert paged._paged_layers == [True, False, False] and paged._decode_groups
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, 64, generator=gen)
    kv_layer = torch.randn(16, 2, 16, 2, 64, generator=gen)
    sinks = torch.randn(4, generator=gen)
    for layer in range(3):
        s = sinks if specs[layer].sinks else None
        torch.testing.assert_close(paged.run(layer, q, kv_layer, s), gather.run(layer, q, kv_layer, s),
                                   atol=1e-5, rtol=1e-5)


def test_bad_page_tables_are_refused() -> None:
    shape = AttentionShape(4, 2, 64, 16, torch.float32, CPU)
    backend = TorchRefBackend(shape, [AttentionLayerSpec(scale=0.125)])
    layout = _layout([1], [20], 16, 4, seed=0)
    layout.kv_lens[0] = 33  # more slots than its two pages hold
    with pytest.raises(Exception, match="kv length 33 over 2 pages"):
        backend.plan(layout)
    layout = _layout([1], [20], 16, 4, seed=0)
    layout.kv_page_indices[1] = 9
    backend.plan(layout)
    with pytest.raises(Exception, match="page 9, outside the pool of 4"):
        backend.run(0, torch.zeros(1, 4, 64), torch.zeros(4, 2, 16, 2, 64))


def test_engine_greedy_tokens_are_the_same_paged_or_gathered(checkpoint_dir) -> None:  # type: ignore[no-untyped-def]
    d = checkpoint_dir("llama")
    prompts = random_prompts(6, VOCAB, 1, 45, seed=5)
    tokens = {}
    for paged in (True, False):
        engine = make_engine(d, kv_page_size=4, cpu_paged_attention=paged)
        assert engine.backend.paged is paged  # type: ignore[attr-defined]
        tokens[paged] = greedy_generate(engine, prompts, 24)
    assert tokens[True] == tokens[False]


def test_library_is_built_once_and_cached(tmp_path: Path) -> None:
    path, built = cpu_paged.ensure_library(tmp_path, cpu_paged.compiler())
    assert built and path.parent == tmp_path
    stamp = path.stat().st_mtime_ns
    again, built_again = cpu_paged.ensure_library(tmp_path, cpu_paged.compiler())
    assert again == path and not built_again and path.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary build files left behind


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert cpu_paged.cache_dir() == tmp_path / "ext"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setenv("PIE_HOME", str(tmp_path / "home"))
    assert cpu_paged.cache_dir() == tmp_path / "home" / "cache" / "torch_extensions"


@pytest.mark.parametrize("cxx", ["/bin/false", "/nonexistent/c++"])
def test_a_broken_compiler_falls_back_to_gathers(cxx: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", cxx)
    specs = [AttentionLayerSpec(scale=0.125)]
    with caplog.at_level(logging.WARNING, logger=cpu_paged.__name__):
        backends = [TorchRefBackend(AttentionShape(4, 2, 64, 16, torch.float32, CPU), specs) for _ in range(2)]
    assert not any(b.paged for b in backends)
    assert len([r for r in caplog.records if "kernel unavailable" in r.getMessage()]) == 1  # one warning
    layout = _layout([1, 1, 4], [3, 70, 20], 16, 12, seed=2)
    backends[0].plan(layout)
    gen = torch.Generator().manual_seed(0)
    q, kv_layer = torch.randn(6, 4, 64, generator=gen), torch.randn(12, 2, 16, 2, 64, generator=gen)
    err = (backends[0].run(0, q, kv_layer).double() - _dense(q, kv_layer, layout, specs[0])).abs().max().item()
    assert err < 1e-5
