"""A well-behaved neighbour's latency while one misbehaving inferlet runs beside it, against its solo latency.

Each hog (page hog, context hog, fork loop, message flood, a KeyboardInterrupt in a spawned task) is
launched with the default [runtime] limits beside a `text-completion` neighbour on the built-in tiny
model (CPU); the table gives the neighbour's median latency over `--repeats` runs, its ratio to the
solo median measured in the same process, and how the hog ended.

    python bench/tenancy_neighbour.py --repeats 5 --max-tokens 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pie.engine.config import EngineConfig
from pie.runtime.runtime import ModelSpec, Runtime, RuntimeConfig, RuntimeLimits
from pie.tiny_model import ensure_tiny_model

HOGS = {
    "page-hog": """
        from inferlet import Context, Model

        async def main(input):
            ctx = Context(Model.load(""))
            while True:
                ctx.append(list(range(100, 116)) * 8)
                await ctx.flush()
    """,
    "context-hog": """
        from inferlet import Context, Model

        def main(input):
            model = Model.load("")
            return len([Context(model) for _ in range(10**6)])
    """,
    "fork-loop": """
        from inferlet import Context, Model

        def main(input):
            ctx = Context(Model.load(""))
            while True:
                ctx.fork().release()
    """,
    "message-flood": """
        from inferlet import messaging

        def main(input):
            while True:
                messaging.push("flood", "x" * 1_000_000)
    """,
    "spawned-interrupt": """
        import asyncio

        async def boom():
            raise KeyboardInterrupt

        async def main(input):
            asyncio.create_task(boom())
            await asyncio.sleep(60)
    """,
}


async def neighbour(rt: Runtime, max_tokens: int) -> float:
    start = time.perf_counter()
    process = await rt.launch("text-completion", json.dumps({"prompt": "Count to three.", "max_tokens": max_tokens}),
                              username="carol")
    final = await process.wait()
    assert final.kind == "return", final.value
    return time.perf_counter() - start


async def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="pie-bench-"))
    tiny = ensure_tiny_model(root / "home")
    for name, source in HOGS.items():
        (root / "programs" / name).mkdir(parents=True)
        (root / "programs" / name / "Pie.toml").write_text(f'[package]\nname = "{name}"\nversion = "0.1.0"\n')
        (root / "programs" / name / "main.py").write_text(textwrap.dedent(source))
    engine = EngineConfig(model=str(tiny), device="cpu", max_num_kv_pages=args.pages)
    rt = await Runtime.start(RuntimeConfig((ModelSpec("tiny", engine),), RuntimeLimits(),
                                           inferlet_paths=(root / "programs",), pie_home=root / "home"))
    try:
        await neighbour(rt, args.max_tokens)  # warm-up
        solo = statistics.median([await neighbour(rt, args.max_tokens) for _ in range(args.repeats)])
        rows = []
        for name in HOGS:
            times, outcome = [], ""
            for _ in range(args.repeats):
                hog = await rt.launch(name, "{}", username="mallory")
                times.append(await neighbour(rt, args.max_tokens))
                final = await hog.wait()
                outcome = _outcome(final.kind, str(final.value))
            rows.append((name, statistics.median(times), outcome))
    finally:
        await rt.shutdown(0)
    print(f"{'hog':<18} {'neighbour s':>11} {'x solo':>7}  hog's end")
    print(f"{'(none)':<18} {solo:>11.3f} {1.0:>7.2f}")
    for name, t, outcome in rows:
        print(f"{name:<18} {t:>11.3f} {t / solo:>7.2f}  {outcome}")
    worst = max(t for _, t, _ in rows) / solo
    print(f"RESULT solo_s={solo:.3f} worst_ratio={worst:.2f} "
          + " ".join(f"{name}_ratio={t / solo:.2f}" for name, t, _ in rows))


def _outcome(kind: str, value: str) -> str:
    """How a hog ended: the limit key its error names, else its exception's name."""
    if kind != "error":
        return "returned"
    key = re.search(r"\[runtime\] (\w+)", value)
    if key:
        return f"stopped by {key.group(1)}"
    exception = re.search(r"(\w+(?:Error|Interrupt|Exit))", value)
    return f"ended by {exception.group(1)}" if exception else value.splitlines()[0][:60]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--pages", type=int, default=256)
    asyncio.run(main(parser.parse_args()))
