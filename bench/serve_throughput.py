"""End-to-end serving throughput: W concurrent generations with fixed input/output lengths through the runtime,
beside the engine driven directly in the same run.

For each width W (default 1, 8, 32, 64, 256) W in-process inferlets each prefill `--in` tokens and generate
`--out` tokens greedily through the SDK (`ctx.generate(...)`, stepping through every token as a streaming
text-completion does; the dummy checkpoints have no tokenizer, so the prompt is token ids rather than chat
text). Per inferlet: TTFT (launch -> first token) and TPOT (mean gap between its later tokens); overall
output tok/s (all tokens / wall time). The baseline is continuous batching straight on `Engine.forward_batch`
with W sequences in flight (bench/engine_throughput.py's `run_pie`), same model, same lengths.

    python bench/serve_throughput.py                              # small model, CPU, in/out 32/64
    python bench/serve_throughput.py --preset qwen3-0.6b --device cuda:0 --in 256 --out 256

`--peer vllm` runs vLLM's `LLM.generate` on the same workload where vllm is importable (not implemented
on this host: it is not installed; the flag reports that). The `pie serve` (WebSocket) path is measured by
bench/serve_load.py. Each width ends with a `RESULT` line.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine_throughput import run_pie, write_config

from inferlet import Context, Model, Sampler
from inferlet._instance import use_instance
from pie.engine.config import EngineConfig
from pie.runtime.engine_client import InProcessEngine
from pie.runtime.instance import Instance
from pie.runtime.runtime import ModelSpec, Runtime, RuntimeConfig, RuntimeLimits


async def one(prompt: list[int], out: int, t0: float, stamps: list[list[float]]) -> None:
    ctx = Context(Model.load(""))
    times: list[float] = []
    gen = ctx.append(prompt).generate(Sampler.argmax(), max_tokens=out, stop=[], auto_flush=False)
    async for step in gen:
        for _ in (await step.execute()).tokens:
            times.append(time.perf_counter() - t0)
    stamps.append(times)


async def through_runtime(runtime: Runtime, width: int, in_len: int, out: int, vocab: int) -> tuple[float, list[list[float]]]:
    stamps: list[list[float]] = []
    t0 = time.perf_counter()

    def body(i: int) -> Any:
        async def run(instance: Instance) -> str:
            assert instance.host is not None
            with use_instance(instance.host):
                await one([(i * 31 + j * 7) % (vocab - 10) + 10 for j in range(in_len)], out, t0, stamps)
            return "ok"
        return run

    procs = [runtime.spawn(body(i), program="bench", username="bench") for i in range(width)]
    finals = [await p.wait() for p in procs]
    assert all(f.kind == "return" for f in finals), finals[0]
    return time.perf_counter() - t0, stamps


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_config(Path(tmp), args.preset, args.dtype)
        pages_per_seq = -(-(args.in_len + args.out + 1) // 16) + 1
        config = EngineConfig(model=str(model_dir), device=args.device, dummy_weights=True,
                              max_batch_size=max(args.widths), max_batch_tokens=max(args.in_len * 4, 2048),
                              max_num_kv_pages=max(args.widths) * pages_per_seq + 64, cpu_kv_budget_gb=8.0,
                              use_cuda_graphs=args.cuda_graphs)
        client = await InProcessEngine.start(config)
        runtime = await Runtime.start(RuntimeConfig((ModelSpec("bench", config),), RuntimeLimits()),
                                      engines={"bench": client})
        vocab = client.info.vocab_size
        await through_runtime(runtime, 2, 8, 4, vocab)  # warm up
        print(f"\nserve throughput: preset {args.preset}, {args.device}, in {args.in_len} / out {args.out}, greedy")
        print(f"{'width':>6}{'tok/s':>9}{'direct tok/s':>14}{'ratio':>7}{'TTFT p50 ms':>13}{'p99':>8}"
              f"{'TPOT p50 ms':>13}{'p99':>8}")
        for width in args.widths:
            wall, stamps = await through_runtime(runtime, width, args.in_len, args.out, vocab)
            tokens = sum(len(s) for s in stamps)
            tok_s = tokens / wall
            prompts = [[(i * 31 + j * 7) % (vocab - 10) + 10 for j in range(args.in_len)] for i in range(width)]
            direct_s, _ = run_pie(client.engine, prompts, [args.out] * width, width)
            direct = width * args.out / direct_s
            ttft = [s[0] * 1e3 for s in stamps if s]
            tpot = [(s[-1] - s[0]) / (len(s) - 1) * 1e3 for s in stamps if len(s) > 1]
            print(f"{width:>6}{tok_s:>9.0f}{direct:>14.0f}{tok_s / direct:>7.2f}{pct(ttft, 0.5):>13.1f}"
                  f"{pct(ttft, 0.99):>8.1f}{pct(tpot, 0.5):>13.2f}{pct(tpot, 0.99):>8.2f}")
            print(f"RESULT preset={args.preset} width={width} tok_s={tok_s:.0f} direct_tok_s={direct:.0f} "
                  f"ratio={tok_s / direct:.3f} ttft_p50_ms={pct(ttft, 0.5):.1f} ttft_p99_ms={pct(ttft, 0.99):.1f} "
                  f"tpot_p50_ms={statistics.median(tpot) if tpot else 0:.2f} tpot_p99_ms={pct(tpot, 0.99):.2f}",
                  flush=True)
        if args.peer == "vllm":
            if importlib.util.find_spec("vllm") is None:
                print("RESULT peer=vllm skipped=not_importable")
            else:
                print("RESULT peer=vllm skipped=not_implemented")
        await runtime.shutdown(0)
        await client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=["small", "qwen3-0.6b"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--widths", type=int, nargs="+", default=[1, 8, 32, 64, 256])
    ap.add_argument("--in", dest="in_len", type=int, default=32)
    ap.add_argument("--out", type=int, default=64)
    ap.add_argument("--peer", choices=["vllm"], default=None)
    ap.add_argument("--cuda-graphs", action="store_true", help="use_cuda_graphs = true (CUDA with FlashInfer)")
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
