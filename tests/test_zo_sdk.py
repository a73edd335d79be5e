"""`inferlet.zo`, `Forward.zo_seed`, `Generator.zo_seed` and `ctx.generate(zo_seed=...)` through the runtime,
as Pie documents them: perturbed passes batch with each other, generation under a seed equals pass-by-pass
decoding under it, and a program that runs a few ES generations on a toy reward (the log-probability of
one token) improves it, leaving exactly the adapter the engine's update formula gives."""

from __future__ import annotations

import asyncio
import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from engine_helpers import make_engine, rel_err
from inferlet_helpers import result, run_sdk, start_runtime

from inferlet import Adapter, Context, HostError, Logits, Model, Sampler, zo
from pie.tiny_model import ensure_tiny_model

PROMPT = [12, 40, 41, 7, 99]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("pie-home"))


def floats(value: bytes) -> np.ndarray:
    return np.frombuffer(value, dtype="<f4")


async def last_logits(model: Model, adapter: Adapter | None, seed: int | None, via_zo: bool = False) -> bytes:
    ctx = Context(model)
    fwd = ctx.forward().input(PROMPT)
    if adapter is not None:
        fwd.adapter(adapter)
    if seed is not None:
        if via_zo:
            zo.adapter_seed(fwd, seed)
        else:
            fwd.zo_seed(seed)
    h = fwd.probe(len(PROMPT) - 1, Logits())
    out = await fwd.execute()
    ctx.release()
    value = out.logits(h)
    assert value is not None
    return value


async def greedy_by_passes(model: Model, adapter: Adapter, seed: int, n: int) -> list[int]:
    ctx = Context(model)
    feed, tokens = list(PROMPT), []
    for _ in range(n):
        fwd = ctx.forward().input(feed).adapter(adapter).zo_seed(seed)
        h = fwd.sample([len(feed) - 1], Sampler.argmax())
        token = (await fwd.execute()).token(h)
        assert token is not None
        tokens.append(token)
        feed = [token]
    ctx.release()
    return tokens


def test_the_zo_names_are_pies() -> None:
    from inferlet import Forward, Generator

    assert list(inspect.signature(zo.adapter_seed).parameters) == ["forward_pass", "seed"]
    assert list(inspect.signature(zo.initialize).parameters) == [
        "adapter", "rank", "alpha", "population_size", "mu_fraction", "initial_sigma"]
    assert list(inspect.signature(zo.update).parameters) == ["adapter", "scores", "seeds", "max_sigma"]
    assert list(inspect.signature(Forward.zo_seed).parameters) == ["self", "seed"]
    assert list(inspect.signature(Generator.zo_seed).parameters) == ["self", "seed"]
    assert inspect.signature(Context.generate).parameters["zo_seed"].default is None


