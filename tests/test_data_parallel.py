"""Data parallelism: one model served by two engine groups (two CPU engines of the tiny model).

What a user relies on: inferlets launched together are spread over the groups and answer exactly as
with one group; a context, its forks and the snapshots saved from it stay on the group holding their
pages (a context opened from a snapshot runs there, whatever group is less loaded); model status
counts every group; the config's devices become one engine per group.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from runtime_support import forward, greedy, run

from pie.config import parse_config
from pie.engine.config import EngineConfig
from pie.errors import ConfigError, ModelNotFoundError
from pie.runtime.model_runtime import EngineGroup
from pie.runtime.runtime import ModelSpec, Runtime, RuntimeConfig, runtime_config
from pie.tiny_model import ensure_tiny_model

PROMPTS = ("Count to three.", "Name a colour.")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("pie-home"))


def engine(model_dir: Path, **options: Any) -> EngineConfig:
    return EngineConfig(model=str(model_dir), device="cpu", max_num_kv_pages=128, **options)


async def start(model_dir: Path, groups: int) -> Runtime:
    home = model_dir.parent.parent.parent
    spec = ModelSpec("tiny", tuple(engine(model_dir) for _ in range(groups)))
    return await Runtime.start(RuntimeConfig((spec,), pie_home=home))


async def complete_together(runtime: Runtime) -> list[str]:
    """text-completion on every prompt, all launched before any is awaited."""
    procs = [await runtime.launch("text-completion", json.dumps({"prompt": p, "max_tokens": 12}), username="u")
             for p in PROMPTS]
    finals = [await p.wait() for p in procs]
    assert [f.kind for f in finals] == ["return"] * len(PROMPTS), finals
    return [str(f.value) for f in finals]


def batches(group: EngineGroup) -> int:
    return group.scheduler.stats.batches


async def test_inferlets_launched_together_run_on_different_groups_with_single_group_results(tiny: Path) -> None:
    single = await start(tiny, 1)
    expected = await complete_together(single)
    await single.shutdown(0)

    runtime = await start(tiny, 2)
    model = runtime.model()
    assert len(model.groups) == 2
    assert await complete_together(runtime) == expected
    g0, g1 = model.groups
    assert g0.scheduler.stats.tokens_processed > 0 and g1.scheduler.stats.tokens_processed > 0, \
        "both inferlets ran on one group"
    (status,) = runtime.models()
    assert status.pages_total == g0.pool.num_pages + g1.pool.num_pages == 256
    assert status.tokens_processed == g0.scheduler.stats.tokens_processed + g1.scheduler.stats.tokens_processed
    assert status.batches == batches(g0) + batches(g1) and status.device == "cpu,cpu"
    assert model.describe()["num_pages"] == 128  # what one context can grow to: one group's pool
    runtime.check_integrity()
    assert g0.pool.num_used == g1.pool.num_used == 0
    await runtime.shutdown(0)


async def test_forks_and_snapshots_stay_on_the_group_holding_their_pages(tiny: Path) -> None:
    runtime = await start(tiny, 2)
    g0, g1 = runtime.model().groups
    prompt = list(range(5, 45))

    async def save_on_group_1(host: Any) -> list[int]:
        filler = host.ctx_create("")  # the first context goes to group 0 ...
        await forward(host, filler, list(range(100, 140)))
        ctx = host.ctx_create("")  # ... so group 1 is the less loaded one now
        g0_batches, g1_used = batches(g0), g1.pool.num_used
        await forward(host, ctx, prompt)
        assert g1.pool.num_used > g1_used and batches(g0) == g0_batches
        child = host.ctx_fork(ctx)
        continued = await greedy(host, child, [50, 51], 6)
        assert batches(g0) == g0_batches, "the fork ran on the other group"
        host.ctx_save(ctx, "system")
        return continued

    continued = await run(runtime, save_on_group_1)
    assert g0.pool.num_used == 0 and g1.pool.num_used > 0  # only the snapshot's pages remain
    # A context fed the same tokens from scratch continues the same way (the fork's KV was really there).
    assert await run(runtime, lambda host: greedy(host, host.ctx_create(""), [*prompt, 50, 51], 6)) == continued

    async def open_and_take(host: Any) -> tuple[list[int], list[int]]:
        assert runtime.model().place() is g0  # a fresh context would go to group 0 ...
        g0_batches = batches(g0)
        opened = await greedy(host, host.ctx_open("", "system"), [50, 51], 6)  # ... the snapshot's goes to 1
        taken = await greedy(host, host.ctx_take("", "system"), [50, 51], 6)
        assert batches(g0) == g0_batches, "a context from the group-1 snapshot ran on group 0"
        return opened, taken

    assert await run(runtime, open_and_take) == (continued, continued)
    runtime.check_integrity()
    assert g0.pool.num_used == g1.pool.num_used == 0 and not runtime.model().snapshots
    await runtime.shutdown(0)


async def test_a_group_that_fails_to_start_fails_the_start(tiny: Path) -> None:
    spec = ModelSpec("tiny", (engine(tiny), engine(tiny.parent / "missing")))
    with pytest.raises(ModelNotFoundError, match="missing"):
        await Runtime.start(RuntimeConfig((spec,)))


async def test_groups_of_different_engines_are_refused(tiny: Path) -> None:
    spec = ModelSpec("tiny", (engine(tiny), engine(tiny, kv_page_size=8)))
    with pytest.raises(ConfigError, match="group 1 has page_size = 8, group 0 has 16"):
        await Runtime.start(RuntimeConfig((spec,)))


def test_config_devices_become_one_engine_per_group(tmp_path: Path) -> None:
    config = parse_config({"model": {"name": "m", "hf_repo": "pie/tiny-random",
                                     "device": ["cuda:0", "cuda:1", "cuda:2"], "kv_page_size": 8,
                                     "ready_timeout_s": 42.0},
                           "runtime": {"max_concurrent_processes": 3}}, source=None, home=tmp_path)
    (spec,) = runtime_config(config).models
    assert [e.device for e in spec.engines] == ["cuda:0", "cuda:1", "cuda:2"]
    assert spec.ready_timeout_s == 42.0  # how long worker processes may take to load (tensor parallel)
    assert {e.kv_page_size for e in spec.engines} == {8} and spec.engine is spec.engines[0]
    assert runtime_config(config).limits.max_concurrent_processes == 3
    single = ModelSpec("m", EngineConfig())  # the one-group form
    assert single.engines == (EngineConfig(),)
    tp = parse_config({"model": {"device": ["cuda:0", "cuda:1", "cuda:2", "cuda:3"], "tensor_parallel_size": 2}},
                      source=None, home=tmp_path)
    assert tp.models[0].data_parallel_groups() == [["cuda:0", "cuda:1"], ["cuda:2", "cuda:3"]]
    groups = runtime_config(tp).models[0].engines  # 4 GPUs, TP 2 -> 2 groups of 2 (the seed's rule)
    assert [(e.tensor_parallel_size, e.tp_devices) for e in groups] == \
        [(2, ("cuda:0", "cuda:1")), (2, ("cuda:2", "cuda:3"))]
