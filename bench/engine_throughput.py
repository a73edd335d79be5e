"""Offline throughput: pie's engine vs transformers' `generate`, same model, same device, same run.

Workload like nano-vllm's benchmark: N sequences with random prompt and output
lengths, greedy, no early stop. pie runs them with continuous batching (a new
sequence joins as soon as there is room; finished ones leave); transformers
runs them in batches of `--batch` with left padding and `max_new_tokens` set
to the longest output in the batch, and is credited only the tokens asked for.

    python bench/engine_throughput.py                      # CPU: a small model (hidden 512, 8 layers)
    python bench/engine_throughput.py --preset qwen3-0.6b  # GPU: a Qwen3-0.6B-shaped model, random weights
    python bench/engine_throughput.py --dtype bfloat16     # CPU with bf16 hardware (AVX512-BF16, AMX)

Prints a table of tokens/s for both and the ratio. On CUDA it also prints the
decode fraction of the HBM-bandwidth floor (weights + KV read once per step).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pie.engine.batch import ForwardBatch, OutputSpec, Request, Sampler
from pie.engine.config import EngineConfig
from pie.engine.engine import Engine

PRESETS: dict[str, dict[str, object]] = {
    "small": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
              "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 32000, "tie_word_embeddings": True},
    "qwen3-0.6b": {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                   "tie_word_embeddings": True},
}


def write_config(directory: Path, preset: str, dtype: str) -> Path:
    cfg = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu",
           "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
           "attention_bias": False, "torch_dtype": dtype, "bos_token_id": 0, "eos_token_id": 1,
           **PRESETS[preset]}
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


def workload(n: int, in_range: tuple[int, int], out_range: tuple[int, int], vocab: int,
             seed: int = 0) -> tuple[list[list[int]], list[int]]:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(10, vocab, int(rng.integers(*in_range, endpoint=True))).tolist() for _ in range(n)]
    outputs = [int(rng.integers(*out_range, endpoint=True)) for _ in range(n)]
    return prompts, outputs


def run_pie(engine: Engine, prompts: list[list[int]], out_lens: list[int],
            max_running: int) -> tuple[float, float]:
    """Continuous batching straight on the engine, at most `max_running` sequences in flight.

    Returns (seconds, seconds spent in pure-decode steps).
    """
    ps, budget = engine.info.page_size, engine.info.max_batch_tokens
    free_pages = list(range(engine.info.num_pages))
    waiting = list(range(len(prompts)))
    running: dict[int, tuple[list[int], int, list[int]]] = {}  # seq -> (pages, kv_len, generated)
    decode_time = 0.0
    start = time.perf_counter()
    while waiting or running:
        reqs, seqs, tokens = [], [], 0
        for s, (pages, kv_len, gen) in running.items():
            # The request names exactly the pages covering kv_len + 1 slots (the KV contract).
            reqs.append(Request([gen[-1]], [kv_len], pages[: kv_len // ps + 1], kv_len % ps + 1,
                                [OutputSpec(0, Sampler())]))
            seqs.append(s)
            tokens += 1
        pure_decode = True
        while waiting and len(reqs) < max_running:
            s = waiting[0]
            need = math.ceil((len(prompts[s]) + out_lens[s]) / ps)
            if tokens + len(prompts[s]) > budget or need > len(free_pages):
                break
            waiting.pop(0)
            pages = [free_pages.pop() for _ in range(need)]
            n = len(prompts[s])
            running[s] = (pages, 0, [])
            reqs.append(Request(prompts[s], list(range(n)), pages[: math.ceil(n / ps)], (n - 1) % ps + 1,
                                [OutputSpec(n - 1, Sampler())]))
            seqs.append(s)
            tokens += n
            pure_decode = False
        t0 = time.perf_counter()
        outs = engine.forward_batch(ForwardBatch(reqs)).outputs
        if pure_decode:
            decode_time += time.perf_counter() - t0
        for s, out, req in zip(seqs, outs, reqs, strict=True):
            pages, kv_len, gen = running[s]
            gen.append(int(out[0]))  # type: ignore[arg-type]
            kv_len += len(req.tokens)
            if len(gen) >= out_lens[s]:
                free_pages.extend(pages)
                del running[s]
            else:
                running[s] = (pages, kv_len, gen)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, decode_time


def run_transformers(model: torch.nn.Module, prompts: list[list[int]], out_lens: list[int], batch: int,
                     device: torch.device) -> float:
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk, outs = prompts[i:i + batch], out_lens[i:i + batch]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=max(outs), min_new_tokens=max(outs),
                           do_sample=False, pad_token_id=0, eos_token_id=None)  # type: ignore[operator]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def decode_floor_fraction(engine: Engine, decode_tokens_per_s: float, batch: int, avg_kv: float,
                          bandwidth: float) -> float:
    """Achieved decode tokens/s over the HBM floor: each step reads every weight and the batch's KV once."""
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    kv_bytes = batch * avg_kv * engine.kv_shape.bytes_per_page / engine.info.page_size
    floor_step_s = (weight_bytes + kv_bytes) / bandwidth
    return decode_tokens_per_s / (batch / floor_step_s)


