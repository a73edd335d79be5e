"""End-to-end serving throughput: concurrent generations through the runtime, beside the engine driven directly
in the same run, and (`--peer vllm`) beside vLLM's `LLM.generate` and transformers' `generate`.

Widths mode (default). For each width W (1, 8, 32, 64, 256) W in-process inferlets each prefill `--in` tokens
and generate `--out` tokens greedily through the SDK (`ctx.generate(...)`, stepping through every token as a
streaming text-completion does; the benchmark checkpoints have no tokenizer, so prompts are token ids). Per
inferlet: TTFT (launch -> first token) and TPOT (mean gap between its later tokens); overall output tok/s (all
tokens / wall time). The baseline is continuous batching straight on `Engine.forward_batch` with W sequences
in flight (bench/engine_throughput.py's `run_pie`), same model, same lengths.

Workload mode (`--num-seqs N`, or the `cpu-peer` preset). N sequences with prompt and output lengths drawn
from `--in-range` / `--out-range` (bench/engine_throughput.py's `workload`, seed 0), all launched at once:
pie through the runtime (N inferlets), the engine directly (at most `--max-running` in flight), vLLM's
`LLM.generate` (`--peer vllm`) and transformers `generate` in batches of `--hf-batch`, on one checkpoint
written to a temporary directory (random weights, safetensors + config.json) and the same prompt token ids
and output lengths (greedy, no early stop). vLLM loads once and the systems take turns for `--repeats`
rounds (pie through the runtime, the engine, vLLM, transformers; the best round of each is reported), so a change of load
on a shared host hits them alike. The `cpu-peer` preset is the workload of the peers' reference
figures (docs/performance.md): the small Qwen3-shaped model (hidden 512, 8 layers, vocab 32000), float32,
128 sequences, prompts and outputs of 16-128 tokens.

    python bench/serve_throughput.py                              # small model, CPU, in/out 32/64
    python bench/serve_throughput.py --preset cpu-peer --peer vllm
    python bench/serve_throughput.py --preset qwen3-0.6b --device cuda:0 --in 256 --out 256

vLLM runs in its own interpreter (`--vllm-python`, default ~/vllm-venv/bin/python; bench/vllm_peer.py) with
the settings of vLLM's CPU docs: tcmalloc and its libiomp5 preloaded where present, every core bound
(`VLLM_CPU_OMP_THREADS_BIND`), `VLLM_CPU_KVCACHE_SPACE=4`, the dtype passed explicitly. Where it cannot be
imported the run says so (`RESULT peer=vllm skipped=...`). The `pie serve` (WebSocket) path is measured by
bench/serve_load.py. Every configuration ends with a `RESULT` line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine_throughput import run_pie, run_transformers, workload, write_config

from inferlet import Context, Model, Sampler
from inferlet._instance import use_instance
from pie.engine.config import EngineConfig
from pie.runtime.engine_client import InProcessEngine
from pie.runtime.instance import Instance
from pie.runtime.runtime import ModelSpec, Runtime, RuntimeConfig, RuntimeLimits

# preset -> (model shape in engine_throughput.PRESETS, workload-mode defaults or None for widths mode)
PRESETS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "small": ("small", None),
    "qwen3-0.6b": ("qwen3-0.6b", None),
    "cpu-peer": ("small", {"num_seqs": 128, "in_range": (16, 128), "out_range": (16, 128), "dtype": "float32"}),
}
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")


async def one(prompt: list[int], out: int, t0: float, stamps: list[list[float]]) -> None:
    ctx = Context(Model.load(""))
    times: list[float] = []
    gen = ctx.append(prompt).generate(Sampler.argmax(), max_tokens=out, stop=[], auto_flush=False)
    async for step in gen:
        for _ in (await step.execute()).tokens:
            times.append(time.perf_counter() - t0)
    stamps.append(times)


async def through_runtime(runtime: Runtime, prompts: list[list[int]],
                          out_lens: list[int]) -> tuple[float, list[list[float]]]:
    """All prompts launched at once as inferlets; (wall seconds, per-inferlet token timestamps)."""
    stamps: list[list[float]] = []
    t0 = time.perf_counter()

    def body(prompt: list[int], out: int) -> Any:
        async def run(instance: Instance) -> str:
            assert instance.host is not None
            with use_instance(instance.host):
                await one(prompt, out, t0, stamps)
            return "ok"
        return run

    procs = [runtime.spawn(body(p, o), program="bench", username="bench") for p, o in zip(prompts, out_lens,
                                                                                          strict=True)]
    finals = [await p.wait() for p in procs]
    assert all(f.kind == "return" for f in finals), finals[0]
    return time.perf_counter() - t0, stamps


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def latency(stamps: list[list[float]]) -> tuple[list[float], list[float]]:
    """(TTFT ms, TPOT ms) per inferlet."""
    ttft = [s[0] * 1e3 for s in stamps if s]
    tpot = [(s[-1] - s[0]) / (len(s) - 1) * 1e3 for s in stamps if len(s) > 1]
    return ttft, tpot


def write_checkpoint(directory: Path, preset: str, dtype: str) -> Path:
    """config.json + model.safetensors with random weights (seed 0): one checkpoint every system loads."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    write_config(directory, preset, dtype)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory), dtype=getattr(torch, dtype))
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def vllm_env(python: str) -> dict[str, str]:
    """vLLM's CPU settings: tcmalloc + its own libiomp5 preloaded, all cores bound, 4 GiB of KV."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # vLLM's interpreter must not see pie's tree or venv
    preload = [str(p) for p in (TCMALLOC, Path(python).resolve().parent.parent / "lib" / "libiomp5.so")
               if p.exists()]
    if not preload:  # the venv's python may be a symlink out of the venv: look beside the link too
        preload = [str(p) for p in (Path(python).parent.parent / "lib" / "libiomp5.so",) if p.exists()]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    return env


class VLLMPeer:
    """vLLM's LLM.generate in its own interpreter (bench/vllm_peer.py), loaded once, one round per `run()`."""

    def __init__(self, python: str, model_dir: Path, dtype: str, prompts: list[list[int]], out_lens: list[int],
                 max_num_seqs: int, tmp: Path) -> None:
        spec = tmp / "vllm_workload.json"
        spec.write_text(json.dumps({"model": str(model_dir), "dtype": dtype, "prompts": prompts,
                                    "out_lens": out_lens, "max_num_seqs": max_num_seqs}))
        self.log = (tmp / "vllm.log").open("w")
        env = vllm_env(python)
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        self.proc = subprocess.Popen([python, str(Path(__file__).with_name("vllm_peer.py")), str(spec)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.version = str(self._read()["ready"])

    @staticmethod
    def available(python: str) -> str | None:
        """None when vLLM imports under `python`, else why not."""
        if not Path(python).exists():
            return f"no_interpreter:{python}"
        probe = subprocess.run([python, "-c", "import vllm"], env=vllm_env(python), capture_output=True, text=True)
        return None if probe.returncode == 0 else "not_importable"

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("VLLM_PEER "):
                out: dict[str, Any] = json.loads(line.removeprefix("VLLM_PEER "))
                return out
        self.log.flush()
        tail = Path(self.log.name).read_text()[-4000:]
        raise RuntimeError(f"vLLM peer exited (rc {self.proc.wait()}):\n{tail}")

    def run(self) -> float:
        """Seconds for one LLM.generate of the whole workload."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return float(self._read()["seconds"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=120)
        self.log.close()


async def start(config: EngineConfig) -> tuple[InProcessEngine, Runtime]:
    client = await InProcessEngine.start(config)
    runtime = await Runtime.start(RuntimeConfig((ModelSpec("bench", config),), RuntimeLimits()),
                                  engines={"bench": client})
    return client, runtime


async def widths_mode(args: argparse.Namespace, model: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_config(Path(tmp), model, args.dtype)
        pages_per_seq = -(-(args.in_len + args.out + 1) // 16) + 1
        config = EngineConfig(model=str(model_dir), device=args.device, dummy_weights=True,
                              max_batch_size=max(args.widths),
                              max_batch_tokens=args.max_batch_tokens or max(args.in_len * 4, 2048),
                              max_num_kv_pages=max(args.widths) * pages_per_seq + 64, cpu_kv_budget_gb=8.0,
                              use_cuda_graphs=args.cuda_graphs)
        client, runtime = await start(config)
        vocab = client.info.vocab_size
        await through_runtime(runtime, [list(range(10, 18))] * 2, [4, 4])  # warm up
        print(f"\nserve throughput: preset {args.preset}, {args.device}, in {args.in_len} / out {args.out}, greedy")
        print(f"{'width':>6}{'tok/s':>9}{'direct tok/s':>14}{'ratio':>7}{'TTFT p50 ms':>13}{'p99':>8}"
              f"{'TPOT p50 ms':>13}{'p99':>8}")
        for width in args.widths:
            prompts = [[(i * 31 + j * 7) % (vocab - 10) + 10 for j in range(args.in_len)] for i in range(width)]
            wall, stamps = await through_runtime(runtime, prompts, [args.out] * width)
            tok_s = sum(len(s) for s in stamps) / wall
            direct_s, _ = run_pie(client.engine, prompts, [args.out] * width, width)
            direct = width * args.out / direct_s
            ttft, tpot = latency(stamps)
            print(f"{width:>6}{tok_s:>9.0f}{direct:>14.0f}{tok_s / direct:>7.2f}{pct(ttft, 0.5):>13.1f}"
                  f"{pct(ttft, 0.99):>8.1f}{pct(tpot, 0.5):>13.2f}{pct(tpot, 0.99):>8.2f}")
            print(f"RESULT preset={args.preset} width={width} tok_s={tok_s:.0f} direct_tok_s={direct:.0f} "
                  f"ratio={tok_s / direct:.3f} ttft_p50_ms={pct(ttft, 0.5):.1f} ttft_p99_ms={pct(ttft, 0.99):.1f} "
                  f"tpot_p50_ms={statistics.median(tpot) if tpot else 0:.2f} tpot_p99_ms={pct(tpot, 0.99):.2f}",
                  flush=True)
        if args.peer == "vllm":
            print("RESULT peer=vllm skipped=widths_mode (use --num-seqs or --preset cpu-peer)")
        await runtime.shutdown(0)
        await client.close()


async def workload_mode(args: argparse.Namespace, model: str) -> None:
    from engine_throughput import PRESETS as SHAPES

    vocab = int(SHAPES[model]["vocab_size"])  # type: ignore[call-overload]
    prompts, out_lens = workload(args.num_seqs, tuple(args.in_range), tuple(args.out_range), vocab)
    total = sum(out_lens)
    longest = max(len(p) + o for p, o in zip(prompts, out_lens, strict=True))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_checkpoint(Path(tmp), model, args.dtype)
        pages = args.num_seqs * (-(-(longest + 1) // 16) + 1) + 64
        extra = {"max_batch_tokens": args.max_batch_tokens} if args.max_batch_tokens else {}
        config = EngineConfig(model=str(model_dir), device=args.device, activation_dtype=args.dtype,
                              max_batch_size=max(args.num_seqs, args.max_running), max_num_kv_pages=pages,
                              cpu_kv_budget_gb=8.0, **extra)
        client, runtime = await start(config)
        await through_runtime(runtime, [p[:16] for p in prompts[:4]], [4] * 4)  # warm up
        run_pie(client.engine, [p[:16] for p in prompts[:4]], [4] * 4, 4)
        peer: VLLMPeer | None = None
        skipped = VLLMPeer.available(args.vllm_python) if args.peer == "vllm" else None
        if args.peer == "vllm" and skipped is None:
            peer = VLLMPeer(args.vllm_python, model_dir, args.dtype, prompts, out_lens, max(args.num_seqs, 256),
                            Path(tmp))
        print(f"\nserve throughput: preset {args.preset}, {args.device}, {args.dtype}, {args.num_seqs} sequences, "
              f"prompt {args.in_range[0]}-{args.in_range[1]}, output {args.out_range[0]}-{args.out_range[1]} tokens "
              f"({total} output tokens), greedy; {args.repeats} rounds, each system in turn (best round counts: "
              "load on a shared host only ever adds time)")
        print(f"{'round':>5}  {'system':<44}{'output tok/s':>13}{'load':>6}", flush=True)
        best: dict[str, float] = {}
        stamps: list[list[float]] = []

        def row(r: int, name: str, seconds: float) -> None:
            best[name] = max(best.get(name, 0.0), total / seconds)
            print(f"{r:>5}  {name:<44}{total / seconds:>13.0f}{os.getloadavg()[0]:>6.1f}", flush=True)

        names = (f"pie through the runtime ({args.num_seqs} inferlets)",
                 f"pie engine direct (<= {args.max_running} in flight)")
        hf_name = f"transformers generate (b={args.hf_batch})"
        model_hf: Any = None
        if args.hf_batch > 0:
            import torch
            from transformers import AutoModelForCausalLM

            device = torch.device(args.device)
            model_hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).eval()
            model_hf.to(device)
            run_transformers(model_hf, [p[:16] for p in prompts[:4]], [4] * 4, args.hf_batch, device)
        for r in range(args.repeats):
            wall, round_stamps = await through_runtime(runtime, prompts, out_lens)
            assert sum(len(s) for s in round_stamps) == total
            if total / wall >= best.get(names[0], 0.0):
                stamps = round_stamps  # latencies of the best runtime round
            row(r, names[0], wall)
            row(r, names[1], run_pie(client.engine, prompts, out_lens, args.max_running)[0])
            if peer is not None:
                row(r, f"vLLM {peer.version} LLM.generate", peer.run())
            if model_hf is not None:
                row(r, hf_name, run_transformers(model_hf, prompts, out_lens, args.hf_batch, device))
        if peer is not None:
            peer.close()
        await runtime.shutdown(0)
        await client.close()
        del client, runtime
        hf = best.get(hf_name, 0.0)
    rt, direct = best[names[0]], best[names[1]]
    ttft, tpot = latency(stamps)
    print(f"\nbest round: {'system':<44}{'output tok/s':>13}{'pie runtime / it':>18}")
    for name, tok_s in best.items():
        print(f"            {name:<44}{tok_s:>13.0f}{rt / tok_s:>18.2f}")
    print(f"pie runtime: TTFT p50 {pct(ttft, 0.5):.0f} ms p99 {pct(ttft, 0.99):.0f} ms, "
          f"TPOT p50 {pct(tpot, 0.5):.1f} ms p99 {pct(tpot, 0.99):.1f} ms")
    print(f"RESULT preset={args.preset} seqs={args.num_seqs} tok_s={rt:.0f} direct_tok_s={direct:.0f} "
          f"ratio={rt / direct:.3f} ttft_p50_ms={pct(ttft, 0.5):.1f} tpot_p50_ms={pct(tpot, 0.5):.2f} "
          f"rounds={args.repeats}", flush=True)
    if hf:
        print(f"RESULT peer=transformers batch={args.hf_batch} tok_s={hf:.0f} pie_over_transformers={rt / hf:.2f} "
              f"direct_over_transformers={direct / hf:.2f}")
    if peer is not None:
        v = best[f"vLLM {peer.version} LLM.generate"]
        print(f"RESULT peer=vllm version={peer.version} tok_s={v:.0f} pie_tok_s={rt:.0f} pie_over_vllm={rt / v:.3f} "
              f"direct_over_vllm={direct / v:.3f} rounds={args.repeats}")
    elif skipped is not None:
        print(f"RESULT peer=vllm skipped={skipped}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=list(PRESETS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default float32 (the preset's in workload mode)")
    ap.add_argument("--widths", type=int, nargs="+", default=[1, 8, 32, 64, 256])
    ap.add_argument("--in", dest="in_len", type=int, default=32)
    ap.add_argument("--out", type=int, default=64)
    ap.add_argument("--num-seqs", type=int, default=None, help="workload mode: this many sequences at once")
    ap.add_argument("--in-range", type=int, nargs=2, default=None)
    ap.add_argument("--out-range", type=int, nargs=2, default=None)
    ap.add_argument("--max-running", type=int, default=256, help="engine direct: most sequences in flight")
    ap.add_argument("--max-batch-tokens", type=int, default=None, help="engine max_batch_tokens (default: config's)")
    ap.add_argument("--repeats", type=int, default=2, help="workload mode: rounds of every system, in turn")
    ap.add_argument("--hf-batch", type=int, default=32, help="workload mode: transformers batch size (0: skip)")
    ap.add_argument("--peer", choices=["vllm"], default=None)
    ap.add_argument("--cuda-graphs", action="store_true", help="use_cuda_graphs = true (CUDA with FlashInfer)")
    ap.add_argument("--vllm-python", default=str(Path.home() / "vllm-venv" / "bin" / "python"))
    args = ap.parse_args()
    model, defaults = PRESETS[args.preset]
    defaults = defaults or {}
    args.dtype = args.dtype or defaults.get("dtype", "float32")
    args.num_seqs = args.num_seqs or defaults.get("num_seqs")
    args.in_range = args.in_range or defaults.get("in_range", (16, 128))
    args.out_range = args.out_range or defaults.get("out_range", (16, 128))
    asyncio.run(workload_mode(args, model) if args.num_seqs else widths_mode(args, model))


if __name__ == "__main__":
    main()
