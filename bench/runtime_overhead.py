"""Per-step runtime overhead: N inferlets decoding through the Host API vs the engine driven directly.

Each of N instances prefills a short prompt, waits until all have, then
decodes `--steps` tokens greedily the way the SDK does it (reserve, forward,
commit through `InstanceHost`), so every step is one engine batch of N rows.
The runtime's per-step time is the wall time of that decode phase over the
steps. The baseline replays exactly the batches the runtime fired, straight on
`Engine.forward_batch` in this thread. The difference is what the runtime adds
per step: host calls, scheduling, page bookkeeping, the event loop, the hop to
the engine thread.

    python bench/runtime_overhead.py                 # CPU, the small model (hidden 512, 8 layers)
    python bench/runtime_overhead.py --counts 1 32 256 --steps 32
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine_throughput import write_config

from pie.engine.batch import ForwardBatch
from pie.engine.config import EngineConfig
from pie.runtime.engine_client import InProcessEngine
from pie.runtime.instance import Instance
from pie.runtime.runtime import ModelSpec, Runtime, RuntimeConfig, RuntimeLimits

PROMPT_LEN = 24
ARGMAX = [{"indices": [0], "sampler": {"kind": "argmax"}}]


@dataclass
class Row:
    count: int
    runtime_us: float  # wall time per decode step through the runtime
    in_engine_us: float  # of which: the engine call (forward on the engine thread, hop included)
    direct_us: float  # the same batches on Engine.forward_batch, no runtime

    @property
    def host_us(self) -> float:
        """What the runtime adds around the engine call, measured within the same run."""
        return self.runtime_us - self.in_engine_us


async def decode(instance: Instance, prompt: list[int], steps: int, ready: list[int], go: asyncio.Event) -> str:
    """The SDK's calls for a prompt and `steps` greedy tokens (Forward.execute: reserve, forward, commit)."""
    host = instance.host
    assert host is not None
    ctx = host.ctx_create("")
    ps = host.ctx_page_size(ctx)
    token = await step(host, ctx, prompt, ps, [{"indices": [len(prompt) - 1], "sampler": {"kind": "argmax"}}])
    ready.append(1)
    await go.wait()
    for _ in range(steps):
        token = await step(host, ctx, [token], ps, ARGMAX)
    return "ok"


async def step(host: Any, ctx: int, tokens: list[int], ps: int, slots: list[dict[str, Any]]) -> int:
    committed, working, working_tokens = host.ctx_state(ctx)
    need = -(-(working_tokens + len(tokens)) // ps) - working
    if need > 0:
        host.ctx_reserve(ctx, need)
    start = committed * ps + working_tokens
    values = await host.ctx_forward(ctx, {"tokens": tokens, "positions": list(range(start, start + len(tokens))),
                                          "slots": slots})
    _, _, working_tokens = host.ctx_state(ctx)
    if working_tokens >= ps:
        host.ctx_commit(ctx, working_tokens // ps)
    return int(values[0])


async def measure(client: InProcessEngine, count: int, steps: int) -> tuple[float, float, list[ForwardBatch]]:
    """Seconds per decode step through the runtime, of which in the engine call, and the batches fired."""
    config = RuntimeConfig((ModelSpec("bench", client.engine.config),), RuntimeLimits())
    runtime = await Runtime.start(config, engines={"bench": client})
    fired: list[ForwardBatch] = []
    in_engine = [0.0]
    phase = {"decode": False}

    def on_batch(batch: ForwardBatch, _result: object, seconds: float) -> None:
        if phase["decode"]:
            fired.append(batch)
            in_engine[0] += seconds

    runtime.model().scheduler.on_batch = on_batch
    ready: list[int] = []
    go = asyncio.Event()
    vocab = client.info.vocab_size
    procs = [runtime.spawn(lambda inst, i=i: decode(inst, [(i * 7 + j) % vocab for j in range(PROMPT_LEN)],
                                                     steps, ready, go), program="bench", username="bench")
             for i in range(count)]
    while len(ready) < count:
        await asyncio.sleep(0.001)
    phase["decode"] = True
    t0 = time.perf_counter()
    go.set()
    finals = [await p.wait() for p in procs]
    elapsed = time.perf_counter() - t0
    assert all(f.kind == "return" for f in finals), finals[0]
    await runtime.shutdown(0)
    return elapsed / steps, in_engine[0] / steps, fired


def replay(client: InProcessEngine, batches: list[ForwardBatch], steps: int) -> float:
    """Seconds per step driving the engine directly with the same batches."""
    engine = client.engine
    t0 = time.perf_counter()
    for batch in batches:
        engine.forward_batch(batch)
    return (time.perf_counter() - t0) / steps


async def run(args: argparse.Namespace) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_config(Path(tmp), "small", "float32")
        pages = max(args.counts) * (-(-(PROMPT_LEN + args.steps + 1) // 16) + 1) + 16
        client = await InProcessEngine.start(EngineConfig(
            model=str(model_dir), device=args.device, dummy_weights=True, max_batch_size=max(args.counts),
            max_num_kv_pages=pages, cpu_kv_budget_gb=8.0))
        await measure(client, 4, 4)  # warm up allocator and kernels
        rows = []
        for count in args.counts:
            runs = []  # runtime and direct alternate, so load changes on a shared host hit both alike
            for _ in range(args.repeats):
                per_step, in_engine, batches = await measure(client, count, args.steps)
                runs.append((per_step, in_engine, replay(client, batches, args.steps)))
            rows.append(Row(count, *(statistics.median(r[i] for r in runs) * 1e6 for i in range(3))))
        await client.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="runs per count; the median is reported")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    rows = asyncio.run(run(args))
    print(f"\nruntime overhead per decode step: small model (hidden 512, 8 layers), {args.device}, "
          f"{args.steps} steps, median of {args.repeats} runs")
    print(f"{'inferlets':>10}{'runtime us/step':>17}{'in engine':>11}{'host us':>9}{'us/inferlet':>13}"
          f"{'host %':>8}{'direct us/step':>16}{'ratio':>7}")
    for r in rows:
        print(f"{r.count:>10}{r.runtime_us:>17.0f}{r.in_engine_us:>11.0f}{r.host_us:>9.0f}"
              f"{r.host_us / r.count:>13.1f}{100 * r.host_us / r.in_engine_us:>7.1f}%"
              f"{r.direct_us:>16.0f}{r.runtime_us / r.direct_us:>7.3f}")
    print("host us: runtime wall time per step minus its engine calls (same run); ratio: runtime / direct")


if __name__ == "__main__":
    main()
