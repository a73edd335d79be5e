"""Per-step runtime overhead: N inferlets decoding through the SDK's `ctx.generate`, on three engines.

Each of N in-process (trusted) instances fills a short prompt, waits until all have, then generates
`--steps` tokens greedily with `ctx.generate(...).collect_tokens()` the way real inferlets do, so every
decode step is one engine batch of N rows. Engines (`--engine`):

- `null`: answers at once with valid outputs (`pie.runtime.fake_engines.NullEngine`); every microsecond
  of a step is the runtime's and the SDK's. `host_ms_per_step` is this process's CPU time
  (`time.process_time`, so a loaded shared host inflates it less than wall time) per decode step while
  every stream decodes: from the first batch that holds all N streams' steps to the last one. `run_ms_per_step`
  is the whole generation (the streams' starts, first passes, stops and the instances' ends included)
  divided by the steps; `wall_ms_per_step` its wall time.
- `sleep:MS`: takes MS per batch in a thread without the GIL, like a device. The bound is N tokens per
  MS (every step full, no host time visible); `of_bound` is how much of it the runtime keeps over the
  whole run (the streams' starts and the instances' ends, when the device has nothing to do, included),
  `steady_of_bound` while every stream decodes.
- `real`: the small model (hidden 512, 8 layers) on `--device`; the same batches replayed straight on
  `Engine.forward_batch` give the baseline, the difference is the runtime's share.

    python bench/runtime_overhead.py --engine null
    python bench/runtime_overhead.py --engine sleep:5 --counts 256
    python bench/runtime_overhead.py --engine real --counts 1 32 256 --steps 32

`--no-runahead` makes the SDK take one host call per step (the step-by-step loop) for comparison.
Each configuration ends with a `RESULT` line.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import inferlet.generation
from inferlet import Context, Model, Sampler
from inferlet._instance import use_instance
from pie.engine.batch import ForwardBatch
from pie.runtime.api import EngineClient
from pie.runtime.fake_engines import NullEngine, SleepEngine, fake_info
from pie.runtime.instance import Instance
from pie.runtime.runtime import ModelSpec, Runtime, RuntimeConfig, RuntimeLimits

PROMPT_LEN = 24
PAGE_SIZE = 16


@dataclass
class Row:
    count: int
    step_us: float  # wall time per decode step through the runtime
    cpu_us: float  # this process's CPU time per decode step, the whole run
    steady_us: float  # of a step while all N streams decode (CPU)
    steady_wall_us: float  # the same, wall time
    in_engine_us: float  # of which: the engine calls
    direct_us: float  # real engine only: the same batches on Engine.forward_batch, no runtime
    batches_per_step: float

    @property
    def host_us(self) -> float:
        """What the runtime adds around the engine calls, measured within the same run."""
        return self.step_us - self.in_engine_us


async def generate(prompt: list[int], steps: int, ready: list[int], go: asyncio.Event) -> list[int]:
    """An inferlet's decode loop: prefill all but the last prompt token, then `ctx.generate`."""
    ctx = Context(Model.load(""))
    await ctx.append(prompt[:-1]).flush()
    ctx.append(prompt[-1:])
    ready.append(1)
    await go.wait()
    return await ctx.generate(Sampler.argmax(), max_tokens=steps, stop=[], auto_flush=False).collect_tokens()


async def measure(runtime: Runtime, count: int, steps: int, keep: bool = False
                  ) -> tuple[float, float, tuple[float, float], float, float, list[ForwardBatch]]:
    """Seconds per decode step (wall, CPU, (CPU, wall) while all streams decode), of which in the engine,
    batches per step, and the batches fired."""
    fired: list[ForwardBatch] = []
    in_engine = [0.0]
    phase = {"decode": False}
    full: list[tuple[float, float]] = []  # (process, wall) time at each landing of a batch holding every stream

    def on_batch(batch: ForwardBatch, _result: object, seconds: float) -> None:
        if phase["decode"]:
            if batch.num_tokens == count:
                full.append((time.process_time(), time.perf_counter()))
            if keep:  # the replay runs them later: a copy as the engine saw it (chained tokens filled in)
                batch = ForwardBatch(batch.requests + (batch.steps.requests() if batch.steps is not None else []),
                                     batch.page_copies, batch.swap_out, batch.swap_in)
            fired.append(batch)
            in_engine[0] += seconds

    runtime.model().scheduler.on_batch = on_batch
    ready: list[int] = []
    go = asyncio.Event()
    vocab = runtime.model().vocab_size

    def body(i: int) -> Any:
        async def run(instance: Instance) -> str:
            assert instance.host is not None
            with use_instance(instance.host):
                out = await generate([(i * 7 + j) % vocab for j in range(PROMPT_LEN)], steps, ready, go)
            assert len(out) == steps, (len(out), steps)
            return "ok"
        return run

    procs = [runtime.spawn(body(i), program="bench", username="bench") for i in range(count)]
    while len(ready) < count:
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.01)  # the last prefills' schedulers settle
    phase["decode"] = True
    t0, c0 = time.perf_counter(), time.process_time()
    go.set()
    finals = [await p.wait() for p in procs]
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    phase["decode"] = False
    assert all(f.kind == "return" for f in finals), finals[0]
    runtime.check_integrity()
    n = len(full) - 1
    steady = ((full[-1][0] - full[0][0]) / n, (full[-1][1] - full[0][1]) / n) if n > 0 else (cpu / steps,
                                                                                           elapsed / steps)
    return elapsed / steps, cpu / steps, steady, in_engine[0] / steps, len(fired) / steps, fired


def replay(engine: Any, batches: list[ForwardBatch], steps: int) -> float:
    """Seconds per step driving the engine directly with the same batches."""
    t0 = time.perf_counter()
    for batch in batches:
        engine.forward_batch(batch)
    return (time.perf_counter() - t0) / steps


