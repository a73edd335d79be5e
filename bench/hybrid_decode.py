"""Decode tokens/s of a Qwen3.5-0.8B-shaped hybrid beside a Qwen3-0.6B-shaped dense stack, same runner.

Both run through `HybridRunner` (random weights, float32 unless --dtype):
the hybrid with 3 Gated DeltaNet layers to 1 gated full-attention layer,
the dense one with every layer full attention (Qwen3-0.6B's shapes; it keeps
the hybrid's output gate, so its q projection is twice Qwen 3's). Each batch
size prefills `--context` tokens per sequence, then times `--steps` decode
steps of one token per sequence. The ratio column is hybrid / dense at the
same batch size; the two models alternate (best of --reps). The Qwen3.5-0.8B shape is assumed (hidden 1024, 24 layers,
8 x 256 attention heads on 2 kv heads, 16 x 128 linear heads, MLP 3584,
vocabulary 248320, tied embeddings), not read from the hub.

With `--path engine` both run through `Engine.forward_batch` instead (the
served path: host preparation, the one upload, argmax sampling, the one
download), the dense one as a real `qwen3` model; requests name their state
slots (the hybrid) or none (the dense one).

    python bench/hybrid_decode.py                       # batch 1, 16, 64 on the CPU
    python bench/hybrid_decode.py --batches 1 4 --steps 2 --layers-scale 0.25
    python bench/hybrid_decode.py --path engine --batches 1 16 64
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pie.engine.hybrid_runner import HybridRunner

HYBRID = {"vocab_size": 248320, "hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 24,
          "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256, "linear_num_key_heads": 16,
          "linear_num_value_heads": 16, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
          "linear_conv_kernel_dim": 4, "tie_word_embeddings": True}
DENSE = {"vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
         "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True,
         "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "partial_rotary_factor": 1.0}}


def make_config(shape: dict[str, Any], dense: bool, layers_scale: float) -> Any:
    from transformers import AutoConfig

    values = dict(shape)
    values["num_hidden_layers"] = max(4, round(values["num_hidden_layers"] * layers_scale) // 4 * 4)
    if dense:
        values["layer_types"] = ["full_attention"] * values["num_hidden_layers"]
    return AutoConfig.for_model("qwen3_5_text", **values)


def engine_for(shape: dict[str, Any], dense: bool, layers_scale: float, directory: Path, *, device: str,
               dtype: str, max_batch: int, context: int, pages: int) -> Any:
    """An Engine with random weights on `shape` (its config.json only); the dense one as model_type qwen3."""
    from transformers import AutoConfig

    from pie.engine.config import EngineConfig
    from pie.engine.engine import Engine

    if dense:
        values = {k: v for k, v in shape.items() if k != "rope_parameters"}
        values["num_hidden_layers"] = max(4, round(values["num_hidden_layers"] * layers_scale) // 4 * 4)
        config = AutoConfig.for_model("qwen3", rope_theta=1_000_000.0, **values)
    else:
        config = make_config(shape, False, layers_scale)
    config.save_pretrained(directory)
    json.loads((directory / "config.json").read_text())  # written whole
    return Engine(EngineConfig(model=str(directory), device=device, activation_dtype=dtype, dummy_weights=True,
                               kv_page_size=16, max_num_kv_pages=pages, max_batch_size=max_batch,
                               max_batch_tokens=max(max_batch * context, 256), max_num_state_slots=max_batch,
                               cpu_kv_budget_gb=64.0))


def engine_decode_rate(engine: Any, batch: int, context: int, steps: int) -> float:
    """Prefill `context` tokens per sequence, then time `steps` one-token steps of all of them (argmax)."""
    from pie.engine.batch import ForwardBatch, OutputSpec, Request, Sampler

    per_seq = -(-(context + steps + 2) // 16)
    hybrid = engine.info.num_state_slots > 0
    lens = [0] * batch

    def step(tokens: list[list[int]]) -> None:
        reqs = []
        for i, t in enumerate(tokens):
            start, lens[i] = lens[i], lens[i] + len(t)
            pages = list(range(i * per_seq, i * per_seq + -(-lens[i] // 16)))
            reqs.append(Request(tokens=t, positions=list(range(start, lens[i])), page_ids=pages,
                                last_page_len=(lens[i] - 1) % 16 + 1, outputs=[OutputSpec(len(t) - 1, Sampler())],
                                state_slot=i if hybrid else None))
        engine.forward_batch(ForwardBatch(reqs))

    step([[5 + i % 7] * context for i in range(batch)])
    step([[7]] * batch)  # warm-up step
    start = time.perf_counter()
    for _ in range(steps):
        step([[7]] * batch)
    return batch * steps / (time.perf_counter() - start)


def decode_rate(runner: HybridRunner, batch: int, context: int, steps: int) -> float:
    seqs = [runner.new_sequence() for _ in range(batch)]
    runner.forward({s: [5 + i % 7] * context for i, s in enumerate(seqs)}, all_rows=False)
    runner.forward({s: [7] for s in seqs}, all_rows=False)  # warm-up step
    start = time.perf_counter()
    for _ in range(steps):
        runner.forward({s: [7] for s in seqs}, all_rows=False)
    elapsed = time.perf_counter() - start
    for s in seqs:
        runner.free(s)
    return batch * steps / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--context", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2, help="alternating repetitions per model; the best counts")
    ap.add_argument("--layers-scale", type=float, default=1.0, help="fraction of the layers to build (quick runs)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--path", choices=["runner", "engine"], default="runner",
                    help="HybridRunner (the model alone) or Engine.forward_batch (the served path)")
    args = ap.parse_args()
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    max_batch = max(args.batches)
    pages = max_batch * (-(-(args.context + args.steps + 2) // 16))
    runners: dict[str, Any] = {}
    workdir = tempfile.TemporaryDirectory(prefix="pie-hybrid-bench-")
    for name, shape, dense in (("qwen3.5-0.8b-shaped", HYBRID, False), ("qwen3-0.6b-shaped", DENSE, True)):
        if args.path == "engine":
            directory = Path(workdir.name) / name
            directory.mkdir()
            engine = engine_for(shape, dense, args.layers_scale, directory, device=args.device, dtype=args.dtype,
                                max_batch=max_batch, context=args.context, pages=pages)
            print(f"{name}: {sum(p.numel() for p in engine.model.parameters()) / 1e6:.0f}M params, "
                  f"{engine.model.spec.num_layers} layers, state {engine.info.state_bytes_per_slot / 2**20:.2f} "
                  "MiB per sequence (Engine.forward_batch)", flush=True)
            runners[name] = engine
            continue
        runner = HybridRunner.from_config(make_config(shape, dense, args.layers_scale), None, dtype=dtype,
                                          device=device, num_pages=pages, page_size=16, num_slots=max_batch)
        state_mib = runner.states.shape.bytes_per_slot / 2**20
        print(f"{name}: {sum(p.numel() for p in runner.model.parameters()) / 1e6:.0f}M params, "
              f"{runner.model.spec.num_layers} layers, state {state_mib:.2f} MiB per sequence", flush=True)
        runners[name] = runner
    rate_of = engine_decode_rate if args.path == "engine" else decode_rate
    # The two models alternate, best of --reps each: the host may be shared, and load that changes between
    # two back-to-back runs would otherwise land on one side of the ratio.
    rates: dict[str, dict[int, float]] = {name: {} for name in runners}
    with torch.inference_mode():
        for b in args.batches:
            for _ in range(args.reps):
                for name, runner in runners.items():
                    rate = rate_of(runner, b, args.context, args.steps)
                    rates[name][b] = max(rates[name].get(b, 0.0), rate)
            print(f"  batch {b}: " + ", ".join(f"{n} {r[b]:.1f} tok/s" for n, r in rates.items()), flush=True)
    del runners
    gc.collect()
    print(f"\n{'batch':>6} {'hybrid tok/s':>14} {'dense tok/s':>13} {'hybrid/dense':>13}")
    hybrid, dense_rates = rates["qwen3.5-0.8b-shaped"], rates["qwen3-0.6b-shaped"]
    for b in args.batches:
        print(f"{b:>6} {hybrid[b]:>14.1f} {dense_rates[b]:>13.1f} {hybrid[b] / dense_rates[b]:>13.2f}")
    for b in args.batches:
        print(f"RESULT path={args.path} batch={b} device={device.type} dtype={args.dtype} hybrid_tok_s={hybrid[b]:.2f} "
              f"dense_tok_s={dense_rates[b]:.2f} ratio={hybrid[b] / dense_rates[b]:.3f}")


if __name__ == "__main__":
    main()
