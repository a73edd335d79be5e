"""The runtime on the real engine (tiny random qwen3 on CPU), driven through the Host protocol.

Each test checks something an inferlet author relies on: concurrent
generations equal solo ones, a fork continues exactly like a recomputation,
shared prefixes are stored and computed once, snapshots behave as named,
a context survives suspension, and every page comes back.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from runtime_support import argmax_at, forward, greedy, logits_at, run, start_runtime
from timing import wait_for_async

from inferlet._host import HostError
from pie.engine.brle import encode as brle_encode
from pie.runtime.instance import Instance
from pie.runtime.runtime import Runtime, RuntimeLimits
from pie.tiny_model import ensure_tiny_model

PS = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("pie-home"))


def prompts(n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 500, int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]


def f32(value: Any) -> np.ndarray:
    return np.frombuffer(value, dtype="<f4")


async def row_logits(runtime: Runtime, tokens: list[int], rows: list[int]) -> list[np.ndarray]:
    """Logits at `rows` of a fresh context fed `tokens` in one pass."""
    async def body(host: Any) -> list[Any]:
        ctx = host.ctx_create("")
        return await forward(host, ctx, tokens, [logits_at(r) for r in rows])

    return [f32(v) for v in await run(runtime, body)]


async def test_64_concurrent_generations_equal_each_alone(tiny: Path) -> None:
    runtime = await start_runtime(tiny, max_num_kv_pages=512)
    ps = prompts(64, 5, 60)
    outs: dict[int, list[int]] = {}

    async def gen(instance: Instance, i: int) -> str:
        outs[i] = await greedy(instance.host, instance.host.ctx_create(""), ps[i], 32)
        return "ok"

    procs = [runtime.spawn(lambda inst, i=i: gen(inst, i), program="gen", username="u") for i in range(64)]
    assert [(await p.wait()).kind for p in procs] == ["return"] * 64
    assert runtime.model().scheduler.stats.batches <= 40  # they really shared batches
    # Alone, teacher-forced: one pass over prompt + output; every output must be that row's argmax.
    for i in range(64):
        seq = ps[i] + outs[i]
        rows = list(range(len(ps[i]) - 1, len(seq) - 1))
        logits = await row_logits(runtime, seq, rows)
        assert [int(np.argmax(x)) for x in logits] == outs[i], f"sequence {i} differs from its solo run"
    # Alone, really decoding, for a few.
    for i in (0, 17, 63):
        solo = await run(runtime, lambda host, i=i: greedy(host, host.ctx_create(""), ps[i], 32))
        assert solo == outs[i]
    runtime.check_integrity()
    assert runtime.model().pool.num_used == 0
    await runtime.shutdown(0)


async def test_fork_continues_exactly_like_a_recomputation(tiny: Path) -> None:
    runtime = await start_runtime(tiny)
    prompt, x, y = prompts(1, 37, 37)[0], [7, 8, 9, 10, 11], [20, 21]
    pool = runtime.model().pool

    async def body(host: Any) -> tuple[list[Any], list[Any]]:
        parent = host.ctx_create("")
        await forward(host, parent, prompt)  # 2 committed pages + 5 tokens in a working page
        used = pool.num_used
        child = host.ctx_fork(parent)
        assert pool.num_used == used, "fork copied pages eagerly"
        assert host.ctx_state(child) == host.ctx_state(parent) == (2, 1, 5)
        got_child = await forward(host, child, x, [logits_at(len(x) - 1), {"index": len(x) - 1, "probe": {
            "kind": "distribution", "k": 8}}])
        got_parent = await forward(host, parent, y, [logits_at(len(y) - 1)])
        return got_child, got_parent

    got_child, got_parent = await run(runtime, body)
    (ref_child,) = await row_logits(runtime, prompt + x, [len(prompt) + len(x) - 1])
    (ref_parent,) = await row_logits(runtime, prompt + y, [len(prompt) + len(y) - 1])
    np.testing.assert_allclose(f32(got_child[0]), ref_child, atol=1e-4)
    np.testing.assert_allclose(f32(got_parent[0]), ref_parent, atol=1e-4)
    ids, probs = got_child[1]
    assert list(ids) == list(np.argsort(-ref_child)[:8])
    assert abs(sum(probs) - float(np.sort(np.exp(ref_child - ref_child.max()) /
                                          np.exp(ref_child - ref_child.max()).sum())[-8:].sum())) < 1e-4
    runtime.check_integrity()
    await runtime.shutdown(0)


async def test_shared_prefix_is_stored_and_computed_once(tiny: Path) -> None:
    runtime = await start_runtime(tiny, max_num_kv_pages=600)
    model = runtime.model()
    prefix = prompts(1, 1000, 1000, seed=1)[0]
    n = 8
    suffixes = prompts(n, 8, 8, seed=2)
    hold = asyncio.Event()
    firsts: dict[int, int] = {}

    async def request(instance: Instance, i: int) -> str:
        host = instance.host
        ctx = host.ctx_create("")
        tokens = prefix + suffixes[i]
        firsts[i] = (await forward(host, ctx, tokens, [argmax_at(len(tokens) - 1)]))[0]
        await hold.wait()  # keep the context (and its pages) while the test counts
        return "ok"

    # All at once: one of them computes the prefix, the others wait for its pages and attach them.
    procs = [runtime.spawn(lambda inst, i=i: request(inst, i), program="r", username="u") for i in range(n)]
    await wait_for_async(lambda: len(firsts) == n, 60, f"the first token of all {n} requests")
    full_prefix_pages = len(prefix) // PS  # 62; the 63rd page mixes prefix and suffix: one per request
    assert model.pool.num_used <= full_prefix_pages + n * 2, model.pool.usage()
    computed = model.scheduler.stats.tokens_processed
    assert computed <= len(prefix) + 8 + (n - 1) * (len(prefix) + 8 - full_prefix_pages * PS), computed
    assert model.scheduler.stats.cached_tokens == (n - 1) * full_prefix_pages * PS
    hold.set()
    for p in procs:
        assert (await p.wait()).kind == "return"
    for i in (0, 5):  # the shared pages hold the same KV as computing each prompt alone
        fresh = await start_runtime(tiny, max_num_kv_pages=600)
        (logits,) = await row_logits(fresh, prefix + suffixes[i], [len(prefix) + 7])
        assert int(np.argmax(logits)) == firsts[i]
        await fresh.shutdown(0)
    assert model.pool.num_used == 0 and model.pool.num_cached > 0
    runtime.check_integrity()
    await runtime.shutdown(0)


async def test_snapshots_open_take_delete_scoped_per_user(tiny: Path) -> None:
    runtime = await start_runtime(tiny)
    pool = runtime.model().pool
    prompt = prompts(1, 40, 40)[0]

    async def alice_saves(host: Any) -> None:
        ctx = host.ctx_create("")
        await forward(host, ctx, prompt)
        host.ctx_save(ctx, "sys")
        with pytest.raises(HostError, match="already exists"):
            host.ctx_save(ctx, "sys")

    await run(runtime, alice_saves)
    assert pool.num_used > 0  # the snapshot outlives the instance

    async def bob(host: Any) -> None:
        with pytest.raises(HostError, match="no snapshot named 'sys'"):
            host.ctx_open("", "sys")
        host.ctx_save(host.ctx_create(""), "sys")  # his own namespace
        host.ctx_delete("", "sys")

    await run(runtime, bob, username="bob")

    async def alice_uses(host: Any) -> list[np.ndarray]:
        opened = host.ctx_open("", "sys")  # a fork: the snapshot stays
        taken = host.ctx_take("", "sys")  # the snapshot itself: now gone
        assert host.ctx_state(opened) == host.ctx_state(taken) == (2, 1, 8)
        with pytest.raises(HostError, match="no snapshot"):
            host.ctx_open("", "sys")
        with pytest.raises(HostError, match="no snapshot"):
            host.ctx_delete("", "sys")
        # Both continue the saved prompt.
        return [f32((await forward(host, c, [5], [logits_at(0)]))[0]) for c in (opened, taken)]

    continued = await run(runtime, alice_uses)
    (ref,) = await row_logits(runtime, [*prompt, 5], [len(prompt)])
    for got in continued:
        np.testing.assert_allclose(got, ref, atol=1e-4)
    assert pool.num_used == 0  # taken by an instance that ended: nothing left
    runtime.check_integrity()
    await runtime.shutdown(0)


async def test_terminating_or_failing_frees_every_page(tiny: Path) -> None:
    runtime = await start_runtime(tiny)
    pool = runtime.model().pool
    started = asyncio.Event()

    async def busy(instance: Instance) -> str:
        host = instance.host
        ctx = host.ctx_create("")
        await forward(host, ctx, prompts(1, 50, 50)[0])
        forks = [host.ctx_fork(ctx) for _ in range(4)]
        started.set()
        await asyncio.gather(*(greedy(host, f, [3 + i], 10_000) for i, f in enumerate(forks)))
        return "never"

    async def failing(instance: Instance) -> str:
        host = instance.host
        await forward(host, host.ctx_create(""), prompts(1, 70, 70)[0])
        raise RuntimeError("the inferlet broke")

    proc = runtime.spawn(busy, program="busy", username="u")
    await started.wait()
    stats = runtime.model().scheduler.stats
    decoded = stats.tokens_processed
    # Terminated mid-generation: once the forks have decoded (pages held, passes in flight).
    await wait_for_async(lambda: stats.tokens_processed >= decoded + 8, 30, "the forks to decode")
    assert pool.num_used > 0
    await proc.terminate("stopped by the test")
    final = await proc.wait()
    assert (final.kind, final.value, proc.status) == ("error", "stopped by the test", "terminated")
    assert pool.num_used == 0
    final = await runtime.spawn(failing, program="failing", username="u").wait()
    assert final.kind == "error" and "RuntimeError: the inferlet broke" in str(final.value)
    assert pool.num_used == 0 and pool.num_free + pool.num_cached == pool.num_pages
    runtime.check_integrity()
    await runtime.shutdown(0)


async def test_suspended_context_finishes_with_the_same_tokens(tiny: Path) -> None:
    # 24 pages of 16 slots: the two contexts (10 + 15 pages) cannot both be resident.
    limits = RuntimeLimits(page_wait_timeout_s=20, max_page_share_per_instance=0.0)
    runtime = await start_runtime(tiny, limits, max_num_kv_pages=24, max_batch_tokens=64)
    low_prompt, high_prompt = prompts(2, 150, 200, seed=3)
    half = asyncio.Event()
    high_done = asyncio.Event()

    async def low(host: Any) -> list[int]:
        ctx = host.ctx_create("")
        host.ctx_set_priority(ctx, -1.0)
        first = await greedy(host, ctx, low_prompt, 10)
        half.set()
        await high_done.wait()  # idle here while the other context needs our pages
        return first + await greedy(host, ctx, [first[-1]], 10)

    async def high(host: Any) -> list[int]:
        await half.wait()
        out = await greedy(host, host.ctx_create(""), high_prompt, 20)
        high_done.set()
        return out

    got_low, got_high = await asyncio.gather(run(runtime, low), run(runtime, high))
    assert runtime.model().scheduler.stats.suspensions >= 1
    big = await start_runtime(tiny, max_num_kv_pages=256)
    solo_high = await run(big, lambda host: greedy(host, host.ctx_create(""), high_prompt, 20))

    async def solo_low(host: Any) -> list[int]:
        ctx = host.ctx_create("")
        first = await greedy(host, ctx, low_prompt, 10)
        return first + await greedy(host, ctx, [first[-1]], 10)

    assert got_low == await run(big, solo_low)
    assert got_high == solo_high
    runtime.check_integrity()
    await big.shutdown(0)
    await runtime.shutdown(0)


async def test_chunked_prefill_equals_one_pass(tiny: Path) -> None:
    prompt = prompts(1, 200, 200, seed=4)[0]
    rows = [10, 150, 199]
    chunked = await start_runtime(tiny, max_batch_tokens=32)
    whole = await start_runtime(tiny)
    got = await row_logits(chunked, prompt, rows)
    ref = await row_logits(whole, prompt, rows)
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert chunked.model().scheduler.stats.batches >= 200 // 32
    await chunked.shutdown(0)
    await whole.shutdown(0)


async def test_attention_masks_apply_and_masked_pages_stay_private(tiny: Path) -> None:
    runtime = await start_runtime(tiny)
    prompt = prompts(1, 32, 32, seed=5)[0]
    n = len(prompt)
    causal = [brle_encode(np.arange(n) <= i) for i in range(n)]
    window = [brle_encode((np.arange(n) <= i) & (np.arange(n) > i - 4)) for i in range(n)]

    async def body(host: Any) -> list[np.ndarray]:
        out = []
        for mask in (None, causal, window):
            ctx = host.ctx_create("")
            extra = {} if mask is None else {"attention_mask": [list(m) for m in mask]}
            out.append(f32((await forward(host, ctx, prompt, [logits_at(n - 1)], **extra))[0]))
        return out

    plain, as_causal, windowed = await run(runtime, body)
    np.testing.assert_allclose(as_causal, plain, atol=1e-4)
    assert np.abs(windowed - plain).max() > 1e-3
    assert len(runtime.model().trie) == n // PS  # only the unmasked context's pages are shareable
    await runtime.shutdown(0)


async def test_bad_passes_are_refused_and_leave_the_context_usable(tiny: Path) -> None:
    runtime = await start_runtime(tiny)

    async def bad(host: Any) -> list[int]:
        ctx = host.ctx_create("")
        cases: list[tuple[dict[str, Any], str]] = [
            ({"tokens": [], "positions": []}, "empty forward pass"),
            ({"tokens": [1, 2], "positions": [0, 1]}, "KV capacity exceeded"),
        ]
        for spec, why in cases:
            with pytest.raises(HostError, match=why):
                await host.ctx_forward(ctx, spec)
        with pytest.raises(HostError, match="more than the 256 the KV pool has"):
            host.ctx_reserve(ctx, 300)
        host.ctx_reserve(ctx, 1)
        cases = [
            ({"tokens": [10**6], "positions": [0]}, "outside the model's vocabulary"),
            ({"tokens": [1, 2], "positions": [0]}, "2 tokens but 1 positions"),
            ({"tokens": [1, 2], "positions": [0, 1], "attention_mask": [[0, 2]]}, "1 rows for 2 input tokens"),
            ({"tokens": [1, 2], "positions": [0, 1], "attention_mask": [[0, 1], [0, 2]]}, "covers 1 slots"),
            ({"tokens": [1, 2], "positions": [0, 1], "attention_mask": [[2], [0, 2]]}, "attends to nothing"),
            ({"tokens": [1], "positions": [0], "slots": [argmax_at(3)]}, "reads row 3"),
            ({"tokens": [1], "positions": [0], "slots": [{"indices": [0], "sampler": {"kind": "magic"}}]},
             "unknown sampler"),
            ({"tokens": [1], "positions": [0], "slots": [{"index": 0, "probe": {"kind": "distribution",
                                                                                 "k": 10**6}}]},
             "over max_dist_size"),
            ({"tokens": [1], "positions": [0], "logit_mask": [5]}, "allows no token"),
            ({"tokens": ["a"], "positions": [0]}, "lists of integers"),
            ({"tokens": [1], "positions": [0], "slots": ["sampler"]}, "must be a dict"),
            ({"tokens": [1], "positions": [0], "slots": [{"indices": [0], "sampler": [1]}]}, "must be a dict such"),
            ({"tokens": [1], "positions": [0], "attention_mask": "x"}, "list of BRLE rows"),
        ]
        for spec, why in cases:
            with pytest.raises(HostError, match=why):
                await host.ctx_forward(ctx, spec)
        assert host.ctx_state(ctx) == (0, 1, 0)  # nothing was recorded
        pending = asyncio.ensure_future(host.ctx_forward(ctx, {"tokens": [1], "positions": [0]}))
        await asyncio.sleep(0)
        with pytest.raises(HostError, match="already has a forward pass pending"):
            await host.ctx_forward(ctx, {"tokens": [2], "positions": [1]})
        with pytest.raises(HostError, match="pending"):
            host.ctx_fork(ctx)
        await pending
        return await greedy(host, ctx, [2, 3], 3)

    async def good(host: Any) -> list[int]:
        return await greedy(host, host.ctx_create(""), [1, 2, 3], 3)

    got_bad, got_good = await asyncio.gather(run(runtime, bad), run(runtime, good))
    assert got_bad == await run(runtime, lambda host: greedy(host, host.ctx_create(""), [1, 2, 3], 3))
    assert got_good == got_bad
    await runtime.shutdown(0)