async def start_engine(kind: str, args: argparse.Namespace, tmp: Path) -> tuple[EngineClient, Any, Any]:
    """(client, the real Engine or None, its EngineConfig or None)."""
    pages = max(args.counts) * (-(-(PROMPT_LEN + args.steps + 1) // PAGE_SIZE) + 1) + 16
    if kind == "null" or kind.startswith("sleep:"):
        info = fake_info(num_pages=pages, page_size=PAGE_SIZE, max_batch_size=max(args.counts),
                         max_batch_tokens=max(8192, max(args.counts)))
        client: EngineClient = NullEngine(info) if kind == "null" else SleepEngine(float(kind[6:]), info)
        return client, None, None
    if kind != "real":
        raise SystemExit(f"--engine must be null, sleep:MS or real, got {kind!r}")
    from engine_throughput import write_config

    from pie.engine.config import EngineConfig
    from pie.runtime.engine_client import InProcessEngine

    model_dir = write_config(tmp, "small", "float32")
    config = EngineConfig(model=str(model_dir), device=args.device, dummy_weights=True,
                          max_batch_size=max(args.counts), max_num_kv_pages=pages, cpu_kv_budget_gb=8.0)
    real = await InProcessEngine.start(config)
    return real, real.engine, config


async def run(args: argparse.Namespace) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        client, engine, config = await start_engine(args.engine, args, Path(tmp))
        from pie.engine.config import EngineConfig

        spec = ModelSpec("bench", config or EngineConfig(model="pie/tiny-random"))
        runtime = await Runtime.start(RuntimeConfig((spec,), RuntimeLimits()), engines={"bench": client})
        await measure(runtime, 4, 4)  # warm up
        rows = []
        for count in args.counts:
            runs = []  # runtime and direct alternate, so load changes on a shared host hit both alike
            for _ in range(args.repeats):
                per_step, cpu, steady, in_engine, per_step_batches, batches = await measure(
                    runtime, count, args.steps, keep=engine is not None)
                direct = replay(engine, batches, args.steps) if engine is not None else 0.0
                runs.append((per_step, cpu, steady, in_engine, direct, per_step_batches))
            best = min(runs, key=lambda r: r[2][0] if args.engine == "null" else r[0])  # load only ever adds time
            rows.append(Row(count, best[0] * 1e6, best[1] * 1e6, best[2][0] * 1e6, best[2][1] * 1e6, best[3] * 1e6,
                            best[4] * 1e6, best[5]))
            report(args, rows[-1])
        await runtime.shutdown(0)
        await client.close()
    return rows


def report(args: argparse.Namespace, r: Row) -> None:
    tok_s = r.count / (r.step_us / 1e6)
    if args.engine == "null":
        print(f"RESULT engine=null inferlets={r.count} host_ms_per_step={r.steady_us / 1e3:.3f} "
              f"run_ms_per_step={r.cpu_us / 1e3:.3f} wall_ms_per_step={r.step_us / 1e3:.3f} "
              f"us_per_inferlet={r.steady_us / r.count:.2f} tok_s={tok_s:.0f} runahead={int(not args.no_runahead)}",
              flush=True)
    elif args.engine.startswith("sleep:"):
        ms = float(args.engine[6:])
        bound = r.count / (ms / 1e3)
        steady = r.count / (r.steady_wall_us / 1e6)
        print(f"RESULT engine={args.engine} inferlets={r.count} tok_s={tok_s:.0f} bound_tok_s={bound:.0f} "
              f"of_bound={tok_s / bound:.3f} steady_tok_s={steady:.0f} steady_of_bound={steady / bound:.3f} "
              f"runahead={int(not args.no_runahead)}", flush=True)
    else:
        print(f"RESULT engine=real inferlets={r.count} step_ms={r.step_us / 1e3:.3f} "
              f"host_ms_per_step={r.host_us / 1e3:.3f} direct_ms_per_step={r.direct_us / 1e3:.3f} "
              f"ratio={r.step_us / r.direct_us:.3f} runahead={int(not args.no_runahead)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="null", help="null | sleep:MS | real")
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 32, 256, 1024])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="runs per count; the best is reported")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-runahead", action="store_true", help="the SDK's step-by-step loop (one host call/step)")
    args = ap.parse_args()
    if args.no_runahead:
        inferlet.generation.RUNAHEAD = False
    rows = asyncio.run(run(args))
    print(f"\nruntime overhead per decode step through ctx.generate: engine {args.engine}, {args.steps} steps, "
          f"best of {args.repeats} runs, run-ahead {'off' if args.no_runahead else 'on'}")
    print(f"{'inferlets':>10}{'us/step':>10}{'cpu us':>9}{'steady cpu':>12}{'in engine':>11}{'host us':>9}"
          f"{'us/inferlet':>13}{'batches/step':>14}{'tok/s':>10}{'direct us/step':>16}")
    for r in rows:
        print(f"{r.count:>10}{r.step_us:>10.0f}{r.cpu_us:>9.0f}{r.steady_us:>12.0f}{r.in_engine_us:>11.0f}"
              f"{r.host_us:>9.0f}{r.host_us / r.count:>13.2f}{r.batches_per_step:>14.2f}"
              f"{r.count / (r.step_us / 1e6):>10.0f}{r.direct_us:>16.0f}")
    print("us/step: wall time per step, the whole run; cpu us: this process's CPU time per step, the whole run "
          "(stream starts and stops included); steady cpu: per step while every stream decodes; host us: wall "
          "time per step minus its engine calls (same run); direct: the same batches, no runtime")


if __name__ == "__main__":
    main()
