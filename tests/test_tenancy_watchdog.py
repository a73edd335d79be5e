"""SIGTERM ends a server whose event loop a trusted inferlet blocks (`while True: pass`): the signal
watchdog forces the exit once the loop has not run for the grace period."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pie.client import PieClient

GRACE_S = 1.5
MARGIN_S = 10.0  # process teardown on a loaded 2-core CI machine

SERVE = """
import asyncio, logging, sys
from pathlib import Path
from pie.engine.config import EngineConfig
from pie.runtime.runtime import ModelSpec, RuntimeConfig
from pie.server.app import Server
from pie.server.options import ServerOptions
from pie.tiny_model import TINY_MODEL_ID

logging.basicConfig(level=logging.INFO)
engine = EngineConfig(model=TINY_MODEL_ID, device="cpu", max_num_kv_pages=64)
config = RuntimeConfig((ModelSpec("tiny", engine),), inferlet_paths=(Path({programs!r}),))
server = Server(config, ServerOptions(port=0, shutdown_timeout_s={grace}))

async def main() -> int:
    task = asyncio.create_task(server.serve())
    await server.started.wait()
    print(server.url, flush=True)
    return await task

sys.exit(asyncio.run(main()))
"""

SPIN = """
from pathlib import Path

def main(input):
    Path(input["flag"]).write_text("spinning")
    while True:  # never awaits: the event loop is stuck here
        pass
"""


async def test_sigterm_ends_a_server_whose_loop_an_inferlet_blocks(tmp_path: Path) -> None:
    programs = tmp_path / "programs"
    (programs / "spin").mkdir(parents=True)
    (programs / "spin" / "Pie.toml").write_text('[package]\nname = "spin"\nversion = "0.1.0"\n')
    (programs / "spin" / "main.py").write_text(SPIN)
    env = {**os.environ, "PIE_HOME": str(tmp_path / "home")}
    script = SERVE.format(programs=str(programs), grace=GRACE_S)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        url = proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert url.startswith("ws://"), proc.stderr.read()  # type: ignore[union-attr]
        flag = tmp_path / "flag"
        async with PieClient(url) as client:
            await client.authenticate("alice")
            await client.launch("spin", {"flag": str(flag)})
            deadline = time.monotonic() + 60
            while not flag.exists():  # the inferlet has started and is about to spin
                assert time.monotonic() < deadline and proc.poll() is None, "the inferlet never started"
                await asyncio.sleep(0.02)
            sent = time.monotonic()
            os.kill(proc.pid, signal.SIGTERM)
            code = proc.wait(GRACE_S + MARGIN_S)
            elapsed = time.monotonic() - sent
        stderr = proc.stderr.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert code == 128 + signal.SIGTERM, stderr[-2000:]
    assert GRACE_S <= elapsed < GRACE_S + MARGIN_S
    assert "SIGTERM received, but the event loop has not run" in stderr
