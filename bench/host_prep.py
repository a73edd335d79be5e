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
runtime page table can hand over).
Every configuration ends with a `RESULT` line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure(batches: list[int], pages: int, page_size: int, repeats: int, device: str) -> dict[str, dict[str, float]]:
    """{batch: {prepare_ms, upload_ms, plan_ms[, validated_ms, array_pages_ms]}} with whatever `pie` is importable."""
    return {str(b): _measure_batch(b, pages, page_size, repeats, device) for b in batches}


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
    row = {"prepare_ms": _median_ms(lambda: prepare(batch, limits, rng), repeats),
           "upload_ms": _median_ms(upload, repeats),
           "plan_ms": _median_ms(lambda: backend.plan(prep.layout), repeats)}
    if "validated" in getattr(ForwardBatch, "__dataclass_fields__", {}):
        checked = ForwardBatch(reqs, validated=True)
        row["validated_ms"] = _median_ms(lambda: prepare(checked, limits, rng), repeats)
        arrays = ForwardBatch([Request(r.tokens, r.positions, np.asarray(r.page_ids, np.int32), r.last_page_len,
                                       r.outputs, seed=r.seed) for r in reqs], validated=True)
        row["array_pages_ms"] = _median_ms(lambda: prepare(arrays, limits, rng), repeats)
    return row


def measure_revision(rev: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """The same measurement on `rev`'s pie package, in a subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "pie"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        env = {**os.environ, "PYTHONPATH": tmp}
        cmd = [sys.executable, __file__, "--json", "--pages", str(args.pages), "--page-size", str(args.page_size),
               "--repeats", str(args.repeats), "--device", args.device, "--batches", *map(str, args.batches)]
        res = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd=tmp)
        return json.loads(res.stdout.strip().splitlines()[-1])


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
    if not args.json:
        sys.path.insert(0, str(REPO))
    now = measure(args.batches, args.pages, args.page_size, args.repeats, args.device)
    if args.json:
        print(json.dumps(now))
        return
    before = measure_revision(args.against, args) if args.against else {}
    print(f"\nhost prep per decode step: {args.pages} pages/row, page size {args.page_size}, {args.device}, "
          f"median of {args.repeats}")
    print(f"{'batch':>6} {'tree':>10} {'prepare':>9} {'upload':>8} {'prep+up':>8} {'plan':>8} {'validated':>10} "
          f"{'+arrays':>8}")
    for b in map(str, args.batches):
        for name, res in (("before", before.get(b)), ("after", now[b])):
            if res is None:
                continue
            total = res["prepare_ms"] + res["upload_ms"]
            validated = f"{res['validated_ms']:>10.3f}" if "validated_ms" in res else f"{'-':>10}"
            arrays = f"{res['array_pages_ms']:>8.3f}" if "array_pages_ms" in res else f"{'-':>8}"
            print(f"{b:>6} {name:>10} {res['prepare_ms']:>9.3f} {res['upload_ms']:>8.3f} {total:>8.3f} "
                  f"{res['plan_ms']:>8.3f} {validated} {arrays}")
    for b in map(str, args.batches):
        res = now[b]
        line = (f"RESULT bench=host_prep batch={b} pages={args.pages} prepare_ms={res['prepare_ms']:.3f} "
                f"upload_ms={res['upload_ms']:.3f} plan_ms={res['plan_ms']:.3f}")
        if "validated_ms" in res:
            line += (f" validated_prepare_ms={res['validated_ms']:.3f}"
                     f" validated_array_pages_prepare_ms={res['array_pages_ms']:.3f}")
        if b in before:
            old = before[b]["prepare_ms"] + before[b]["upload_ms"]
            line += f" before_prep_upload_ms={old:.3f} speedup={old / (res['prepare_ms'] + res['upload_ms']):.2f}"
        print(line)


if __name__ == "__main__":
    main()
