"""Soak: N clients generating for a fixed time against a `pie serve` it starts; memory and pages must stay flat.

    python bench/soak.py                                  # 64 clients for 60 s on the tiny model (CPU)
    python bench/soak.py --clients 8 --duration 10 --openai-share 0.5

Each client keeps one WebSocket connection and launches `text-completion`
generations back to back (--max-tokens each, random temperature); a share of
the clients (--openai-share) uses `/v1/chat/completions` instead. Server RSS
and KV pages in use are sampled every --sample-s seconds. After the clients
stop, the server gets --settle-s to release what it holds, then RSS and pages
are read again.

Prints completions and errors per client kind, the RSS and pages timeline,
and RESULT lines: completions, errors, generations/s, RSS and pages before
and after (and the RSS growth in MiB). Only loopback is used; the script
stops its server by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_process import ServeProcess, raise_fd_limit

from pie.client import PieClient

PROMPTS = ["Tell me about the river", "Once upon a time", "The engine batch", "Hello there", "A list of words:"]


async def ws_client(url: str, stop_at: float, args: argparse.Namespace, counts: Counter[str], seed: int) -> None:
    rng = random.Random(seed)
    async with PieClient(url) as client:
        await client.authenticate(f"soak{seed}")
        while time.monotonic() < stop_at:
            try:
                process = await client.launch("text-completion", {
                    "prompt": rng.choice(PROMPTS), "max_tokens": args.max_tokens,
                    "temperature": rng.choice([0.0, 0.7, 1.0])})
                events = [e async for e in process.events()]
                counts["ws_completions" if events and events[-1].kind == "return" else "ws_errors"] += 1
            except Exception as error:  # counted and reported: the soak measures failures
                counts["ws_errors"] += 1
                counts[f"error: {type(error).__name__}"] += 1


async def openai_client(http_url: str, model: str, stop_at: float, args: argparse.Namespace,
                        counts: Counter[str], seed: int) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=http_url, timeout=300) as http:
        while time.monotonic() < stop_at:
            body = {"model": model, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                    "max_tokens": args.max_tokens, "temperature": rng.choice([0.0, 0.7, 1.0])}
            try:
                reply = await http.post("/v1/chat/completions", json=body)
                ok = reply.status_code == 200 and bool(reply.json().get("choices"))
                counts["openai_completions" if ok else "openai_errors"] += 1
            except Exception as error:  # counted and reported
                counts["openai_errors"] += 1
                counts[f"error: {type(error).__name__}"] += 1


async def sampler(server: ServeProcess, stop: asyncio.Event, every_s: float,
                  timeline: list[tuple[float, float, int]]) -> None:
    start = time.monotonic()
    while not stop.is_set():
        timeline.append((time.monotonic() - start, server.rss_mib(), await asyncio.to_thread(server.pages_used)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)


async def run(args: argparse.Namespace, server: ServeProcess) -> dict[str, object]:
    counts: Counter[str] = Counter()
    async with PieClient(server.url) as warm:  # load everything once before measuring
        await warm.authenticate("warmup")
        [e async for e in (await warm.launch("text-completion", {"prompt": "hi", "max_tokens": 2})).events()]
    rss0, pages0 = server.rss_mib(), server.pages_used()
    n_openai = round(args.clients * args.openai_share)
    start = time.monotonic()
    stop_at = start + args.duration
    timeline: list[tuple[float, float, int]] = []
    stop = asyncio.Event()
    watch = asyncio.create_task(sampler(server, stop, args.sample_s, timeline))
    clients = [openai_client(server.http_url, args.model, stop_at, args, counts, i) for i in range(n_openai)]
    clients += [ws_client(server.url, stop_at, args, counts, i) for i in range(n_openai, args.clients)]
    await asyncio.gather(*clients)
    wall_s = time.monotonic() - start
    stop.set()
    await watch
    await asyncio.sleep(args.settle_s)
    return {"counts": counts, "wall_s": wall_s, "rss0": rss0, "pages0": pages0, "rss1": server.rss_mib(),
            "pages1": server.pages_used(), "timeline": timeline, "n_openai": n_openai}


def report(out: dict[str, object], server: ServeProcess, args: argparse.Namespace) -> bool:
    counts: Counter[str] = out["counts"]  # type: ignore[assignment]
    timeline: list[tuple[float, float, int]] = out["timeline"]  # type: ignore[assignment]
    wall_s = float(out["wall_s"])  # type: ignore[arg-type]
    print(f"{args.clients} clients ({out['n_openai']} OpenAI, the rest WebSocket) for {wall_s:.1f} s, "
          f"{args.max_tokens} tokens each\n")
    print(f"{'kind':<10} {'completions':>12} {'errors':>8}")
    for kind in ("ws", "openai"):
        print(f"{kind:<10} {counts[kind + '_completions']:>12} {counts[kind + '_errors']:>8}")
    for key, value in sorted(counts.items()):
        if key.startswith("error: "):
            print(f"  {key}: {value}")
    print(f"\n{'t_s':>7} {'rss_mib':>9} {'pages':>7}")
    for t, rss, pages in timeline:
        print(f"{t:>7.1f} {rss:>9.1f} {pages:>7}")
    completions = counts["ws_completions"] + counts["openai_completions"]
    errors = counts["ws_errors"] + counts["openai_errors"]
    logs = server.log_counts()
    alive = server.alive()
    growth = float(out["rss1"]) - float(out["rss0"])  # type: ignore[arg-type]
    print(f"\nafter {args.settle_s:g} s to settle: RSS {out['rss0']:.1f} -> {out['rss1']:.1f} MiB ({growth:+.1f}), "
          f"KV pages in use {out['pages0']} -> {out['pages1']}; log tracebacks {logs['tracebacks']}")
    print(f"RESULT clients={args.clients} duration_s={wall_s:.1f} completions={completions} errors={errors} "
          f"generations_per_s={completions / wall_s:.2f} crashes={0 if alive else 1} tracebacks={logs['tracebacks']}")
    print(f"RESULT rss_before_mib={out['rss0']:.1f} rss_after_mib={out['rss1']:.1f} rss_growth_mib={growth:.1f} "
          f"rss_peak_mib={max((r for _, r, _ in timeline), default=float('nan')):.1f} "
          f"pages_before={out['pages0']} pages_after={out['pages1']}")
    ok = alive and errors == 0 and out["pages1"] == out["pages0"]
    print(f"RESULT ok={int(ok)}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds the clients keep generating")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--openai-share", type=float, default=0.25, help="share of clients on the OpenAI API")
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--settle-s", type=float, default=3.0)
    parser.add_argument("--model", default="pie/tiny-random")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    raise_fd_limit(args.clients * 2 + 256)
    server = ServeProcess(args.model, args.device)
    try:
        ok = report(asyncio.run(run(args, server)), server, args)
    finally:
        code = server.stop()
    print(f"RESULT server_exit_code={code}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
