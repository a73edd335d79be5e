"""Start-to-result latency of one isolated inferlet: under bubblewrap vs the weaker in-process sandbox.

Each mode runs in its own child process (the weaker one with no `bwrap` on PATH, so the layer probe
finds none and `allow_weaker` takes over), launching a trivial program `--runs` times one after another
on the tiny CPU model; the table gives the median and the ratio to the weaker mode.

    python bench/sandbox_start.py --runs 10
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROGRAM = "def main(input):\n    return 'ok'\n"


async def inner(runs: int) -> dict[str, object]:
    from pie.engine.config import EngineConfig
    from pie.runtime.instance import Instance
    from pie.runtime.runtime import ModelSpec, Runtime, RuntimeConfig
    from pie.runtime.sandbox import SandboxPolicy
    from pie.runtime.sandbox.server import run_isolated
    from pie.tiny_model import ensure_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        programs = home / "programs" / "trivial"
        programs.mkdir(parents=True)
        (programs / "Pie.toml").write_text('[package]\nname = "trivial"\nversion = "0.1.0"\n')
        (programs / "main.py").write_text(PROGRAM)
        engine = EngineConfig(model=str(ensure_tiny_model(home)), device="cpu", max_num_kv_pages=16)
        rt = await Runtime.start(RuntimeConfig((ModelSpec("tiny", engine),), inferlet_paths=(home / "programs",),
                                               pie_home=home))
        policy = SandboxPolicy(allow_weaker=True, scratch_root=home / "scratch")
        program = rt.registry.resolve("trivial")
        modes: list[str] = []

        async def body(instance: Instance) -> str:
            assert instance.host is not None
            return await run_isolated(program, "{}", instance.host, instance.emit, policy, username="bench",
                                      instance_id=instance.id, on_ready=lambda m: modes.append(m["sandbox"]))

        times = []
        try:
            for i in range(runs + 1):  # the first one also pays for the layer probe
                start = time.perf_counter()
                final = await rt.spawn(body, program="trivial", username="bench").wait()
                assert final.kind == "return", final.value
                if i:
                    times.append(time.perf_counter() - start)
        finally:
            await rt.shutdown(0)
        return {"mode": modes[-1], "median_s": statistics.median(times), "min_s": min(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        print(json.dumps(asyncio.run(inner(args.runs))))
        return
    results = {}
    for name, path in (("weaker", tempfile.mkdtemp()), ("bwrap", os.environ.get("PATH", ""))):
        out = subprocess.run([sys.executable, __file__, "--inner", "--runs", str(args.runs)], capture_output=True,
                             text=True, env={**os.environ, "PATH": path}, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    base = float(results["weaker"]["median_s"])  # type: ignore[arg-type]
    print(f"{'sandbox':<10} {'started as':<10} {'median s':>9} {'min s':>7} {'ratio':>6}")
    for name, r in results.items():
        print(f"{name:<10} {r['mode']:<10} {r['median_s']:>9.3f} {r['min_s']:>7.3f} {float(r['median_s']) / base:>6.2f}")
    print(f"RESULT sandbox_start_weaker_s={base:.3f} sandbox_start_bwrap_s={results['bwrap']['median_s']:.3f} "
          f"ratio={float(results['bwrap']['median_s']) / base:.2f}")


if __name__ == "__main__":
    main()