def measure_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second)."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="small")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--num-seqs", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32, help="transformers batch size")
    ap.add_argument("--max-running", type=int, default=256, help="pie: most sequences in flight")
    ap.add_argument("--in-len", type=int, nargs=2, default=(16, 128))
    ap.add_argument("--out-len", type=int, nargs=2, default=(16, 128))
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="both systems' dtype (default: bfloat16 on CUDA, float32 on CPU)")
    args = ap.parse_args()
    device = torch.device("cuda:0" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    vocab = int(PRESETS[args.preset]["vocab_size"])  # type: ignore[call-overload]
    prompts, out_lens = workload(args.num_seqs, tuple(args.in_len), tuple(args.out_len), vocab)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_config(Path(tmp), args.preset, dtype)
        engine = Engine(EngineConfig(model=str(model_dir), device=str(device), dummy_weights=True,
                                     max_batch_size=max(args.batch, args.max_running), max_num_kv_pages=8192,
                                     cpu_kv_budget_gb=4.0, attention_backend=args.attention_backend,
                                     activation_dtype=dtype))
        warm_p, warm_o = workload(4, (8, 16), (4, 8), vocab, seed=1)
        run_pie(engine, warm_p, warm_o, args.batch)
        same_s, _ = run_pie(engine, prompts, out_lens, args.batch)
        pie_s, pie_decode_s = run_pie(engine, prompts, out_lens, args.max_running)
        from transformers import AutoConfig, AutoModelForCausalLM

        hf_cfg = AutoConfig.from_pretrained(tmp)
        hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=getattr(torch, dtype)).to(device).eval()
        run_transformers(hf, warm_p, warm_o, args.batch, device)
        hf_s = run_transformers(hf, prompts, out_lens, args.batch, device)
    total = sum(out_lens)
    pie_tps, hf_tps = total / pie_s, total / hf_s
    print(f"\nengine throughput: {args.num_seqs} seqs, prompt {args.in_len[0]}-{args.in_len[1]}, "
          f"output {args.out_len[0]}-{args.out_len[1]} tokens, preset {args.preset}, {device}, {dtype}, "
          f"attention {engine.info.attention_backend}")
    print(f"{'system':<28}{'seconds':>10}{'output tok/s':>15}   vs transformers")
    print(f"{'transformers generate (b=' + str(args.batch) + ')':<28}{hf_s:>10.2f}{hf_tps:>15.1f}")
    print(f"{'pie, <= ' + str(args.batch) + ' in flight':<28}{same_s:>10.2f}{total / same_s:>15.1f}"
          f"   ratio {total / same_s / hf_tps:.2f}x")
    print(f"{'pie, <= ' + str(args.max_running) + ' in flight':<28}{pie_s:>10.2f}{pie_tps:>15.1f}"
          f"   ratio {pie_tps / hf_tps:.2f}x")
    if device.type == "cuda":
        bw = measure_bandwidth(device)
        avg_kv = float(np.mean([len(p) + o / 2 for p, o in zip(prompts, out_lens, strict=True)]))
        decode_steps_tokens = total - args.num_seqs  # decode tokens (first token comes from prefill)
        frac = decode_floor_fraction(engine, decode_steps_tokens / max(pie_decode_s, 1e-9),
                                     min(args.num_seqs, 256), avg_kv, bw)
        print(f"measured copy bandwidth {bw / 1e12:.2f} TB/s; decode at {frac:.1%} of the HBM floor "
              "(weights + KV read once per step, batch = all sequences)")


if __name__ == "__main__":
    main()
