"""Host time the engine spends preparing one decode step: prepare (checks + flattening) and the upload.

Decode rows of `--pages` pages each (128 by default, as in issue 13), one top-p
sampler per row, at batch 1, 32 and 256. Measured for the checkout this script
runs in and, with `--against REV`, for the same measurement on another
revision's `pie` package (extracted with `git archive` into a temp dir and
run in a subprocess), so the table has a before and an after from one run.

    python bench/host_prep.py                      # this tree only
    python bench/host_prep.py --against c973476    # and the baseline revision

Columns: prepare (ms, median), upload (ms: the step's host->device copy of the
index arrays), plan (ms: torch_ref's attention plan, host side), and for this
tree prepare of a batch marked `validated` (the runtime's checked batches),
also with page tables held as numpy arrays (+arrays: what an incremental
runtime page table can hand over), and step (ms: a whole `forward_batch` on
the built-in tiny model, whose compute is small: the engine's host work end to
end, result path included; on CPU no copy is a real sync).
Every configuration ends with a `RESULT` line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from timing import median_ms

REPO = Path(__file__).resolve().parent.parent


def measure(batches: list[int], pages: int, page_size: int, repeats: int, device: str) -> dict[str, dict[str, float]]:
    """{batch: {prepare_ms, upload_ms, plan_ms[, validated_ms, array_pages_ms]}} with whatever `pie` is importable."""
    out = {str(b): _measure_batch(b, pages, page_size, repeats, device) for b in batches}
    with tempfile.TemporaryDirectory() as home:
        for b in batches:
            out[str(b)]["step_ms"] = _measure_step(b, pages, repeats, device, Path(home))
    return out


def _measure_step(b: int, pages: int, repeats: int, device: str, home: Path) -> float:
    """A whole `forward_batch` decode step on the built-in tiny model (2 layers, hidden 64): its compute is
    small, so the step time is mostly the engine's host work, result path included."""
    from pie.engine.batch import ForwardBatch, OutputSpec, Request, Sampler
    from pie.engine.config import EngineConfig
    from pie.engine.engine import Engine
    from pie.tiny_model import ensure_tiny_model

    model = ensure_tiny_model(home)
    engine = Engine(EngineConfig(model=str(model), device=device, max_num_kv_pages=b * pages + 1,
                                 max_batch_size=max(b, 1), cpu_kv_budget_gb=4.0))
    ps = engine.info.page_size
    reqs = [Request(tokens=[5], positions=[pages * ps - 1], page_ids=list(range(i * pages, (i + 1) * pages)),
                    last_page_len=ps, outputs=[OutputSpec(0, Sampler("top_p", 0.7, top_p=0.9))], seed=i)
            for i in range(b)]
    batch = ForwardBatch(reqs)
    return median_ms(lambda: engine.forward_batch(batch), max(5, repeats // 3), warmup=3)


def _measure_batch(b: int, pages: int, page_size: int, repeats: int, device: str) -> dict[str, float]:
    import numpy as np
    import torch

    from pie.engine.attention.base import AttentionLayerSpec, AttentionShape
    from pie.engine.attention.torch_ref import TorchRefBackend
    from pie.engine.batch import ForwardBatch, OutputSpec, Request, Sampler
    from pie.engine.batch_prep import Limits, prepare

    dev = torch.device(device)
    backend = TorchRefBackend(AttentionShape(8, 4, 64, page_size, torch.float32, dev), [AttentionLayerSpec(0.125)])
    limits = Limits(b * pages, page_size, 32000, 8192, max(b, 1), 32, 8)
    reqs = [Request(tokens=[5], positions=[pages * page_size - 1], page_ids=list(range(i * pages, (i + 1) * pages)),
                    last_page_len=page_size, outputs=[OutputSpec(0, Sampler("top_p", 0.7, top_p=0.9))], seed=i)
            for i in range(b)]
    batch, rng = ForwardBatch(reqs), random.Random(0)
    prep = prepare(batch, limits, rng)
    upload: Callable[[], object]
    if hasattr(prep, "packed"):  # one packed int32 buffer through the engine's staging
        from pie.engine.transfer import Staging

        staging = Staging(dev)
        upload = lambda: staging.upload(prep.packed.host)  # noqa: E731
    else:  # the four index rows as one int64 array, as the engine copied them before
        upload = lambda: torch.from_numpy(  # noqa: E731
            np.stack([prep.tokens, prep.positions, prep.write_page, prep.write_offset])).to(dev, non_blocking=True)
    row = {"prepare_ms": median_ms(lambda: prepare(batch, limits, rng), repeats, warmup=3),
           "upload_ms": median_ms(upload, repeats, warmup=3),
           "plan_ms": median_ms(lambda: backend.plan(prep.layout), repeats, warmup=3)}
    if "validated" in getattr(ForwardBatch, "__dataclass_fields__", {}):
        checked = ForwardBatch(reqs, validated=True)
        row["validated_ms"] = median_ms(lambda: prepare(checked, limits, rng), repeats, warmup=3)
        arrays = ForwardBatch([Request(r.tokens, r.positions, np.asarray(r.page_ids, np.int32), r.last_page_len,
                                       r.outputs, seed=r.seed) for r in reqs], validated=True)
        row["array_pages_ms"] = median_ms(lambda: prepare(arrays, limits, rng), repeats, warmup=3)
    return row


def measure_tree(pythonpath: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """The measurement with `pythonpath`'s pie, one subprocess per batch size: a process that has just
    worked through 32,768-page batches runs later small steps several times slower, which would skew the
    small rows of the table."""
    out: dict[str, dict[str, float]] = {}
    for b in args.batches:
        cmd = [sys.executable, __file__, "--json", "--pages", str(args.pages), "--page-size", str(args.page_size),
               "--repeats", str(args.repeats), "--device", args.device, "--batches", str(b)]
        res = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": pythonpath}, check=True, capture_output=True,
                             text=True, cwd=tempfile.gettempdir())
        out |= json.loads(res.stdout.strip().splitlines()[-1])
    return out


def measure_revision(rev: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """The same measurement on `rev`'s pie package (extracted with git archive)."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "pie"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        return measure_tree(tmp, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--pages", type=int, default=128, help="pages per row")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--against", default=None, help="a git revision to measure in the same run (the baseline)")
    ap.add_argument("--json", action="store_true", help="print only the measurement as JSON (used for --against)")
    args = ap.parse_args()
    if args.json:
        print(json.dumps(measure(args.batches, args.pages, args.page_size, args.repeats, args.device)))
        return
    now = measure_tree(str(REPO), args)
    before = measure_revision(args.against, args) if args.against else {}
    print(f"\nhost prep per decode step: {args.pages} pages/row, page size {args.page_size}, {args.device}, "
          f"median of {args.repeats}")
    print(f"{'batch':>6} {'tree':>10} {'prepare':>9} {'upload':>8} {'prep+up':>8} {'plan':>8} {'validated':>10} "
          f"{'+arrays':>8} {'step':>8}")
    for b in map(str, args.batches):
        for name, res in (("before", before.get(b)), ("after", now[b])):
            if res is None:
                continue
            total = res["prepare_ms"] + res["upload_ms"]
            validated = f"{res['validated_ms']:>10.3f}" if "validated_ms" in res else f"{'-':>10}"
            arrays = f"{res['array_pages_ms']:>8.3f}" if "array_pages_ms" in res else f"{'-':>8}"
            print(f"{b:>6} {name:>10} {res['prepare_ms']:>9.3f} {res['upload_ms']:>8.3f} {total:>8.3f} "
                  f"{res['plan_ms']:>8.3f} {validated} {arrays} {res['step_ms']:>8.3f}")
    for b in map(str, args.batches):
        res = now[b]
        line = (f"RESULT bench=host_prep batch={b} pages={args.pages} prepare_ms={res['prepare_ms']:.3f} "
                f"upload_ms={res['upload_ms']:.3f} plan_ms={res['plan_ms']:.3f}")
        if "validated_ms" in res:
            line += (f" validated_prepare_ms={res['validated_ms']:.3f}"
                     f" validated_array_pages_prepare_ms={res['array_pages_ms']:.3f}")
        if b in before:
            old = before[b]["prepare_ms"] + before[b]["upload_ms"]
            line += (f" before_prep_upload_ms={old:.3f} speedup={old / (res['prepare_ms'] + res['upload_ms']):.2f}"
                     f" step_ms={res['step_ms']:.3f} before_step_ms={before[b]['step_ms']:.3f}"
                     f" step_speedup={before[b]['step_ms'] / res['step_ms']:.2f}")
        else:
            line += f" step_ms={res['step_ms']:.3f}"
        print(line)


if __name__ == "__main__":
    main()
