"""The in-process engine client: an `Engine` driven from one dedicated worker thread.

The engine is built and every batch runs on that thread, so the event loop
never blocks on device work (torch releases the GIL inside its kernels) and
the engine is only ever touched by one thread. `pie.engine.engine` (and with
it torch) is imported on the worker thread when the client starts, never by
the runtime's own modules.

Chained batches (`chains_tokens`): the scheduler may submit batch N+1 before
batch N has returned (`forward_chained(N+1, N)`), with decode rows whose
input token is one N samples (`StepRows.token_from`). Batches run in submission order on
the one thread, so right before running N+1 the client substitutes N's
sampled values (`resolve_chained`); the engine needs no change. If the batch
run just before N+1 is not N (N failed, or retries ran in between), N+1
fails with `ChainError` and the scheduler retries its rows one by one. The engine thread waits in
torch kernels and in the executor's queue, neither of which holds the GIL.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from pie.engine.batch import BatchResult, ForwardBatch

if TYPE_CHECKING:
    from pie.engine.config import EngineConfig
    from pie.engine.engine import Engine, EngineInfo

T = TypeVar("T")
load_log = logging.getLogger("pie.load")
# Data-parallel engines start on their own threads at once; transformers' lazy module is not safe to
# import from two threads concurrently (one sees a half-made module: "cannot import name 'AutoConfig'").
_FIRST_IMPORT = threading.Lock()  # weight-loading progress; `pie run` shows it on stderr


def log_load_progress(name: str, every_s: float = 1.0) -> Callable[[int, int], None]:
    """The engine's load-progress callback: an INFO line on `pie.load` at the first tensor, at most
    every `every_s` while tensors are read, and one when all are. Each record carries `done`,
    `total` and `elapsed_s` (`extra`), from which `pie serve` draws a bar on a terminal."""
    start: list[float] = []  # when the first tensor was read
    last: list[float] = []  # when the last line was logged

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        first = not start
        if first:
            start.append(now)
            last.append(now)
        extra = {"model": name, "done": done, "total": total, "elapsed_s": now - start[0]}
        if done >= total:
            load_log.info("loaded %s: %d tensors in %.1f s", name, total, now - start[0], extra=extra)
        elif first or now - last[0] >= every_s:
            last[0] = now
            load_log.info("loading %s: %d/%d tensors (%d%%)", name, done, total, done * 100 // max(total, 1),
                          extra=extra)

    return progress


class ChainError(RuntimeError):
    """A chained row's source batch failed: it has no token to run with (the scheduler retries it)."""


class ChainSource:
    """The last batch an engine ran and its outputs: what chained rows of the next batch read."""

    def __init__(self) -> None:
        self.batch: ForwardBatch | None = None
        self.result: BatchResult | None = None

    def run(self, forward: Callable[[ForwardBatch], BatchResult], batch: ForwardBatch,
            source: ForwardBatch | None) -> BatchResult:
        """`forward(batch)` after filling its chained rows from `source`, which must be the last batch run."""
        try:
            if source is not None:
                resolve_chained(batch, self.result if self.batch is source else None)
            result = forward(batch)
        except BaseException:
            self.batch = None
            raise
        self.batch, self.result = batch, result
        return result


def resolve_chained(batch: ForwardBatch, previous: BatchResult | None) -> None:
    """Fill every chained row of `batch` (`StepRows.token_from`) with the token its source batch sampled
    (None: the source was not the batch run just before, so there is no token to read)."""
    steps = batch.steps
    if steps is None or steps.token_from is None:
        return
    if previous is None or previous.steps is None:
        raise ChainError("a chained batch did not run right after its source batch (it failed, or retries "
                         "ran in between)")
    src_rows = steps.token_from
    chained = src_rows >= 0
    steps.tokens[chained] = previous.steps[src_rows[chained]]
    steps.token_from = None


class InProcessEngine:
    """Implements `pie.runtime.api.EngineClient`. Calls are serialised by the single worker thread."""

    chains_tokens = True  # see the module docstring

    def __init__(self, engine: Engine, executor: ThreadPoolExecutor) -> None:
        self._engine: Engine | None = engine
        self._executor = executor
        self._info = engine.info
        self._chain = ChainSource()  # the last batch run (engine thread only)

    @classmethod
    async def start(cls, config: EngineConfig, name: str = "") -> InProcessEngine:
        """Load the model on a new worker thread; raises what `Engine(config)` raises (config, checkpoint)."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"pie-engine-{name or config.model}")

        def build() -> Engine:
            with _FIRST_IMPORT:  # see _FIRST_IMPORT
                from transformers import AutoConfig  # noqa: F401

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
        return await self._call(self._chain.run, self.engine.forward_batch, batch, None)

    async def forward_chained(self, batch: ForwardBatch, source: ForwardBatch) -> BatchResult:
        """`forward`, with `token_from` rows reading `source`'s outputs (submitted just before)."""
        return await self._call(self._chain.run, self.engine.forward_batch, batch, source)

    async def copy_pages(self, src: list[int], dst: list[int]) -> None:
        await self._call(self.engine.copy_pages, src, dst)

    # LoRA adapters (pie.runtime.adapters.AdapterEngine). Synchronous on purpose: the inferlet API's
    # Adapter.load/save are plain calls, so the caller waits (behind any batch in flight) for the engine.

    def prepare_image(self, data: bytes, max_pixels: int) -> Any:
        """`Engine.prepare_image` on the engine thread (it shares the image store with the batches)."""
        return self._call_sync(self.engine.prepare_image, data, max_pixels)

    def prepare_audio(self, data: bytes, max_seconds: float) -> Any:
        """`Engine.prepare_audio` on the engine thread (clips share the image store)."""
        return self._call_sync(self.engine.prepare_audio, data, max_seconds)

    def load_adapter(self, path: str, slot: int | None) -> int:
        return self._call_sync(self.engine.load_adapter, path, slot)

    def fork_adapter(self, slot: int, new_slot: int | None) -> int:
        return self._call_sync(self.engine.fork_adapter, slot, new_slot)

    def save_adapter(self, slot: int, path: str) -> None:
        self._call_sync(self.engine.save_adapter, slot, path)

    def unload_adapter(self, slot: int) -> None:
        self._call_sync(self.engine.unload_adapter, slot)

    def zo_initialize(self, slot: int | None, rank: int, alpha: float, population_size: int, mu_fraction: float,
                      initial_sigma: float) -> int:
        return self._call_sync(self.engine.zo_initialize, slot, rank, alpha, population_size, mu_fraction,
                               initial_sigma)

    def zo_update(self, slot: int, scores: list[float], seeds: list[int], max_sigma: float) -> None:
        self._call_sync(self.engine.zo_update, slot, scores, seeds, max_sigma)

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

