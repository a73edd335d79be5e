"""Protocol fuzzing: malformed frames of every kind and idle connections against a `pie serve` it starts.

    python bench/fuzz_protocol.py                       # 10,000 frames, 1,000 idle connections
    python bench/fuzz_protocol.py --frames 500 --idle 50 --header-timeout 2

1. Starts `pie serve` on the tiny model (127.0.0.1, port 0 bound by the server; auth off, the default)
   and runs one well-behaved generation as the baseline.
2. Sends --frames malformed frames round-robin over the kinds below, pipelined over --connections
   authenticated WebSockets, and counts the server's typed answers (a `response` with ok = false, or a
   `protocol_error`). Every frame of these kinds must get exactly one.
   Kinds: random bytes, wrong shapes, huge declared lengths, deep nesting (msgpack and JSON input),
   unknown types, missing corr_id, text frames, bad values (NaN, lone surrogates, bad UTF-8); and
   oversized frames (over max_frame_bytes), each on its own connection, which the server must close
   with 1009.
3. Holds --idle idle connections (half raw TCP that never sends headers, half WebSockets that never
   authenticate), checks a well-behaved client is served meanwhile, then waits for the server's header
   and auth timeouts to close them.
4. Checks the server is alive and still serves; reports tracebacks and internal errors in its log, RSS
   and KV pages in use before and after. Ends with RESULT lines.

Only loopback is used; the script stops its server and its connections by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import msgpack
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_process import ServeProcess, raise_fd_limit

from pie.client import PieClient

MAX_FRAME_BYTES = 1024 * 1024  # the server's max_frame_bytes in this run (oversized frames are just over)
SYNC_CORR_ID = 2**31 - 1
Frame = bytes | str


def _pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def random_bytes(rng: random.Random, n: int) -> Frame:
    return rng.randbytes(rng.randint(1, 512))


def wrong_shape(rng: random.Random, n: int) -> Frame:
    return rng.choice([
        _pack([1, 2, 3]), _pack("launch_process"), _pack(42), _pack(None), _pack({"corr_id": n}),
        _pack({"type": 5, "corr_id": n}), _pack({"type": "launch_process", "corr_id": n, "inferlet": 123}),
        _pack({"type": "add_program", "corr_id": n, "program_hash": "x", "manifest": "", "chunk_index": "0",
               "total_chunks": 1, "chunk_data": b""}),
        _pack({"type": "ping", "corr_id": True}), _pack({"type": "attach_process", "corr_id": n, "process_id": []}),
    ])


def huge_lengths(rng: random.Random, n: int) -> Frame:
    big = struct.pack(">I", 2**32 - 1)
    head = rng.choice([b"\xdd", b"\xdf", b"\xdb", b"\xc6", b"\xc9"])  # array32, map32, str32, bin32, ext32
    inner = _pack({"type": "ping", "corr_id": n})[:-1]  # a map whose last value is cut off ...
    return rng.choice([head + big + b"\x00" * 8, inner[:1] + inner[1:] + head + big])  # ... for a huge one


def deep_nesting(rng: random.Random, n: int) -> Frame:
    depth = rng.choice([65, 1_000, 100_000])  # JSON input may nest 64 deep (pie.server.safe_json.MAX_DEPTH)
    return rng.choice([
        b"\x91" * depth + b"\xc0",
        _pack({"type": "ping", "corr_id": n, "x": _nested(min(depth, 100))}),
        _pack({"type": "launch_process", "corr_id": n, "inferlet": "text-completion",
               "input": "[" * depth + "]" * depth}),
        _pack({"type": "launch_process", "corr_id": n, "inferlet": "text-completion",
               "input": '{"a":' * depth + "1" + "}" * depth}),
    ])


def _nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def unknown_type(rng: random.Random, n: int) -> Frame:
    return _pack({"type": rng.choice(["launch_rocket", "", "PING", "auth_identify2", "x" * 1000]), "corr_id": n})


def missing_corr_id(rng: random.Random, n: int) -> Frame:
    return _pack(rng.choice([{"type": "launch_process", "inferlet": "text-completion"}, {"type": "ping"},
                             {"type": "query", "subject": "models"}, {"type": "signal_process"},
                             {"type": "terminate_process", "process_id": "p1"}]))


def text_frame(rng: random.Random, n: int) -> Frame:
    return rng.choice([json.dumps({"type": "ping", "corr_id": n}), "hello", "\u0000" * 10, "é" * 1000])


def bad_values(rng: random.Random, n: int) -> Frame:
    if rng.random() < 0.25:  # a str header over bytes that are not UTF-8
        return b"\x82\xa4type\xa4ping\xa7corr_id\xa2\xff\xfe"
    text = rng.choice(['{"prompt": "x", "temperature": NaN}', '{"prompt": "\\ud800"}', '{"priority": Infinity}',
                       '{"prompt": "x", "temperature": 1e999}', '{"prompt": "' + "9" * 5000 + '"', "{"])
    return _pack({"type": "launch_process", "corr_id": n, "inferlet": "text-completion", "input": text})


KINDS: dict[str, Callable[[random.Random, int], Frame]] = {
    "random_bytes": random_bytes, "wrong_shape": wrong_shape, "huge_lengths": huge_lengths,
    "deep_nesting": deep_nesting, "unknown_type": unknown_type, "missing_corr_id": missing_corr_id,
    "text_frame": text_frame, "bad_values": bad_values,
}


async def well_behaved(url: str) -> float:
    """One short generation; its latency in seconds (raises if it is not served)."""
    start = time.perf_counter()
    async with PieClient(url) as client:
        await client.authenticate("good")
        process = await client.launch("text-completion", {"prompt": "Hello", "max_tokens": 4})
        events = [e async for e in process.events()]
    if events[-1].kind != "return":
        raise RuntimeError(f"the well-behaved client's generation ended with {events[-1]}")
    return time.perf_counter() - start


async def fuzz_connection(url: str, frames: list[tuple[str, Frame]], stats: dict[str, Counter[str]]) -> None:
    """Send `frames` pipelined on one authenticated connection; count one typed answer per frame."""
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(_pack({"type": "auth_identify", "corr_id": 0, "username": "fuzz"}))
        assert msgpack.unpackb(await ws.recv())["ok"]
        replies: list[dict[str, object]] = []

        async def read() -> None:
            while True:
                reply = msgpack.unpackb(await ws.recv())
                if reply.get("corr_id") == SYNC_CORR_ID:
                    return
                replies.append(reply)

        reader = asyncio.create_task(read())
        for kind, frame in frames:
            stats[kind]["sent"] += 1
            await ws.send(frame)
        await ws.send(_pack({"type": "ping", "corr_id": SYNC_CORR_ID}))  # answered after everything before it
        await asyncio.wait_for(reader, 120)
    kinds = [kind for kind, _ in frames]
    for i, reply in enumerate(replies):
        typed = reply.get("type") == "protocol_error" or (reply.get("type") == "response" and reply.get("ok") is False)
        bug = "internal server error" in str(reply.get("result") or reply.get("message") or "")
        kind = kinds[i] if i < len(kinds) else "extra"
        stats[kind]["typed" if typed and not bug else "internal" if bug else "untyped"] += 1
    if len(replies) != len(frames):
        stats["all"]["missing_or_extra"] += abs(len(frames) - len(replies))


async def oversized(url: str, stats: dict[str, Counter[str]]) -> None:
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(_pack({"type": "auth_identify", "corr_id": 0, "username": "fuzz"}))
        await ws.recv()
        stats["oversized"]["sent"] += 1
        await ws.send(b"\x00" * (MAX_FRAME_BYTES + 1))
        try:
            await asyncio.wait_for(ws.recv(), 30)
        except websockets.ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd is not None else None
            stats["oversized"]["typed" if code == 1009 else "untyped"] += 1


async def hold_idle(port: int, url: str, count: int) -> dict[str, float]:
    """Open `count` idle connections, check a client is served, wait for the server to close them."""
    start = time.perf_counter()
    raw = [await asyncio.open_connection("127.0.0.1", port) for _ in range(count // 2)]
    sockets = [await websockets.connect(url) for _ in range(count - count // 2)]
    opened_s = time.perf_counter() - start
    served_s = await well_behaved(url)

    async def closed_raw(reader: asyncio.StreamReader) -> bool:
        try:
            return await asyncio.wait_for(reader.read(), 60) == b""
        except (ConnectionError, TimeoutError):
            return True

    async def closed_ws(ws: websockets.ClientConnection) -> bool:
        try:
            await asyncio.wait_for(ws.recv(), 60)
        except websockets.ConnectionClosed:
            return True
        except TimeoutError:
            return False
        return False

    results = await asyncio.gather(*(closed_raw(r) for r, _ in raw), *(closed_ws(ws) for ws in sockets))
    waited_s = time.perf_counter() - start
    for _, writer in raw:
        writer.close()
    for ws in sockets:
        await ws.close()
    return {"idle_held": count, "idle_closed_by_server": sum(results), "idle_close_wait_s": waited_s,
            "idle_open_s": opened_s, "served_while_idle_s": served_s}


async def run(args: argparse.Namespace, server: ServeProcess) -> dict[str, object]:
    rng = random.Random(args.seed)
    names = list(KINDS)
    frames = [(names[i % len(names)], KINDS[names[i % len(names)]](rng, i + 1)) for i in range(args.frames)]
    stats: dict[str, Counter[str]] = {name: Counter() for name in [*names, "oversized", "all"]}
    baseline_s = await well_behaved(server.url)
    rss0, pages0 = server.rss_mib(), server.pages_used()
    start = time.perf_counter()
    shares = [frames[i::args.connections] for i in range(args.connections)]
    await asyncio.gather(*(fuzz_connection(server.url, share, stats) for share in shares))
    for _ in range(args.oversized):
        await oversized(server.url, stats)
    fuzz_s = time.perf_counter() - start
    idle = await hold_idle(server.port, server.url, args.idle) if args.idle else {}
    after_s = await well_behaved(server.url)
    await asyncio.sleep(1.0)
    return {"stats": stats, "fuzz_s": fuzz_s, "baseline_s": baseline_s, "after_s": after_s, "rss0": rss0,
            "pages0": pages0, "rss1": server.rss_mib(), "pages1": server.pages_used(), **idle}


def report(out: dict[str, object], server: ServeProcess) -> bool:
    stats: dict[str, Counter[str]] = out["stats"]  # type: ignore[assignment]
    print(f"{'kind':<16} {'sent':>7} {'typed':>7} {'untyped':>8} {'internal':>9}")
    for kind, counts in stats.items():
        if kind != "all":
            print(f"{kind:<16} {counts['sent']:>7} {counts['typed']:>7} {counts['untyped']:>8} {counts['internal']:>9}")
    sent = sum(c["sent"] for c in stats.values())
    typed = sum(c["typed"] for c in stats.values())
    untyped = sum(c["untyped"] + c["internal"] for c in stats.values()) + stats["all"]["missing_or_extra"]
    logs = server.log_counts()
    alive = server.alive()
    print(f"\n{sent} frames in {out['fuzz_s']:.1f} s; typed answers {typed}; untyped, internal or missing {untyped}")
    print(f"server RSS {out['rss0']:.0f} -> {out['rss1']:.0f} MiB, KV pages in use {out['pages0']} -> {out['pages1']} "
          "(held by contexts; the prefix cache's evictable pages excluded)")
    print(f"log: {logs['tracebacks']} tracebacks, {logs['internal_errors']} internal errors, {logs['log_bytes']} bytes")
    if "idle_held" in out:
        print(f"idle: held {out['idle_held']} (opened in {out['idle_open_s']:.1f} s), closed by the server "
              f"{out['idle_closed_by_server']} within {out['idle_close_wait_s']:.1f} s of the first; a client "
              f"meanwhile served in {out['served_while_idle_s']:.2f} s")
    print(f"well-behaved generation: {out['baseline_s']:.2f} s before, {out['after_s']:.2f} s after "
          f"(ratio {out['after_s'] / out['baseline_s']:.2f})")
    ok = alive and untyped == 0 and logs["tracebacks"] == 0
    print(f"RESULT frames={sent} typed={typed} untyped={untyped} crashes={0 if alive else 1} "
          f"tracebacks={logs['tracebacks']} internal_errors={logs['internal_errors']}")
    print(f"RESULT rss_before_mib={out['rss0']:.1f} rss_after_mib={out['rss1']:.1f} "
          f"pages_before={out['pages0']} pages_after={out['pages1']}")
    if "idle_held" in out:
        print(f"RESULT idle_held={out['idle_held']} idle_closed_by_server={out['idle_closed_by_server']} "
              f"served_while_idle_s={out['served_while_idle_s']:.3f} after_over_before={out['after_s'] / out['baseline_s']:.2f}")
    print(f"RESULT ok={int(ok)}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=8, help="connections the frames are spread over")
    parser.add_argument("--oversized", type=int, default=20, help="oversized frames, one connection each")
    parser.add_argument("--idle", type=int, default=1_000, help="idle connections to hold (0: skip)")
    parser.add_argument("--header-timeout", type=float, default=5.0, help="the server's header_timeout_s")
    parser.add_argument("--auth-timeout", type=float, default=5.0, help="the server's auth_timeout_s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="pie/tiny-random")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    need = args.idle + args.connections + 256  # our sockets; the server needs as many, and inherits the limit
    limit = raise_fd_limit(need)
    if limit < need:
        args.idle = max(0, limit - args.connections - 256)
        print(f"the file-descriptor limit is {limit}: holding {args.idle} idle connections instead")
    server = ServeProcess(args.model, args.device, f"max_frame_bytes = {MAX_FRAME_BYTES}\n"
                          f"header_timeout_s = {args.header_timeout}\nauth_timeout_s = {args.auth_timeout}\n"
                          f"max_connections = {max(1024, args.idle + 64)}")
    try:
        out = asyncio.run(run(args, server))
        ok = report(out, server)
    finally:
        code = server.stop()
    print(f"RESULT server_exit_code={code}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
