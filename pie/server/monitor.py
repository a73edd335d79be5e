"""`pie serve --monitor`: a live terminal view of models (KV pages, batches) and running inferlets."""

from __future__ import annotations

import asyncio
import sys
from typing import Any, TextIO

from pie.runtime.api import RuntimeAPI

REFRESH_S = 1.0
CLEAR = "\x1b[H\x1b[2J"  # cursor home + clear screen
MAX_ROWS = 20


async def watch(server: Any, out: TextIO = sys.stderr) -> None:
    """Redraw once a second while the server runs."""
    await server.started.wait()
    while True:
        if server.state is not None:
            out.write(CLEAR + render(server.state.runtime, server.url) + "\n")
            out.flush()
        await asyncio.sleep(REFRESH_S)


def render(runtime: RuntimeAPI, url: str) -> str:
    lines = [f"pie  {url}", "", f"{'MODEL':<28} {'KV PAGES':>14} {'TOKENS':>12} {'BATCHES':>9} {'LAST MS':>8}"]
    for m in runtime.models():
        pages = f"{m.pages_used}/{m.pages_total}"
        lines.append(f"{m.name[:28]:<28} {pages:>14} {m.tokens_processed:>12} {m.batches:>9} "
                     f"{m.last_batch_ms:>8.1f}")
    processes = runtime.processes()
    running = [p for p in processes if p.status == "running"]
    lines += ["", f"{len(running)} running of {len(processes)} processes", f"{'ID':<36} {'USER':<12} PROGRAM"]
    for p in running[:MAX_ROWS]:
        lines.append(f"{p.id:<36} {p.username[:12]:<12} {p.program}")
    if len(running) > MAX_ROWS:
        lines.append(f"... and {len(running) - MAX_ROWS} more")
    return "\n".join(lines)
