"""Serving under load: N concurrent clients over loopback against `pie serve`.

For N in --clients (default 1, 16, 64), N clients at once each run one
generation of --max-tokens tokens, first over the WebSocket protocol
(`text-completion` through `pie.client`), then through the OpenAI endpoint
(`/v1/chat/completions` with `stream: true`, over httpx). Per client we take
the time to first token (request sent -> first streamed text) and tokens/s
(tokens / time from request to the end). Greedy decoding, same prompt.

    python bench/serve_load.py                          # starts `pie serve` on the tiny model (CPU)
    python bench/serve_load.py --model Qwen/Qwen3-0.6B --device cuda:0
    python bench/serve_load.py --server ws://127.0.0.1:8080 --model NAME

Prints a table per endpoint and two ratios: aggregate tokens/s at N clients
over 1 client (batching gain), and OpenAI over WebSocket (the HTTP path's
overhead), both measured in this run. For the OpenAI endpoint the client's
TTFT and TPOT (time per output token after the first) percentiles stand beside
the server's own `pie:time_to_first_token_seconds` and
`pie:inter_token_latency_seconds` histograms, scraped from /metrics before and
after each level (percentiles interpolated within the buckets).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pie.client import PieClient
from pie.client.client import http_url

PROMPT = "The history of the city begins with a small market by the river, where"


TTFT, ITL = "pie:time_to_first_token_seconds", "pie:inter_token_latency_seconds"


@dataclass(frozen=True)
class Sample:
    ttft_s: float
    total_s: float
    tokens: int

    @property
    def tpot_s(self) -> float:
        return (self.total_s - self.ttft_s) / max(self.tokens - 1, 1)


def _pct(values: list[float], q: float) -> float:
    return values[int(q * (len(values) - 1))] if values else float("nan")


async def scrape(http: httpx.AsyncClient) -> dict[str, dict[float, float]]:
    """Cumulative bucket counts of the server's TTFT and ITL histograms (summed over models)."""
    text = (await http.get("/metrics")).text
    out: dict[str, dict[float, float]] = {TTFT: {}, ITL: {}}
    for family in text_string_to_metric_families(text):
        if family.name in out:
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    bound = float(sample.labels["le"])
                    out[family.name][bound] = out[family.name].get(bound, 0.0) + sample.value
    return out


def quantile(buckets: dict[float, float], q: float) -> float:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket that holds the rank."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] == 0:
        return float("nan")
    rank, previous_bound, previous_count = q * buckets[bounds[-1]], 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return previous_bound
            width = count - previous_count
            return previous_bound + (bound - previous_bound) * ((rank - previous_count) / width if width else 0.0)
        previous_bound, previous_count = bound, count
    return previous_bound


@dataclass
class Row:
    clients: int
    samples: list[Sample]
    wall_s: float

    server: dict[str, dict[float, float]] | None = None  # histogram -> bucket bound -> count (this level)

    def line(self) -> str:
        ttfts = sorted(s.ttft_s * 1000 for s in self.samples)
        tpots = sorted(s.tpot_s * 1000 for s in self.samples if s.tokens > 1)
        per_client = [s.tokens / s.total_s for s in self.samples if s.total_s > 0]
        tokens = sum(s.tokens for s in self.samples)
        line = (f"{self.clients:>7} {statistics.median(ttfts):>10.1f} {_pct(ttfts, 0.95):>10.1f} "
                f"{_pct(tpots, 0.5):>10.1f} {_pct(tpots, 0.95):>10.1f} "
                f"{statistics.mean(per_client):>12.1f} {tokens / self.wall_s:>12.1f}")
        if self.server:
            ttft, itl = self.server.get(TTFT, {}), self.server.get(ITL, {})
            line += (f"   server ttft p50/p95 {quantile(ttft, 0.5) * 1000:.1f}/{quantile(ttft, 0.95) * 1000:.1f}"
                     f"  itl p50/p95 {quantile(itl, 0.5) * 1000:.1f}/{quantile(itl, 0.95) * 1000:.1f}")
        return line

    @property
    def aggregate(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall_s


async def ws_client(url: str, model: str, max_tokens: int) -> Sample:
    async with PieClient(url) as client:
        await client.authenticate(os.environ.get("USER", "bench"))
        start = time.perf_counter()
        process = await client.launch("text-completion", {"prompt": PROMPT, "max_tokens": max_tokens,
                                                          "temperature": 0.0, "model": model, "stream": True})
        first, chunks, result = None, 0, ""
        async for event in process.events():
            if event.kind in ("stdout", "message") and first is None:
                first = time.perf_counter()
            chunks += event.kind in ("stdout", "message")
            if event.kind == "return":
                result = str(event.value)
            if event.kind == "error":
                raise RuntimeError(f"text-completion failed: {event.value}")
        end = time.perf_counter()
    return Sample((first or end) - start, end - start, _token_count(result, chunks))


async def openai_client(http: httpx.AsyncClient, model: str, max_tokens: int) -> Sample:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    first, tokens = None, 0
    start = time.perf_counter()
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
    end = time.perf_counter()
    return Sample((first or end) - start, end - start, tokens)


def _token_count(result: str, chunks: int) -> int:
    """The inferlet's own count when its return value carries one, else the number of streamed chunks
    (text-completion sends one delta per decoding step that completes a character)."""
    try:
        data = json.loads(result)
    except json.JSONDecodeError:
        return chunks
    if isinstance(data, dict):
        for key in ("completion_tokens", "num_tokens", "tokens_generated"):
            if isinstance(data.get(key), int):
                return int(data[key])
    return chunks


async def run_level(one: Callable[[], Awaitable[Sample]], clients: int) -> Row:
    start = time.perf_counter()
    samples = await asyncio.gather(*(one() for _ in range(clients)))
    return Row(clients, list(samples), time.perf_counter() - start)


async def measure(url: str, model: str, levels: list[int], max_tokens: int) -> dict[str, list[Row]]:
    """WebSocket: one connection per client. OpenAI: one shared HTTP connection pool, as a load balancer
    or an application server would hold (building an httpx client per request costs more CPU than the
    request itself on a small machine)."""
    results: dict[str, list[Row]] = {}
    await ws_client(url, model, 4)  # warm-up (program load, first batch)
    results["websocket"] = [await run_level(lambda: ws_client(url, model, max_tokens), n) for n in levels]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=max(levels))
    async with httpx.AsyncClient(base_url=http_url(url), timeout=600, limits=limits) as http:
        await openai_client(http, model, 4)
        rows = []
        for n in levels:
            before = await scrape(http)
            row = await run_level(lambda: openai_client(http, model, max_tokens), n)
            after = await scrape(http)
            row.server = {name: {b: c - before[name].get(b, 0.0) for b, c in after[name].items()} for name in after}
            rows.append(row)
        results["openai"] = rows
    return results


