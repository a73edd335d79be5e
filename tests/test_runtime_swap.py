"""KV swap in the runtime: suspended contexts go to the engine's host swap pool and come back intact.

On the real engine (tiny random model, CPU): a context swapped out and back in
predicts exactly as before; inferlets that cannot all be resident finish with
their solo outputs, without recomputation when the host pool is large enough,
with a mix of swap and recomputation when it is small, and by recomputation
alone without a pool. On `SwapContentEngine` (slot contents recorded, see
test_runtime_pages.py): random workloads keep every context's KV right while
slots run out and are reused.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from content_engine import ContentEngine, run_random_instances
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from runtime_support import forward, greedy, logits_at, run, start_runtime
from timing import scaled

from pie import telemetry
from pie.engine.batch import BatchResult, ForwardBatch
from pie.runtime.instance import Instance
from pie.runtime.jobs import SchedulerStats
from pie.runtime.runtime import ModelRuntime, Runtime, RuntimeLimits
from pie.tiny_model import ensure_tiny_model

PS = 16  # the tiny model's default page size


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("pie-home"))


def prompts(n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 500, int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]


def host_slots_held(runtime: Runtime) -> int:
    host = runtime.model().space.host
    return 0 if host is None else host.num_held


# -- the real engine -------------------------------------------------------------------------------


async def test_swapped_out_context_predicts_exactly_as_before(tiny: Path) -> None:
    # 12 pages: `old` (7 pages) and `new` (10 pages) cannot both be resident.
    runtime = await start_runtime(tiny, max_num_kv_pages=12, swap_pool_size=32)
    stats = runtime.model().scheduler.stats
    (prompt_old,), (prompt_new,) = prompts(1, 100, 100, seed=5), prompts(1, 150, 150, seed=6)
    probe = [logits_at(0), {"index": 0, "probe": {"kind": "distribution", "k": 16}}]

    async def body(host: Any) -> tuple[list[Any], list[Any]]:
        old = host.ctx_create("")
        await forward(host, old, prompt_old)  # 6 committed pages + 4 tokens in a working page
        before = await forward(host, old, [7], probe)
        host.ctx_truncate(old, 1)
        host.ctx_set_priority(old, -1.0)
        new = host.ctx_create("")
        await forward(host, new, prompt_new)  # 10 pages: only fits once `old` is swapped out
        assert stats.swapped_out_pages == 7 and stats.swapped_in_pages == 0, stats
        runtime.check_integrity()
        host.ctx_destroy(new)
        after = await forward(host, old, [7], probe)  # swapped back in with this pass
        return before, after

    computed_before = stats.tokens_processed
    before, after = await run(runtime, body)
    assert stats.swapped_in_pages == 7 and stats.recomputed_suspensions == 0, stats
    # Nothing was recomputed: the three passes of `old` and the one of `new`, once each.
    assert stats.tokens_processed - computed_before == 100 + 1 + 150 + 1
    np.testing.assert_array_equal(np.frombuffer(after[0], "<f4"), np.frombuffer(before[0], "<f4"))
    assert list(after[1][0]) == list(before[1][0]) and list(after[1][1]) == list(before[1][1])
    runtime.check_integrity()
    assert host_slots_held(runtime) == 0 and runtime.model().pool.num_used == 0
    await runtime.shutdown(0)


NUM_INFERLETS, NUM_NEW = 8, 40


@pytest.fixture(scope="module")
def workload() -> list[list[int]]:
    return prompts(NUM_INFERLETS, 20, 40, seed=11)


@pytest.fixture(scope="module")
def solo_outputs(tiny: Path, workload: list[list[int]]) -> list[list[int]]:
    """Each inferlet's greedy tokens, run alone on a pool that holds everything (shared by the module)."""
    async def solo() -> list[list[int]]:
        big = await start_runtime(tiny, max_num_kv_pages=256)
        outs = [await run(big, lambda host, p=p: greedy(host, host.ctx_create(""), p, NUM_NEW)) for p in workload]
        await big.shutdown(0)
        return outs

    return asyncio.run(solo())


async def run_crowded(tiny: Path, workload: list[list[int]], swap_pool_size: int) -> tuple[list[Any], SchedulerStats]:
    """All inferlets at once on 12 pages (each needs up to 5): returns their final events and the stats."""
    runtime = await start_runtime(tiny, RuntimeLimits(page_wait_timeout_s=60, max_page_share_per_instance=0.0), max_num_kv_pages=12,
                                  swap_pool_size=swap_pool_size)
    outs: dict[int, list[int]] = {}

    async def gen(instance: Instance, i: int) -> str:
        outs[i] = await greedy(instance.host, instance.host.ctx_create(""), workload[i], NUM_NEW)
        return "ok"

    procs = [runtime.spawn(lambda inst, i=i: gen(inst, i), program="gen", username="u")
             for i in range(len(workload))]
    finals = [await p.wait() for p in procs]
    runtime.check_integrity()
    assert host_slots_held(runtime) == 0 and runtime.model().pool.num_used == 0
    stats = runtime.model().scheduler.stats
    await runtime.shutdown(0)
    return [(f.kind, outs.get(i)) for i, f in enumerate(finals)], stats


