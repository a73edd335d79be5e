"""Lifecycle: graceful shutdown, two-stage SIGINT in a real server process, startup failures' exit code."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_support import tiny_runtime_config
from timing import scaled

from pie.client import PieClient
from pie.engine.config import EngineConfig
from pie.runtime.runtime import ModelSpec, RuntimeConfig
from pie.server.app import EXIT_INTERRUPTED, EXIT_OK, EXIT_STARTUP_FAILED, Server
from pie.server.options import ServerOptions

SERVE = """
import asyncio, logging, sys
sys.path.insert(0, {tests!r})
from server_support import tiny_runtime_config
from pie.server.app import Server
from pie.server.options import ServerOptions

logging.basicConfig(level=logging.INFO)
server = Server(tiny_runtime_config(), ServerOptions(port=0, shutdown_timeout_s=60))

async def main() -> int:
    task = asyncio.create_task(server.serve())
    await server.started.wait()
    print(server.url, flush=True)
    return await task

sys.exit(asyncio.run(main()))
"""


@pytest.fixture
def serve() -> Iterator[tuple[subprocess.Popen[str], str]]:
    script = SERVE.format(tests=str(Path(__file__).parent))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    url = proc.stdout.readline().strip()  # type: ignore[union-attr]
    assert url.startswith("ws://"), proc.stderr.read()  # type: ignore[union-attr]
    yield proc, url
    if proc.poll() is None:
        proc.kill()
    proc.wait(scaled(30))


async def test_shutdown_lets_running_inferlets_finish(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pie.server")
    server = Server(tiny_runtime_config(), ServerOptions(port=0, shutdown_timeout_s=60))
    serving = asyncio.create_task(server.serve(handle_signals=False))
    await server.started.wait()
    async with PieClient(server.url) as client:
        await client.authenticate("alice")
        process = await client.launch("text-completion", {"prompt": "Go on", "max_tokens": 24, "stream": True})
        events = process.events()
        first = await anext(events)
        server.request_exit()  # what the first SIGINT/SIGTERM does
        rest = [e async for e in events]
    assert first.kind == "message" and rest[-1].kind == "return"  # streamed to the end during shutdown
    assert await serving == EXIT_OK
    assert "waiting up to 60 s for 1 running inferlet" in caplog.text
    assert "KV pages still in use: 0" in caplog.text


async def test_second_signal_cancels_and_frees_pages(serve: tuple[subprocess.Popen[str], str]) -> None:
    proc, url = serve
    async with PieClient(url) as client:
        await client.authenticate("alice")
        process = await client.launch("chat", {"max_tokens": 4})
        await process.send_message("hello")
        assert (await anext(process.events())).kind == "message"  # it holds KV pages now, waiting for more
        os.kill(proc.pid, signal.SIGINT)
        await refused(url)  # the first signal was handled: no new connections once shutting down
        os.kill(proc.pid, signal.SIGINT)
        final = [e async for e in process.events()][-1]
    assert final.kind == "error" and "shutting down" in str(final.value)
    assert proc.wait(scaled(60)) == EXIT_INTERRUPTED
    assert "KV pages still in use: 0" in proc.stderr.read()  # type: ignore[union-attr]


async def refused(url: str, seconds: float = 30) -> None:
    """Connect until the server refuses; AssertionError if it still accepts after scaled(`seconds`)."""
    deadline = time.monotonic() + scaled(seconds)
    while True:
        try:
            async with PieClient(url) as late:
                await late.ping()
        except ConnectionError:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} still accepts connections {scaled(seconds):g} s after SIGINT")
        await asyncio.sleep(0.05)


async def test_startup_failures_exit_with_their_own_code(caplog: pytest.LogCaptureFixture) -> None:
    missing = RuntimeConfig((ModelSpec("m", EngineConfig(model="/no/such/model", device="cpu")),))
    assert await Server(missing, ServerOptions(port=0)).serve(handle_signals=False) == EXIT_STARTUP_FAILED
    assert "startup failed" in caplog.text
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = await Server(tiny_runtime_config(), ServerOptions(port=port)).serve(handle_signals=False)
    assert code == EXIT_STARTUP_FAILED
    assert f"cannot listen on 127.0.0.1:{port}" in caplog.text and "--port" in caplog.text
