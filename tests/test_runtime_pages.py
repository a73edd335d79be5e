"""Page pool, prefix trie and contexts: the bookkeeping invariants, checked against what the KV holds.

The property test runs the real runtime (host, contexts, scheduler, snapshots)
on `content_engine.ContentEngine`, a KV store that records which (token,
position) each page slot holds, so any page handed out twice, a missed
copy-on-write, a wrong prefix-cache hit or a bad re-prefill after suspension
shows up as a wrong token. The real engine's tensors are covered by
test_runtime_engine.py.
"""

from __future__ import annotations

import pytest
from content_engine import content_runtime, expected, run_random_instances
from runtime_support import argmax_at, forward
from timing import scaled

from pie.errors import OutOfPagesError
from pie.runtime.context_space import ContextSpace
from pie.runtime.instance import Instance
from pie.runtime.pages import PagePool
from pie.runtime.prefix_trie import PrefixTrie, page_key

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


@pytest.mark.parametrize("seed", range(int(__import__("os").environ.get("RT_SEEDS", "4"))))
async def test_random_workloads_keep_kv_consistent(seed: int) -> None:
    """Forks, truncations, snapshots, priorities and suspension under a small pool never corrupt KV."""
    runtime = content_runtime(num_pages=40, page_size=4, page_wait_timeout_s=scaled(5.0))
    model = runtime.model()
    assert await run_random_instances(runtime, seed) > 100
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
