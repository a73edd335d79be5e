"""Page pool, prefix trie and contexts: the bookkeeping invariants, checked against what the KV holds.

The property test runs the real runtime (host, contexts, scheduler, snapshots)
on `ContentEngine`, a KV store that records which (token, position) each page
slot holds and answers each output row with a digest of exactly the slots that
row attends to. A test computes the same digest from the sequence the context
*should* hold, so any page handed out twice, a missed copy-on-write, a wrong
prefix-cache hit or a bad re-prefill after suspension shows up as a wrong
token. The real engine's tensors are covered by test_runtime_engine.py.
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
from pie.errors import OutOfPagesError
from pie.runtime.context_space import ContextSpace
from pie.runtime.instance import Instance
from pie.runtime.pages import PagePool
from pie.runtime.prefix_trie import PrefixTrie, page_key
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
    lim = RuntimeLimits(**limits)
    return Runtime({"m": ModelRuntime("m", ContentEngine(num_pages, page_size), lim)}, lim)


def expected(seq: list[int], start: int, rows: list[int]) -> list[int]:
    pairs = [(t, i) for i, t in enumerate(seq)]
    return [digest(pairs[: start + r + 1]) for r in rows]


# -- the pool and the trie ---------------------------------------------------------------------------


def test_pool_counts_and_refcounts() -> None:
    pool = PagePool(8)
    a = pool.allocate(5)
    assert len(set(a)) == 5 and pool.usage() == (8, 3, 5, 0)
    assert pool.can_allocate(3) and not pool.can_allocate(4)
    with pytest.raises(OutOfPagesError, match="need 4 KV pages, only 3"):
        pool.allocate(4)
    pool.incref(a[:2])
    pool.decref(a)
    assert pool.usage() == (8, 6, 2, 0) and pool.refcount(a[0]) == 1
    pool.decref(a[:2])
    assert pool.usage() == (8, 8, 0, 0)
    pool.check_integrity()


def test_cached_pages_are_reused_then_evicted_oldest_first() -> None:
    pool = PagePool(4)
    trie = PrefixTrie(pool)
    pages = pool.allocate(3)
    keys = [page_key(b"", [i], [0]) for i in range(3)]
    for k, p in zip(keys, pages, strict=True):
        assert trie.insert(k, p) == (p, False)
    assert trie.insert(keys[0], 99).existed
    pool.decref([pages[2], pages[0], pages[1]])  # released in this order: 2 is the oldest
    assert pool.usage() == (4, 1, 0, 3)
    pool.incref([trie.lookup(keys[1])])  # a cache hit takes the page back from the cache
    assert pool.usage() == (4, 1, 1, 2)
    fresh = pool.allocate(2)  # the free page, then the oldest cached one (key 2)
    assert pages[2] in fresh and trie.lookup(keys[2]) is None and trie.lookup(keys[0]) == pages[0]
    pool.check_integrity()
    trie.check_integrity()


def test_integrity_check_catches_a_leak() -> None:
    pool = PagePool(4)
    pool.allocate(1)
    pool._refcount[0] = 0  # a page nobody holds but nobody freed
    with pytest.raises(AssertionError, match="leaked"):
        pool.check_integrity()


def test_fork_is_copy_on_write_and_commit_dedups() -> None:
    pool = PagePool(16)
    space = ContextSpace(pool, PrefixTrie(pool), page_size=4)
    a = space.create("i")
    a.reserve(2)
    a.append(list(range(6)), list(range(6)), custom_kv=False)
    a.prepare_write(0, 6, pool.allocate(a.pages_needed(0, 6)))
    a.mark_computed(6)
    b = a.fork("i")
    assert b.pages == a.pages and pool.num_used == 2  # nothing copied yet
    b.reserve(0)
    b.append([7], [6], custom_kv=False)
    assert b.pages_needed(6, 7) == 1  # page 1 is shared: b writes into a copy of it
    copies = b.prepare_write(6, 7, pool.allocate(1))
    assert copies == [(a.pages[1], b.pages[1])] and b.pages[0] == a.pages[0]
    b.mark_computed(7)
    a.commit(1)
    b.commit(1)  # same content, same key: both end on one physical page
    assert a.pages[0] == b.pages[0] and pool.refcount(a.pages[0]) == 2
    space.check_integrity()
    a.destroy()
    b.destroy()
    assert pool.num_used == 0 and pool.num_cached == 1
    space.check_integrity()


def test_masked_and_out_of_order_pages_are_never_shared() -> None:
    pool = PagePool(16)
    space = ContextSpace(pool, PrefixTrie(pool), page_size=4)
    for custom_kv, positions in ((True, [0, 1, 2, 3]), (False, [0, 1, 3, 2])):
        ctx = space.create("i")
        ctx.reserve(1)
        ctx.append([1, 2, 3, 4], positions, custom_kv=custom_kv)
        ctx.prepare_write(0, 4, pool.allocate(1))
        ctx.mark_computed(4)
        ctx.commit(1)
        assert ctx.keys == [None] and len(space.trie) == 0
        assert ctx.recomputable is not custom_kv
    space.check_integrity()


# -- the property test: random workloads through the whole runtime ----------------------------------


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


@pytest.mark.parametrize("seed", range(int(__import__("os").environ.get("RT_SEEDS", "4"))))
async def test_random_workloads_keep_kv_consistent(seed: int) -> None:
    """Forks, truncations, snapshots, priorities and suspension under a small pool never corrupt KV."""
    runtime = content_runtime(num_pages=40, page_size=4, page_wait_timeout_s=5.0)
    model = runtime.model()
    rng = random.Random(seed)
    prefixes = [[rng.randrange(VOCAB) for _ in range(40)] for _ in range(3)]
    results: list[int] = []

    async def body(instance: Instance, i: int) -> str:
        results.append(await random_instance(instance.host, random.Random(seed * 100 + i), prefixes, 40))
        return "ok"

    procs = [runtime.spawn(lambda inst, i=i: body(inst, i), program="random", username="u") for i in range(4)]
    finals = [await p.wait() for p in procs]
    assert [f.value for f in finals] == ["ok"] * 4, finals
    assert sum(results) > 100
    stats = model.scheduler.stats
    assert stats.suspensions > 0 and stats.cached_tokens > 0, stats  # both paths were exercised
    runtime.check_integrity()
    assert model.pool.num_used == 0  # every instance's pages came back
    await runtime.shutdown(0)


async def test_suspended_context_is_recomputed_on_its_next_pass() -> None:
    runtime = content_runtime(num_pages=12, page_size=4)
    model = runtime.model()

    async def body(instance: Instance) -> str:
        host = instance.host
        old = host.ctx_create("")
        seq_old = list(range(10, 42))  # 8 pages
        await forward(host, old, seq_old, [argmax_at(31)])
        host.ctx_set_priority(old, -1.0)
        new = host.ctx_create("")
        seq_new = list(range(100, 128))  # 7 pages: only fits if `old` gives its pages up
        values = await forward(host, new, seq_new, [argmax_at(27)])
        assert values == expected(seq_new, 0, [27])
        host.ctx_destroy(new)
        values = await forward(host, old, [5], [argmax_at(0)])  # re-prefilled first, then the new token
        assert values == expected([*seq_old, 5], 32, [0])
        return "ok"

    final = await runtime.spawn(body, program="t", username="u").wait()
    assert final.value == "ok", final
    assert model.scheduler.stats.suspensions == 1
    runtime.check_integrity()
    await runtime.shutdown(0)
