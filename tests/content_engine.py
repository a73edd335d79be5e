"""A fake engine whose KV records what each slot holds, and a random workload checked against it.

`ContentEngine` implements EngineClient: the KV is the (token, position) written to each page slot, and
each output row is answered with a digest of exactly the slots that row attends to. A test computes the
same digest from the sequence a context *should* hold, so any page handed out twice, a missed
copy-on-write, a wrong prefix-cache hit or a bad re-prefill or swap shows up as a wrong token.
"""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace
from typing import Any

import pytest
from runtime_support import argmax_at, forward

from inferlet._host import HostError
from pie.engine.batch import BatchResult, ForwardBatch, OutputValue, Request
from pie.runtime.instance import Instance
from pie.runtime.runtime import ModelRuntime, Runtime, RuntimeLimits

VOCAB = 1000


def digest(seen: list[tuple[int, int]]) -> int:
    return hash(tuple(seen)) % VOCAB


class ContentEngine:
    """Implements EngineClient: KV = the (token, position) in each slot; outputs = digest of what a row sees."""

    def __init__(self, num_pages: int, page_size: int, max_batch_tokens: int = 64, max_batch_size: int = 16) -> None:
        self.info = SimpleNamespace(page_size=page_size, num_pages=num_pages, vocab_size=VOCAB,
                                    max_batch_tokens=max_batch_tokens, max_batch_size=max_batch_size,
                                    max_dist_size=8, max_num_embeds=8, model_dir="", model_type="content",
                                    device="cpu")
        self.kv: list[list[tuple[int, int] | None]] = [[None] * page_size for _ in range(num_pages)]
        self.batches: list[ForwardBatch] = []

    async def forward(self, batch: ForwardBatch) -> BatchResult:
        assert batch.num_tokens <= self.info.max_batch_tokens and len(batch.requests) <= self.info.max_batch_size
        sources = [list(self.kv[src]) for src, _ in batch.page_copies]  # copies read before any write
        for (_, dst), content in zip(batch.page_copies, sources, strict=True):
            self.kv[dst] = content
        written = [slot for r in batch.requests for slot in self._write(r)]
        assert len(set(written)) == len(written), "two requests wrote the same KV slot"
        self.batches.append(batch)
        await asyncio.sleep(0)
        return BatchResult([self._outputs(r) for r in batch.requests])

    async def copy_pages(self, src: list[int], dst: list[int]) -> None:
        for s, d in zip(src, dst, strict=True):
            self.kv[d] = list(self.kv[s])

    async def close(self) -> None:
        pass

    def _slots(self, r: Request) -> list[tuple[int, int]]:
        ps = self.info.page_size
        assert len(set(r.page_ids)) == len(r.page_ids), f"a request names a page twice: {r.page_ids}"
        kv_len = (len(r.page_ids) - 1) * ps + r.last_page_len
        return [(r.page_ids[s // ps], s % ps) for s in range(kv_len)]

    def _write(self, r: Request) -> list[tuple[int, int]]:
        new = self._slots(r)[-len(r.tokens):]
        for (page, off), t, p in zip(new, r.tokens, r.positions, strict=True):
            self.kv[page][off] = (t, p)
        return new

    def _outputs(self, r: Request) -> list[OutputValue]:
        slots = self._slots(r)
        seen = [self.kv[p][o] for p, o in slots]
        first_new = len(slots) - len(r.tokens)
        return [digest(seen[: first_new + o.index + 1]) for o in r.outputs]  # type: ignore[misc]


def content_runtime(num_pages: int, page_size: int, **limits: Any) -> Runtime:
    # One instance drives suspension here, so it may hold the whole pool (no per-instance share).
    lim = RuntimeLimits(**{"max_page_share_per_instance": 0.0, **limits})
    return Runtime({"m": ModelRuntime("m", ContentEngine(num_pages, page_size), lim)}, lim)


def expected(seq: list[int], start: int, rows: list[int]) -> list[int]:
    pairs = [(t, i) for i, t in enumerate(seq)]
    return [digest(pairs[: start + r + 1]) for r in rows]



class Model:
    """What a context must hold, kept by the test independently of the runtime."""

    def __init__(self, seq: list[int]) -> None:
        self.seq = seq


async def random_instance(host: Any, rng: random.Random, prefixes: list[list[int]], steps: int) -> int:
    contexts: dict[int, Model] = {}
    checked = 0

    async def run_pass(ctx: int, tokens: list[int], rows: list[int]) -> None:
        nonlocal checked
        model = contexts[ctx]
        start = len(model.seq)
        values = await forward(host, ctx, tokens, [argmax_at(r) for r in rows])
        model.seq += tokens
        assert values == expected(model.seq, start, rows), f"wrong KV seen by context {ctx}"
        checked += len(rows)

    for _ in range(steps):
        op = rng.random()
        live = list(contexts)
        if op < 0.2 or not live:
            ctx = host.ctx_create("")
            contexts[ctx] = Model([])
            prompt = [*rng.choice(prefixes)[: rng.randrange(1, 30)], rng.randrange(VOCAB)]
            await run_pass(ctx, prompt, sorted(rng.sample(range(len(prompt)), min(2, len(prompt)))))
        elif op < 0.55:  # decode one token on several contexts at once
            chosen = rng.sample(live, min(len(live), 3))
            await asyncio.gather(*(run_pass(c, [rng.randrange(VOCAB)], [0]) for c in chosen
                                   if len(contexts[c].seq) < 60))
        elif op < 0.65:
            parent = rng.choice(live)
            child = host.ctx_fork(parent)
            contexts[child] = Model(list(contexts[parent].seq))
        elif op < 0.75:
            ctx = rng.choice(live)
            _, _, working = host.ctx_state(ctx)
            n = rng.randrange(working + 1)
            host.ctx_truncate(ctx, n)
            del contexts[ctx].seq[len(contexts[ctx].seq) - n:]
        elif op < 0.85:
            ctx = rng.choice(live)
            name = host.ctx_snapshot(ctx)
            take = rng.random() < 0.5
            again = host.ctx_take("", name) if take else host.ctx_open("", name)
            contexts[again] = Model(list(contexts[ctx].seq))
            if take:  # the snapshot is gone
                with pytest.raises(HostError, match="no snapshot"):
                    host.ctx_open("", name)
            else:  # the snapshot stays until deleted
                host.ctx_delete("", name)
        elif op < 0.92:
            host.ctx_set_priority(rng.choice(live), float(rng.randrange(-1, 2)))
        else:
            ctx = rng.choice(live)
            host.ctx_destroy(ctx)
            del contexts[ctx]
    return checked


async def run_random_instances(runtime: Runtime, seed: int, count: int = 4, steps: int = 40) -> int:
    """`count` instances of `random_instance` at once over shared prefixes; the rows they checked."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(VOCAB) for _ in range(40)] for _ in range(3)]
    checked: list[int] = []

    async def body(instance: Instance, i: int) -> str:
        checked.append(await random_instance(instance.host, random.Random(seed * 100 + i), prefixes, steps))
        return "ok"

    procs = [runtime.spawn(lambda inst, i=i: body(inst, i), program="random", username="u") for i in range(count)]
    finals = [await p.wait() for p in procs]
    assert [f.value for f in finals] == ["ok"] * count, finals
    return sum(checked)
