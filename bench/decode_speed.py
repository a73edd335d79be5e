"""Decode tokens/s: eager vs CUDA graphs, and bf16 vs int8 / int4 / fp8 weights, at several batch sizes.

Every configuration runs on the same Qwen3-0.6B-shaped model (random weights)
in one process; the table gives tokens/s, the ratio to the eager bf16 baseline
at the same batch size, and the fraction of the HBM-bandwidth floor (every
weight byte and the batch's KV read once per step).

    python bench/decode_speed.py                         # CUDA: full table
    python bench/decode_speed.py --preset small --device cpu --configs eager int8-eager
    python bench/decode_speed.py --preset small --device cpu --configs eager gather   # CPU paged kernel vs gathers
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_throughput import PRESETS, measure_bandwidth, write_config

from pie.engine.batch import ForwardBatch, OutputSpec, Request, Sampler
from pie.engine.config import EngineConfig
from pie.engine.engine import Engine

# name -> EngineConfig overrides
CONFIGS: dict[str, dict[str, object]] = {
    "eager": {},
    "graphs": {"use_cuda_graphs": True},
    "int8": {"use_cuda_graphs": True, "weight_dtype": "int8"},
    "int4": {"use_cuda_graphs": True, "weight_dtype": "int4"},
    "fp8-weights": {"use_cuda_graphs": True, "weight_dtype": "float8"},
    "fp8-runtime": {"use_cuda_graphs": True, "runtime_quant": "fp8"},
    "int8-eager": {"weight_dtype": "int8"},
    "gather": {"cpu_paged_attention": False},  # CPU: decode attention by page gathers (the reference path)
}


def decode_rate(engine: Engine, batch: int, context: int, steps: int) -> float:
    """Prefill `batch` sequences of `context` tokens, then time `steps` pure-decode batches."""
    ps = engine.info.page_size
    per_seq = (context + steps + 1) // ps + 1
    pages = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    per_chunk = max(1, engine.info.max_batch_tokens // context)
    for start in range(0, batch, per_chunk):
        chunk = range(start, min(batch, start + per_chunk))
        engine.forward_batch(ForwardBatch([Request([5] * context, list(range(context)), pages[i][: (context - 1) // ps + 1],
                                                   (context - 1) % ps + 1, []) for i in chunk]))

    def step(kv_len: int) -> None:
        engine.forward_batch(ForwardBatch([Request([7], [kv_len], pages[i][: kv_len // ps + 1], kv_len % ps + 1,
                                                   [OutputSpec(0, Sampler())]) for i in range(batch)]))

    step(context)  # warm-up
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for s in range(steps):
        step(context + 1 + s)
    sync()
    return batch * steps / (time.perf_counter() - t0)


def weight_bytes(engine: Engine) -> int:
    total = 0
    for module in engine.model.modules():
        q = getattr(module, "qweight", None)
        total += q.nbytes if q is not None else 0
        total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="qwen3-0.6b")
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--configs", nargs="+", default=["eager", "graphs", "int8", "int4", "fp8-weights", "fp8-runtime"])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    bw = measure_bandwidth(device) if device.type == "cuda" else 0.0
    rows: list[tuple[str, int, float, float]] = []
    base: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_config(Path(tmp), args.preset, dtype)
        for name in args.configs:
            engine = Engine(EngineConfig(model=tmp, device=str(device), dummy_weights=True, max_batch_size=256,
                                         max_num_kv_pages=16384, cpu_kv_budget_gb=8.0, **CONFIGS[name]))  # type: ignore[arg-type]
            wbytes = weight_bytes(engine)
            for b in args.batches:
                rate = decode_rate(engine, b, args.context, args.steps)
                if name == args.configs[0]:
                    base[b] = rate
                kv_bytes = b * (args.context + args.steps / 2) * engine.kv_shape.bytes_per_page / engine.info.page_size
                floor = b / ((wbytes + kv_bytes) / bw) if bw else float("nan")
                rows.append((name, b, rate, rate / floor if bw else float("nan")))
            del engine
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"\ndecode speed: preset {args.preset}, {device}, {dtype}, context {args.context}, {args.steps} steps"
          + (f", copy bandwidth {bw / 1e12:.2f} TB/s" if bw else ""))
    print(f"{'config':<14}{'batch':>6}{'tok/s':>12}{'vs ' + args.configs[0]:>12}{'HBM floor':>11}")
    for name, b, rate, frac in rows:
        print(f"{name:<14}{b:>6}{rate:>12.1f}{rate / base[b]:>11.2f}x{frac:>10.1%}")
    for name, b, rate, frac in rows:
        print(f"RESULT bench=decode_speed preset={args.preset} config={name} batch={b} tok_s={rate:.1f} "
              f"vs_{args.configs[0]}={rate / base[b]:.3f} hbm_floor_frac={frac:.3f}", flush=True)


if __name__ == "__main__":
    main()
