"""The in-process engine client: an `Engine` driven from one dedicated worker thread.

The engine is built and every batch runs on that thread, so the event loop
never blocks on device work (torch releases the GIL inside its kernels) and
the engine is only ever touched by one thread. `pie.engine.engine` (and with
it torch) is imported on the worker thread when the client starts, never by
the runtime's own modules.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from pie.engine.batch import BatchResult, ForwardBatch

if TYPE_CHECKING:
    from pie.engine.config import EngineConfig
    from pie.engine.engine import Engine, EngineInfo

T = TypeVar("T")
load_log = logging.getLogger("pie.load")  # weight-loading progress; `pie run` shows it on stderr


def log_load_progress(name: str, every_s: float = 1.0) -> Callable[[int, int], None]:
    """The engine's load-progress callback: an INFO line on `pie.load` at most every `every_s` while
    tensors are read, and one when all are (a small model's load is one line)."""
    start: list[float] = []  # when the first tensor was read
    last: list[float] = []  # when the last line was logged

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if not start:
            start.append(now)
            last.append(now)
        if done >= total:
            load_log.info("loaded %s: %d tensors in %.1f s", name, total, now - start[0])
        elif now - last[0] >= every_s:
            last[0] = now
            load_log.info("loading %s: %d/%d tensors (%d%%)", name, done, total, done * 100 // max(total, 1))

    return progress


class InProcessEngine:
    """Implements `pie.runtime.api.EngineClient`. Calls are serialised by the single worker thread."""

    def __init__(self, engine: Engine, executor: ThreadPoolExecutor) -> None:
        self._engine: Engine | None = engine
        self._executor = executor
        self._info = engine.info

    @classmethod
    async def start(cls, config: EngineConfig, name: str = "") -> InProcessEngine:
        """Load the model on a new worker thread; raises what `Engine(config)` raises (config, checkpoint)."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"pie-engine-{name or config.model}")

        def build() -> Engine:
            from pie.engine.engine import Engine

            return Engine(config, progress=log_load_progress(name or config.model))

        try:
            engine = await asyncio.get_running_loop().run_in_executor(executor, build)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(engine, executor)

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def engine(self) -> Engine:
        """The wrapped engine (benchmarks drive it directly for a baseline); only use it between calls."""
        assert self._engine is not None, "the engine client is closed"
        return self._engine

    async def forward(self, batch: ForwardBatch) -> BatchResult:
        return await self._call(self.engine.forward_batch, batch)

    async def copy_pages(self, src: list[int], dst: list[int]) -> None:
        await self._call(self.engine.copy_pages, src, dst)

    # LoRA adapters (pie.runtime.adapters.AdapterEngine). Synchronous on purpose: the inferlet API's
    # Adapter.load/save are plain calls, so the caller waits (behind any batch in flight) for the engine.

    def load_adapter(self, path: str, slot: int | None) -> int:
        return self._call_sync(self.engine.load_adapter, path, slot)

    def fork_adapter(self, slot: int, new_slot: int | None) -> int:
        return self._call_sync(self.engine.fork_adapter, slot, new_slot)

    def save_adapter(self, slot: int, path: str) -> None:
        self._call_sync(self.engine.save_adapter, slot, path)

    def unload_adapter(self, slot: int) -> None:
        self._call_sync(self.engine.unload_adapter, slot)

    async def close(self) -> None:
        """Wait for the batch in flight, then drop the engine (its tensors go with the last reference)."""
        if self._engine is None:
            return
        self._engine = None
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _call_sync(self, fn: Callable[..., T], *args: Any) -> T:
        return self._executor.submit(fn, *args).result()

