"""Engines without a model, for measuring the runtime alone and for fast bookkeeping tests.

- `NullEngine` answers every batch at once, on the event loop's thread, with valid outputs: the sampled
  token at a row is `(position * 7919 + draw) % vocab` (a function of the row's position only, so runs
  are reproducible whatever the batching), and probes get plausible values of the right type.
- `SleepEngine` answers the same values after `ms` milliseconds per batch, spent in its own worker
  thread with the GIL released (`time.sleep`), the way a device kernel would.

Both implement `pie.runtime.api.EngineClient`. They validate nothing beyond what the runtime promises
(`ForwardBatch.validated`): their purpose is to cost nothing.
"""

from __future__ import annotations

import asyncio
import struct
import time
from concurrent.futures import ThreadPoolExecutor

from pie.engine.batch import BatchResult, ForwardBatch, OutputSpec, OutputValue, Request
from pie.engine.info import EngineInfo
from pie.runtime.engine_client import ChainSource

TOKEN_STRIDE = 7919  # a prime: consecutive positions give well-spread tokens


def fake_info(*, num_pages: int = 4096, page_size: int = 16, vocab_size: int = 32_000,
              max_batch_tokens: int = 8192, max_batch_size: int = 1024, name: str = "fake",
              model_dir: str = "") -> EngineInfo:
    """`model_dir`: where a config.json gives the context length (none: no limit but the pool)."""
    return EngineInfo(model_name=name, model_dir=model_dir, model_type="fake", device="none", dtype="float32",
                      attention_backend="none", num_pages=num_pages, page_size=page_size, vocab_size=vocab_size,
                      num_layers=0, max_batch_tokens=max_batch_tokens, max_batch_size=max_batch_size,
                      max_dist_size=32, max_num_embeds=64, kv_bytes_per_page=0)


def null_token(position: int, vocab_size: int, draw: int = 0) -> int:
    """The token the fake engines sample at a row at `position`."""
    return (position * TOKEN_STRIDE + draw) % vocab_size


class NullEngine:
    """Implements EngineClient (with chained batches, as `InProcessEngine`); answers at once."""

    chains_tokens = True

    def __init__(self, info: EngineInfo | None = None) -> None:
        self.info = info or fake_info()
        self.batches = 0
        self.rows = 0
        self.chain = ChainSource()

    async def forward(self, batch: ForwardBatch) -> BatchResult:
        return self.chain.run(self.answer, batch, None)

    async def forward_chained(self, batch: ForwardBatch, source: ForwardBatch) -> BatchResult:
        return self.chain.run(self.answer, batch, source)

    def answer(self, batch: ForwardBatch) -> BatchResult:
        self.batches += 1
        self.rows += len(batch.requests)
        vocab = self.info.vocab_size
        steps = batch.steps
        step_tokens = None
        if steps is not None:  # decode steps in arrays: `null_token` of each row's position, in one go
            self.rows += len(steps)
            step_tokens = steps.positions * TOKEN_STRIDE % vocab
        out: list[list[OutputValue]] = []
        for r in batch.requests:
            outputs = r.outputs
            if len(outputs) == 1 and (s := outputs[0].sampler) is not None and s.draws == 1:
                out.append([r.positions[outputs[0].index] * TOKEN_STRIDE % vocab])  # a decode row: `null_token`
            else:
                out.append([_value(r, o, vocab) for o in outputs])
        return BatchResult(out, steps=step_tokens)

    async def copy_pages(self, src: list[int], dst: list[int]) -> None:
        return None

    async def close(self) -> None:
        return None


class SleepEngine(NullEngine):
    """Implements EngineClient; takes `ms` per batch in a worker thread that does not hold the GIL."""

    def __init__(self, ms: float, info: EngineInfo | None = None) -> None:
        super().__init__(info)
        self.seconds = ms / 1e3
        self._overshoot = 0.0  # how much longer than asked time.sleep takes, a running estimate
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pie-sleep-engine")

    async def forward(self, batch: ForwardBatch) -> BatchResult:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.chain.run, self._run, batch,
                                                                None)

    async def forward_chained(self, batch: ForwardBatch, source: ForwardBatch) -> BatchResult:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.chain.run, self._run, batch,
                                                                source)

    def _run(self, batch: ForwardBatch) -> BatchResult:
        # time.sleep overshoots by the OS timer slack (about 0.1 ms per call here, 2% of a 5 ms batch); asking
        # for that much less keeps each batch at `ms` on average, so the bound is the engine's and not the timer's.
        start = time.perf_counter()
        time.sleep(max(0.0, self.seconds - self._overshoot))
        took = time.perf_counter() - start
        self._overshoot = max(0.0, 0.8 * self._overshoot + 0.2 * (self._overshoot + took - self.seconds))
        return self.answer(batch)

    async def close(self) -> None:
        self._executor.shutdown(wait=True)


def _value(r: Request, o: OutputSpec, vocab: int) -> OutputValue:
    position = r.positions[o.index]
    if o.sampler is not None:
        if o.sampler.draws > 1:
            return [null_token(position, vocab, d) for d in range(o.sampler.draws)]
        return null_token(position, vocab)
    probe = o.probe
    assert probe is not None, "an output is a sampler or a probe"
    if probe.kind == "distribution":
        k = max(1, min(probe.k or 4, 4))
        return [null_token(position, vocab, d) for d in range(k)], [1.0 / k] * k
    if probe.kind == "logprob":
        return -1.0
    if probe.kind == "logprobs":
        return [-1.0] * len(probe.tokens)
    if probe.kind == "entropy":
        return 0.5
    if probe.kind == "logits":
        return struct.pack("<f", 0.0) * vocab
    return struct.pack("<f", 0.0) * 8  # embedding