@pytest.mark.parametrize("swap_pool_size", [64, 6, 0], ids=["swap", "small-swap", "no-swap"])
async def test_crowded_inferlets_all_finish_with_their_solo_tokens(
        tiny: Path, workload: list[list[int]], solo_outputs: list[list[int]], swap_pool_size: int) -> None:
    got, stats = await run_crowded(tiny, workload, swap_pool_size)
    assert got == [("return", out) for out in solo_outputs]  # none killed, none changed
    assert stats.suspensions > 0, stats
    solo_tokens = sum(len(p) + NUM_NEW - 1 for p in workload)
    if swap_pool_size == 64:  # every suspension fit in the host pool: nothing was computed twice
        assert stats.swapped_out_pages > 0 and stats.recomputed_suspensions == 0, stats
        assert stats.swapped_in_pages == stats.swapped_out_pages
        assert stats.tokens_processed == solo_tokens
    elif swap_pool_size == 6:  # slots ran out: some suspensions fell back to recomputation
        assert stats.swapped_out_pages > 0 and stats.recomputed_suspensions > 0, stats
    else:
        assert stats.swapped_out_pages == 0 and stats.recomputed_suspensions > 0, stats
        assert stats.tokens_processed > solo_tokens


# -- the bookkeeping, on an engine that records what each slot holds ----------------------------------


class SwapContentEngine(ContentEngine):
    """ContentEngine plus a host swap pool: swap-outs, then swap-ins, then the rest (the batch contract)."""

    def __init__(self, num_pages: int, page_size: int, num_swap_slots: int) -> None:
        super().__init__(num_pages, page_size)
        self.info.num_swap_slots = num_swap_slots
        self.host: list[list[tuple[int, int] | None] | None] = [None] * num_swap_slots

    async def forward(self, batch: ForwardBatch) -> BatchResult:
        for targets in ([s for _, s in batch.swap_out], [p for _, p in batch.swap_in]):
            assert len(set(targets)) == len(targets), f"a batch swaps twice into the same place: {targets}"
        for page, slot in batch.swap_out:
            self.host[slot] = list(self.kv[page])
        for slot, page in batch.swap_in:
            content = self.host[slot]
            assert content is not None, f"swap-in of host slot {slot}, which nothing was swapped out to"
            self.kv[page] = list(content)
        return await super().forward(batch)


@pytest.mark.parametrize("seed", range(4))
async def test_random_workloads_with_swap_keep_kv_consistent(seed: int) -> None:
    """Forks, truncations, snapshots, priorities and suspension to a small host pool never corrupt KV."""
    engine = SwapContentEngine(num_pages=40, page_size=4, num_swap_slots=12)
    limits = RuntimeLimits(page_wait_timeout_s=scaled(5.0), max_page_share_per_instance=0.0)
    runtime = Runtime({"m": ModelRuntime("m", engine, limits)}, limits)
    assert await run_random_instances(runtime, seed) > 100
    stats = runtime.model().scheduler.stats
    assert stats.swapped_out_pages > 0 and stats.swapped_in_pages > 0, stats
    runtime.check_integrity()
    assert host_slots_held(runtime) == 0 and runtime.model().pool.num_used == 0
    await runtime.shutdown(0)


async def test_integrity_check_catches_a_leaked_host_slot() -> None:
    runtime = Runtime({"m": ModelRuntime("m", SwapContentEngine(8, 4, 4), RuntimeLimits())}, RuntimeLimits())
    host = runtime.model().space.host
    assert host is not None and host.num_slots == 4
    host.allocate(1)  # held by no context
    with pytest.raises(AssertionError, match="leaked"):
        runtime.check_integrity()
    await asyncio.sleep(0)
    await runtime.shutdown(0)


async def test_each_engine_batch_is_a_span_with_its_sizes_and_swaps() -> None:
    exporter = InMemorySpanExporter()
    with telemetry.configured(enabled=True, exporter=exporter):
        engine = SwapContentEngine(num_pages=12, page_size=4, num_swap_slots=16)
        engine.info.model_name = "content"
        whole_pool = RuntimeLimits(max_page_share_per_instance=0.0)  # one instance swaps against itself
        runtime = Runtime({"m": ModelRuntime("m", engine, whole_pool)}, whole_pool)

        async def body(host: Any) -> None:
            old = host.ctx_create("")
            await forward(host, old, list(range(10, 38)))  # 7 pages
            host.ctx_set_priority(old, -1.0)
            new = host.ctx_create("")
            await forward(host, new, list(range(100, 140)))  # 10 pages: `old` goes to host
            host.ctx_destroy(new)
            await forward(host, old, [5])  # and comes back

        await run(runtime, body)
        await runtime.shutdown(0)
    spans = [s for s in exporter.get_finished_spans() if s.name == "engine.batch"]
    sizes = [(s.attributes["num_requests"], s.attributes["num_tokens"], s.attributes["num_swap_out"],
              s.attributes["num_swap_in"]) for s in spans]
    assert sizes == [(1, 28, 0, 0), (1, 40, 7, 0), (1, 1, 0, 7)]
    assert {s.attributes["model"] for s in spans} == {"content"}
