"""CPU decode attention per layer: the paged kernel (cpu_paged) vs torch_ref's page gathers + SDPA.

Decode batches (one query row per request) on shuffled pages of the `small` preset's attention shape
(8 query heads, 4 kv heads, head_dim 64, page size 16, float32), at several batch sizes and kv
lengths and one mixed-length batch, with 1 and 2 threads. Prints a table (ms per layer, median of
repeats, and the gather/kernel ratio) and ends with RESULT lines.

    python bench/paged_attention.py
    python bench/paged_attention.py --dtype bfloat16 --threads 1
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import median_ms

from pie.engine.attention.base import AttentionLayerSpec, AttentionShape, BatchLayout
from pie.engine.attention.torch_ref import TorchRefBackend

HEADS, KV_HEADS, DIM, PAGE = 8, 4, 64, 16
# (name, batch size, kv lengths): fixed lengths, and one batch spread uniformly over 64..1024.
CASES: list[tuple[str, int, str]] = [("32x64", 32, "64"), ("32x1024", 32, "1024"), ("128x64", 128, "64"),
                                     ("128x256", 128, "256"), ("128x1024", 128, "1024"), ("256x64", 256, "64"),
                                     ("256x256", 256, "256"), ("128xmixed", 128, "mixed")]


def layout_of(kv_lens: np.ndarray, seed: int) -> tuple[BatchLayout, int]:
    """A pure-decode layout over shuffled pages, and the pool size it needs."""
    counts = np.array([math.ceil(n / PAGE) for n in kv_lens])
    num_pages = int(counts.sum())
    pages = np.random.default_rng(seed).permutation(num_pages).astype(np.int32)
    n = len(kv_lens)
    return BatchLayout(qo_indptr=np.arange(n + 1, dtype=np.int32),
                       kv_page_indptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int32),
                       kv_page_indices=pages, kv_last_page_len=((kv_lens - 1) % PAGE + 1).astype(np.int32),
                       kv_lens=kv_lens.astype(np.int32), custom_masks=[None] * n), num_pages


def lengths(batch: int, spec: str) -> np.ndarray:
    if spec == "mixed":
        return np.random.default_rng(batch).integers(64, 1024, batch, endpoint=True)
    return np.full(batch, int(spec))


def layer_ms(backend: TorchRefBackend, q: torch.Tensor, kv_layer: torch.Tensor, repeats: int) -> float:
    return median_ms(lambda: backend.run(0, q, kv_layer), repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    shape = AttentionShape(HEADS, KV_HEADS, DIM, PAGE, dtype, torch.device("cpu"))
    specs = [AttentionLayerSpec(scale=DIM ** -0.5)]
    paged, gather = TorchRefBackend(shape, specs), TorchRefBackend(shape, specs, paged=False)
    if not paged.paged:
        sys.exit("the CPU paged kernel could not be built here (see the warning above)")
    gen = torch.Generator().manual_seed(0)
    rows: list[tuple[str, int, float, float]] = []
    for name, batch, spec in CASES:
        layout, num_pages = layout_of(lengths(batch, spec), seed=batch)
        kv_layer = torch.randn(num_pages, 2, PAGE, KV_HEADS, DIM, generator=gen).to(dtype)
        q = torch.randn(batch, HEADS, DIM, generator=gen).to(dtype)
        paged.plan(layout)
        gather.plan(layout)
        torch.testing.assert_close(paged.run(0, q, kv_layer), gather.run(0, q, kv_layer),
                                   atol=1e-4 if dtype == torch.float32 else 5e-2, rtol=1e-3)
        for threads in args.threads:
            torch.set_num_threads(threads)
            rows.append((name, threads, layer_ms(paged, q, kv_layer, args.repeats),
                         layer_ms(gather, q, kv_layer, args.repeats)))
    print(f"\nCPU decode attention per layer ({args.dtype}; {HEADS} heads, {KV_HEADS} kv heads, head_dim {DIM}, "
          f"page {PAGE}): ms, median of {args.repeats}")
    print(f"{'batch x kv':<12}{'threads':>8}{'kernel':>10}{'gather':>10}{'ratio':>8}")
    for name, threads, t_paged, t_gather in rows:
        print(f"{name:<12}{threads:>8}{t_paged:>10.3f}{t_gather:>10.3f}{t_gather / t_paged:>7.2f}x")
    for name, threads, t_paged, t_gather in rows:
        print(f"RESULT bench=paged_attention dtype={args.dtype} case={name} threads={threads} "
              f"kernel_ms={t_paged:.3f} gather_ms={t_gather:.3f} speedup={t_gather / t_paged:.2f}", flush=True)


if __name__ == "__main__":
    main()
