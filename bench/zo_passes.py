"""What a zo seed costs a decode step: one batch of `--rows` decode rows on a rank-8 zo adapter.

    python bench/zo_passes.py                       # the "small" preset of engine_throughput, CPU or CUDA
    python bench/zo_passes.py --preset qwen3-0.6b --device cuda:0

Rows: the adapter unperturbed (the baseline, in the same run), every row with its own zo seed whose
perturbed copy is cached in a scratch slot (a rollout's steps after its first), and every row with a
new seed each step (each step draws and materialises `rows` perturbations: the worst case, a
rollout's first step). Median ms per `forward_batch`; ratios against the baseline.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from engine_throughput import PRESETS, write_config

from pie.engine.batch import ForwardBatch, OutputSpec, Request, Sampler
from pie.engine.config import EngineConfig
from pie.engine.engine import Engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="small")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    device = "cuda:0" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(EngineConfig(model=str(write_config(Path(tmp), args.preset, dtype)), device=device,
                                     dummy_weights=True, max_num_kv_pages=4 * args.rows, kv_page_size=16,
                                     max_num_adapters=args.rows + 1, cpu_kv_budget_gb=1.0, activation_dtype=dtype))
    slot = engine.zo_initialize(None, 8, 16.0, args.rows, 0.5, 0.01)
    params = sum(t.numel() for t in engine.adapters.theta(slot).values())

    def step_ms(seeds: Callable[[int], list[int | None]]) -> float:
        times = []
        for k in range(args.steps):
            reqs = [Request([5 + i], [3], [2 * i], 4, [OutputSpec(0, Sampler("argmax"))], adapter=slot,
                            zo_seed=z) for i, z in enumerate(seeds(k))]
            t0 = time.perf_counter()
            engine.forward_batch(ForwardBatch(reqs))
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    step_ms(lambda k: [None] * args.rows)  # warm-up
    plain = step_ms(lambda k: [None] * args.rows)
    cached = step_ms(lambda k: list(range(args.rows)))
    fresh = step_ms(lambda k: [1000 * (k + 1) + i for i in range(args.rows)])
    print(f"\nzo decode step: {args.rows} rows, preset {args.preset}, {device}, {dtype}, rank-8 zo adapter on every "
          f"projection ({params} parameters)")
    print(f"{'rows':<40}{'ms/step':>10}{'vs unperturbed':>16}")
    for name, ms in (("adapter, unperturbed", plain), ("own zo seed each, cached copies", cached),
                     ("new zo seed each, every step", fresh)):
        print(f"{name:<40}{ms:>10.2f}{ms / plain:>15.2f}x")
    print(f"RESULT preset={args.preset} device={device} rows={args.rows} plain_ms={plain:.2f} "
          f"zo_cached_ms={cached:.2f} zo_fresh_ms={fresh:.2f} cached_ratio={cached / plain:.2f} "
          f"fresh_ratio={fresh / plain:.2f}")


if __name__ == "__main__":
    main()