async def test_zo_seeds_through_forward_generator_and_generate(tiny: Path) -> None:
    rt = await start_runtime(tiny, max_num_adapters=8)

    async def body() -> dict[str, Any]:
        model = Model.load("")
        adapter = Adapter.create(model, "es")
        with pytest.raises(HostError, match=r"no zeroth-order state; call zo\.initialize"):
            await last_logits(model, adapter, 3)
        zo.initialize(adapter, rank=2, alpha=4.0, population_size=4, mu_fraction=0.5, initial_sigma=0.5)
        got: dict[str, Any] = {
            "base": await last_logits(model, None, None),
            "unperturbed": await last_logits(model, adapter, None),
            "s3": await last_logits(model, adapter, 3),
            "s3_zo": await last_logits(model, adapter, 3, via_zo=True),
            "s4": await last_logits(model, adapter, 4),
        }
        # Passes of different seeds (and none) submitted together: the same values as one by one.
        got["together"] = await asyncio.gather(last_logits(model, adapter, 4), last_logits(model, adapter, 3),
                                               last_logits(model, adapter, None))
        with pytest.raises(HostError, match="zo_seed perturbs the pass's adapter, and this pass has none"):
            await last_logits(model, None, 3)
        by_passes = await greedy_by_passes(model, adapter, 3, 6)
        ctx = Context(model).append(PROMPT)
        generated = await ctx.generate(Sampler.argmax(), max_tokens=6, stop=[], adapter=adapter, zo_seed=3,
                                       auto_flush=False).collect_tokens()
        ctx = Context(model).append(PROMPT)
        chained = await ctx.generate(Sampler.argmax(), max_tokens=6, stop=[], adapter=adapter,
                                     auto_flush=False).zo_seed(3 + 2**64).collect_tokens()  # mod 2**64
        ctx = Context(model).append(PROMPT)
        plain = await ctx.generate(Sampler.argmax(), max_tokens=6, stop=[], adapter=adapter,
                                   auto_flush=False).collect_tokens()
        got.update(by_passes=by_passes, generated=generated, chained=chained, plain=plain,
                   perturbed_plain=await greedy_by_passes(model, adapter, 4, 6))
        # Saved and loaded back: plain weights with no ES state, until initialize (which keeps them).
        adapter.save("es-saved")
        adapter.load("es-saved")
        with pytest.raises(HostError, match="no zeroth-order state"):
            await last_logits(model, adapter, 3)
        zo.initialize(adapter, rank=2, alpha=4.0, population_size=4, mu_fraction=0.5, initial_sigma=0.5)
        got["s3_reloaded"] = await last_logits(model, adapter, 3)
        return got

    try:
        got = await run_sdk(rt, body)
    finally:
        await rt.shutdown(0)
    assert got["unperturbed"] == got["base"]  # a fresh zo adapter starts as the base model (lora_B = 0)
    assert got["s3"] == got["s3_zo"] != got["unperturbed"] and got["s3"] != got["s4"]
    assert rel_err(floats(got["s3_reloaded"]), floats(got["s3"])) < 1e-6
    for together, alone in zip(got["together"], [got["s4"], got["s3"], got["unperturbed"]], strict=True):
        assert rel_err(floats(together), floats(alone)) < 1e-5  # batched with others: the same up to rounding
    assert got["generated"] == got["chained"] == got["by_passes"]
    assert got["generated"] != got["plain"] or got["perturbed_plain"] != got["plain"]  # seeds change decoding


ES_PROGRAM = '''
import json
from inferlet import Adapter, Context, Logprob, Model, zo

PROMPT = [12, 40, 41, 7, 99]

async def reward(model, adapter, target, seed):
    ctx = Context(model)
    fwd = ctx.forward().input(PROMPT).adapter(adapter)
    if seed is not None:
        fwd.zo_seed(seed)
    h = fwd.probe(len(PROMPT) - 1, Logprob(target))
    out = await fwd.execute()
    ctx.release()
    return out.logprobs(h)[0]

async def main(input):
    model = Model.load("")
    adapter = Adapter.create(model, "es")
    p = input["es"]
    zo.initialize(adapter, p["rank"], p["alpha"], p["population"], p["mu_fraction"], p["sigma"])
    target, history, means = input["target"], [], [await reward(model, adapter, input["target"], None)]
    for g in range(input["generations"]):
        seeds = [1000 * g + i for i in range(p["population"])]
        scores = [await reward(model, adapter, target, s) for s in seeds]
        zo.update(adapter, scores, seeds, p["max_sigma"])
        history.append([scores, seeds])
        means.append(await reward(model, adapter, target, None))
    adapter.save("es-out")
    return json.dumps({"means": means, "history": history})
'''


