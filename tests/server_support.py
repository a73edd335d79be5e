"""Helpers for the server tests: the real runtime on the built-in tiny model, a real server on a free
loopback port, and polling."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from timing import scaled, wait_for_async

from pie.engine.config import EngineConfig
from pie.runtime.runtime import ModelSpec, RuntimeConfig, RuntimeLimits
from pie.server.app import Server
from pie.server.auth import Authenticator
from pie.server.options import ServerOptions
from pie.tiny_model import TINY_MODEL_ID

MODEL = TINY_MODEL_ID


def tiny_runtime_config(num_pages: int = 256) -> RuntimeConfig:
    engine = EngineConfig(model=TINY_MODEL_ID, device="cpu", max_num_kv_pages=num_pages)
    return RuntimeConfig((ModelSpec(MODEL, engine),), RuntimeLimits())


@asynccontextmanager
async def running_server(config: Any = None, authenticator: Authenticator | None = None,
                         **options: Any) -> AsyncIterator[Server]:
    """`Server.serve` on a free port (auth off unless asked) until the block ends."""
    server = Server(config or tiny_runtime_config(), ServerOptions(**{"port": 0, **options}),
                    authenticator=authenticator)
    task = asyncio.create_task(server.serve(handle_signals=False))
    started = asyncio.ensure_future(server.started.wait())
    await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    if not server.started.is_set():
        started.cancel()
        raise RuntimeError(f"the server did not start (exit code {await task})")
    try:
        yield server
    finally:
        server.request_exit()
        await task


def pages_used(server: Server) -> int:
    assert server.state is not None
    return sum(m.pages_used for m in server.state.runtime.models())


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 20.0, what: str = "condition") -> None:
    """Poll `predicate` on the loop; fail after `timeout_s` scaled for this machine (tests/timing.py)."""
    await wait_for_async(predicate, timeout_s, what)


class ServerThread:
    """A server on its own event loop in a background thread, for tests of synchronous entry points
    (`pie run --server`)."""

    def __init__(self, config: Any = None, **options: Any) -> None:
        self._config, self._options = config, options
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.server: Server | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> Server:
        self._thread.start()
        if not self._ready.wait(scaled(120)) or self.server is None:
            raise RuntimeError("the server thread did not start")
        return self.server

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(scaled(60))

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with running_server(self._config, **self._options) as server:
            self.server = server
            self._ready.set()
            await self._stop.wait()