def report(results: dict[str, list[Row]], device: str, max_tokens: int) -> None:
    print(f"\nserve_load: {max_tokens} tokens per client, greedy, device {device}")
    for name, rows in results.items():
        print(f"\n[{name}]")
        print(f"{'clients':>7} {'ttft p50':>10} {'ttft p95':>10} {'tpot p50':>10} {'tpot p95':>10} "
              f"{'tok/s/client':>12} {'tok/s total':>12}  (ms)")
        for row in rows:
            print(row.line())
        base = rows[0].aggregate
        print("  aggregate vs 1 client: " + ", ".join(f"{r.clients}: {r.aggregate / base:.2f}x" for r in rows))
    ws, oa = results["websocket"], results["openai"]
    print("\nopenai / websocket aggregate tok/s: " +
          ", ".join(f"{a.clients}: {b.aggregate / a.aggregate:.2f}x" for a, b in zip(ws, oa, strict=True)))
    for a, b in zip(ws, oa, strict=True):
        ttft = sorted(x.ttft_s for x in b.samples)
        server = b.server or {}
        print(f"RESULT clients={b.clients} openai_tok_s={b.aggregate:.1f} websocket_tok_s={a.aggregate:.1f} "
              f"openai_over_ws={b.aggregate / a.aggregate:.3f} client_ttft_p50_ms={_pct(ttft, 0.5) * 1000:.1f} "
              f"server_ttft_p50_ms={quantile(server.get(TTFT, {}), 0.5) * 1000:.1f} "
              f"client_tpot_p50_ms={_pct(sorted(x.tpot_s for x in b.samples), 0.5) * 1000:.1f} "
              f"server_itl_p50_ms={quantile(server.get(ITL, {}), 0.5) * 1000:.1f}")


def start_server(model: str, device: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    """`pie serve` in a subprocess on a free port with a temporary config."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = Path(tempfile.mkdtemp(prefix="pie-bench-"))
    config = home / "config.toml"
    config.write_text(f'host = "127.0.0.1"\nport = {port}\n\n[[model]]\nhf_repo = "{model}"\n'
                      f'device = ["{device}"]\n')
    env = {**os.environ, "PIE_HOME": str(home)}
    log = open(home / "serve.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen([sys.executable, "-c", "from pie.cli.main import main; main()", "serve", "-c", str(config)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"ws://127.0.0.1:{port}/v1/ws"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"pie serve exited with {proc.returncode}; see {home / 'serve.log'}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, url, home
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"pie serve did not become healthy in 300 s; see {home / 'serve.log'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--model", default="pie/tiny-random")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--server", help="a running server's URL (skips starting one)")
    args = parser.parse_args()
    proc = None
    url = args.server
    if url is None:
        proc, url, _home = start_server(args.model, args.device)
    try:
        results = asyncio.run(measure(url, args.model, args.clients, args.max_tokens))
        report(results, args.device, args.max_tokens)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)


if __name__ == "__main__":
    main()