@pytest.mark.parametrize("isolation", ["trusted", "isolated"])
async def test_an_es_program_raises_its_reward_and_leaves_the_adapter_the_formula_gives(
        tmp_path: Path, isolation: str) -> None:
    from safetensors.torch import load_file

    from pie.config import parse_config
    from pie.runtime.runtime import Runtime
    from pie.tiny_model import TINY_MODEL_ID

    base = ensure_tiny_model(tmp_path)
    (tmp_path / "programs" / "es").mkdir(parents=True)
    (tmp_path / "programs" / "es" / "Pie.toml").write_text('[package]\nname = "es"\nversion = "0.1.0"\n')
    (tmp_path / "programs" / "es" / "main.py").write_text(ES_PROGRAM)
    data: dict[str, Any] = {
        "model": {"hf_repo": TINY_MODEL_ID, "device": ["cpu"], "max_num_kv_pages": 64, "max_num_adapters": 16,
                  "adapter_path": str(tmp_path / "adapters")},
        "runtime": {"inferlet_paths": [str(tmp_path / "programs")], "isolation": isolation},
    }
    if isolation == "isolated":
        data["sandbox"] = {"scratch_root": str(tmp_path / "scratch"), "cpu_time_s": 60, "allow_weaker": True}
    # sigma well below lora_A's init scale (1 / sqrt(64)): the linear regime, where ES steps climb.
    es = {"rank": 2, "alpha": 4.0, "population": 8, "mu_fraction": 0.5, "sigma": 0.02, "max_sigma": 1.0}
    runtime = await Runtime.start(parse_config(data, source=None, home=tmp_path))
    try:
        out = await result(runtime, "es", {"target": 300, "generations": 4, "es": es})
    finally:
        await runtime.shutdown(0)
    got = json.loads(out) if isinstance(out, str) else out
    means = got["means"]
    assert means[-1] > means[0] + 0.05  # ES raised the log-probability of the target token

    # Replay the same generations on an engine of our own: the saved adapter is exactly what the formula gives.
    engine = make_engine(base, kv_page_size=16)
    slot = engine.zo_initialize(None, es["rank"], es["alpha"], es["population"], es["mu_fraction"], es["sigma"])
    for scores, seeds in got["history"]:
        engine.zo_update(slot, scores, seeds, es["max_sigma"])
    expected = engine.adapters.theta(slot)
    saved = load_file(str(tmp_path / "adapters" / "alice" / "es-out" / "adapter_model.safetensors"))
    assert set(saved) == set(expected)
    for k, t in saved.items():
        torch.testing.assert_close(t, expected[k], rtol=1e-6, atol=1e-7)
    assert any(float(t.abs().max()) > 0 for k, t in saved.items() if "lora_B" in k)  # B moved off zero



async def test_zo_state_is_the_same_on_every_data_parallel_engine(tiny: Path) -> None:
    """Two engine groups: contexts land on both, and a seed means the same perturbation on each, before
    and after an update (the store applies initialize and update to every engine)."""
    from runtime_support import forward, logits_at, run

    # Two engine groups load in two threads, and transformers' lazy `from transformers import AutoConfig`
    # races from a cold start (an ImportError on main too, outside zo): import it here first.
    from transformers import AutoConfig  # noqa: F401

    from pie.engine.config import EngineConfig
    from pie.runtime.runtime import ModelSpec, Runtime, RuntimeConfig

    config = EngineConfig(model=str(tiny), device="cpu", max_num_kv_pages=64, kv_page_size=4, max_num_adapters=4)
    runtime = await Runtime.start(RuntimeConfig((ModelSpec("m", (config, config)),)))

    async def body(host: Any) -> dict[str, Any]:
        a = host.adapter_create("m", "es")
        host.adapter_zo_initialize(a, 2, 4.0, 2, 0.5, 0.5)
        with pytest.raises(HostError, match=r"zo\.update: scores must be a list of numbers"):
            host.adapter_zo_update(a, "high", [1], 1.0)
        with pytest.raises(HostError, match=r"zo\.initialize: expected numbers"):
            host.adapter_zo_initialize(a, 2, "4", 2, 0.5, 0.5)

        async def probe(seed: int) -> list[bytes]:
            ctxs = [host.ctx_create("m") for _ in range(4)]  # placed on the least loaded group: both
            assert len({id(g) for _, _, g in host._contexts.values()}) == 2
            values = await asyncio.gather(*(forward(host, c, PROMPT, [logits_at(len(PROMPT) - 1)], adapter=a,
                                                    zo_seed=seed) for c in ctxs))
            for c in ctxs:
                host.ctx_destroy(c)
            return [v[0] for v in values]

        before = await probe(7)
        host.adapter_zo_update(a, [1.0, 0.0], [7, 8], 1.0)
        return {"before": before, "after": await probe(7)}

    try:
        got = await run(runtime, body)
    finally:
        await runtime.shutdown(0)
    for key in ("before", "after"):
        first = floats(got[key][0])
        assert all(rel_err(floats(v), first) < 1e-6 for v in got[key][1:])
    assert rel_err(floats(got["after"][0]), floats(got["before"][0])) > 1e-4
