"""The scheduler never fails a batch for everyone, bounds prefill per step, checks the context length first,
and frees a withdrawn prefill's pages within a step (issue 12), on the fake engines."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from runtime_support import argmax_at, forward, run

from inferlet._host import HostError
from pie.engine.batch import BatchResult, ForwardBatch
from pie.runtime.fake_engines import NullEngine, SleepEngine, fake_info, null_token
from pie.runtime.instance import Instance
from pie.runtime.runtime import ModelRuntime, Runtime, RuntimeLimits

VOCAB = 1000
POISON = 666  # the engine below raises a plain exception for any batch holding this token


class FlakyEngine(NullEngine):
    """Raises RuntimeError (not BatchError) for any batch with a POISON token: a bug the checks missed."""

    def __init__(self, **info: Any) -> None:
        super().__init__(fake_info(vocab_size=VOCAB, **info))
        self.batches_seen: list[ForwardBatch] = []

    async def forward(self, batch: ForwardBatch) -> BatchResult:
        self.batches_seen.append(batch)
        await asyncio.sleep(0)
        if any(POISON in r.tokens for r in batch.requests):
            raise RuntimeError("index out of range in some kernel")
        return self.answer(batch)


def runtime_on(engine: Any, limits: RuntimeLimits | None = None) -> Runtime:
    limits = limits or RuntimeLimits()
    return Runtime({"m": ModelRuntime("m", engine, limits)}, limits)


async def test_an_engine_exception_fails_only_the_culprit() -> None:
    engine = FlakyEngine(num_pages=256, page_size=16)
    runtime = runtime_on(engine)
    results: dict[int, Any] = {}

    async def body(i: int, host: Any) -> None:
        ctx = host.ctx_create("")
        tokens = [POISON if i == 2 else 5 + i, 7, 8]
        try:
            results[i] = (await forward(host, ctx, tokens, [argmax_at(2)]))[0]
        except HostError as error:
            results[i] = str(error)

    await asyncio.gather(*(run(runtime, lambda host, i=i: body(i, host)) for i in range(5)))
    assert isinstance(results[2], str) and "engine failed" in results[2]
    assert all(results[i] == null_token(2, VOCAB) for i in (0, 1, 3, 4)), results
    assert max(len(b.requests) for b in engine.batches_seen) > 1  # they were batched together first
    runtime.check_integrity()
    await runtime.shutdown(0)


async def test_a_long_prompt_takes_at_most_the_prefill_budget_while_decodes_wait() -> None:
    engine = FlakyEngine(num_pages=256, page_size=16, max_batch_tokens=256)
    limits = RuntimeLimits(max_prefill_tokens_per_step=64)
    runtime = runtime_on(engine, limits)
    decoding = asyncio.Event()

    async def decoder(host: Any) -> None:
        ctx = host.ctx_create("")
        token = (await forward(host, ctx, [1, 2, 3], [argmax_at(2)]))[0]
        decoding.set()
        for _ in range(4):
            token = (await forward(host, ctx, [token % VOCAB], [argmax_at(0)]))[0]

    async def long_prompt(host: Any) -> None:
        await decoding.wait()
        ctx = host.ctx_create("")
        await forward(host, ctx, [9] * 600, [argmax_at(599)])

    await asyncio.gather(*(run(runtime, decoder) for _ in range(3)), run(runtime, long_prompt))
    mixed = [b for b in engine.batches_seen if any(len(r.tokens) > 1 for r in b.requests)
             and any(len(r.tokens) == 1 for r in b.requests)]
    assert mixed, "the prompt's chunks shared batches with the decodes"
    for b in mixed:
        assert sum(len(r.tokens) for r in b.requests if len(r.tokens) > 1) <= 64
    alone = [b for b in engine.batches_seen if len(b.requests) == 1 and len(b.requests[0].tokens) > 64]
    assert alone, "alone, the prompt used the whole batch"
    await runtime.shutdown(0)


async def test_the_context_length_is_checked_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
    engine = NullEngine(fake_info(num_pages=64, page_size=16, vocab_size=VOCAB, model_dir=str(tmp_path)))
    runtime = runtime_on(engine)

    async def body(host: Any) -> str:
        ctx = host.ctx_create("")
        await forward(host, ctx, list(range(40)))
        try:
            await forward(host, ctx, list(range(30)))
        except HostError as error:
            return str(error)
        return "accepted"

    message = await run(runtime, body)
    assert "70 tokens" in message and "context length of 64" in message, message
    assert engine.batches == 1  # the refused pass reached no batch
    await runtime.shutdown(0)


@pytest.mark.parametrize("stream", [False, True])
async def test_cancelling_mid_prefill_frees_its_pages_within_a_step(stream: bool) -> None:
    engine = SleepEngine(1.0, fake_info(num_pages=128, page_size=16, vocab_size=VOCAB, max_batch_tokens=32))
    runtime = runtime_on(engine)
    model = runtime.model()
    batches: list[int] = []
    chunked = asyncio.Event()

    landed = asyncio.Event()

    def on_batch(*_: Any) -> None:
        batches.append(model.pool.num_used)
        landed.set()
        if len(batches) == 3:
            chunked.set()

    model.scheduler.on_batch = on_batch

    async def prefill(instance: Instance) -> str:
        host = instance.host
        assert host is not None
        ctx = host.ctx_create("")
        host.ctx_reserve(ctx, 40)
        if stream:
            handle = host.ctx_generate_start(ctx, {"tokens": [3] * 600, "sampler": {"kind": "argmax"},
                                                   "max_tokens": 100})
            await host.stream_next(handle)
        else:
            await host.ctx_forward(ctx, {"tokens": [3] * 600, "positions": list(range(600)), "slots": []})
        return "done"

    process = runtime.spawn(prefill, program="t", username="u")
    await chunked.wait()
    assert model.pool.num_used > 0
    seen = len(batches)
    await process.terminate()
    await process.wait()
    assert model.pool.num_used == 0  # destroying the context freed them, even with a chunk in flight
    if model.scheduler.num_pending:  # that chunk's pass is forgotten when its batch lands
        landed.clear()
        await landed.wait()  # on_batch runs just before the batch's results are handed back
    assert len(batches) - seen <= 1  # at most the batch in flight landed after the cancel
    assert model.scheduler.num_pending == 0
    runtime.check_integrity()
    await runtime.shutdown(0)
    await engine.close()


class PoisonAnswers(NullEngine):
    """Chains batches like the real client; any batch holding a POISON token raises a plain exception."""

    def answer(self, batch: ForwardBatch) -> BatchResult:
        if any(POISON in r.tokens for r in batch.requests):
            raise RuntimeError("index out of range in some kernel")
        return super().answer(batch)


async def test_a_failed_batch_under_pipelining_loses_no_stream_step() -> None:
    engine = PoisonAnswers(fake_info(num_pages=256, page_size=16, vocab_size=VOCAB))
    runtime = runtime_on(engine)
    streaming = asyncio.Event()

    async def streamer(host: Any) -> list[int]:
        ctx = host.ctx_create("")
        handle = host.ctx_generate_start(ctx, {"tokens": [1, 2, 3], "sampler": {"kind": "argmax"}, "stop": [],
                                               "max_tokens": 40, "depth": 40})
        tokens: list[int] = []
        while len(tokens) < 40:
            tokens += await host.stream_next(handle)
            streaming.set()
        host.stream_stop(handle, 40)
        return tokens

    async def culprit(host: Any) -> str:
        await streaming.wait()
        try:
            await forward(host, host.ctx_create(""), [POISON, 5], [argmax_at(1)])
        except HostError as error:
            return str(error)
        return "accepted"

    *streams, message = await asyncio.gather(*(run(runtime, streamer) for _ in range(3)), run(runtime, culprit))
    assert "engine failed" in message
    for tokens in streams:
        assert tokens == [null_token(2 + i, VOCAB) for i in range(40)]
    assert runtime.model().scheduler.stats.chained_steps > 0
    runtime.check_integrity()
    await runtime.shutdown(0)
