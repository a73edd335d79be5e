"""LoRA adapters through the runtime, as inferlets use them (Adapter.create/open/load/fork/save, a pass's
`adapter`): the output equals transformers + PEFT with the same adapter, passes with and without
adapters run side by side, names are per user, and a bad adapter fails the inferlet, not the server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from checkpoints import VOCAB
from engine_helpers import random_prompts
from lora_helpers import make_adapter
from parity_helpers import hf_greedy_with_logits
from runtime_support import argmax_at, forward, run

from inferlet._host import Host, HostError
from pie.engine.config import EngineConfig
from pie.runtime.instance import Instance
from pie.runtime.runtime import ModelSpec, Runtime, RuntimeConfig

NUM_NEW = 10


@pytest.fixture
def adapters(checkpoint_dir, tmp_path: Path) -> tuple[Path, dict[str, Any]]:  # type: ignore[no-untyped-def]
    """The adapter folder: a shared adapter `a`, one of alice's own (`alice/b`), one over the rank limit."""
    base = checkpoint_dir("qwen3")
    refs = {"a": make_adapter(base, tmp_path / "adapters" / "a", seed=1, r=4, lora_alpha=8,
                              target_modules=["q_proj", "v_proj", "down_proj"]),
            "b": make_adapter(base, tmp_path / "adapters" / "alice" / "b", seed=2, r=2, lora_alpha=2,
                              target_modules=["o_proj", "up_proj"])}
    make_adapter(base, tmp_path / "adapters" / "big", seed=3, r=16, lora_alpha=16, target_modules=["q_proj"])
    return tmp_path / "adapters", refs


async def start(model_dir: Path, adapter_dir: Path, groups: int = 1) -> Runtime:
    config = EngineConfig(model=str(model_dir), device="cpu", max_num_kv_pages=128, kv_page_size=4,
                          max_adapter_rank=8, max_num_adapters=4)
    spec = ModelSpec("m", (config,) * groups, adapter_dir=adapter_dir)
    return await Runtime.start(RuntimeConfig((spec,)))


async def greedy(host: Host, prompt: list[int], adapter: int | None) -> list[int]:
    ctx = host.ctx_create("m")
    extra = {} if adapter is None else {"adapter": adapter}
    token = (await forward(host, ctx, prompt, [argmax_at(len(prompt) - 1)], **extra))[0]
    out = [token]
    for _ in range(NUM_NEW - 1):
        token = (await forward(host, ctx, [token], [argmax_at(0)], **extra))[0]
        out.append(token)
    return out


@pytest.mark.parametrize("groups", [1, 2])
async def test_adapter_passes_equal_peft_and_run_beside_base_passes(checkpoint_dir, adapters,  # type: ignore[no-untyped-def]
                                                                   groups: int) -> None:
    base = checkpoint_dir("qwen3")
    folder, refs = adapters
    prompts = random_prompts(3, VOCAB, 4, 12, seed=5)
    runtime = await start(base, folder, groups)
    try:
        async def alice(host: Host) -> list[list[int]]:
            a = host.adapter_create("m", "a")
            host.adapter_load(a, "a")
            b = host.adapter_create("m", "b")
            host.adapter_load(b, "b")  # alice's own folder
            # Three generations at once, batched together: adapter a, none, adapter b.
            return list(await asyncio.gather(greedy(host, prompts[0], a), greedy(host, prompts[1], None),
                                             greedy(host, prompts[2], b)))

        with_a, plain, with_b = await run(runtime, alice, "alice")
    finally:
        await runtime.shutdown(0)
    assert with_a == hf_greedy_with_logits(refs["a"], prompts[0], NUM_NEW)[0]
    assert with_b == hf_greedy_with_logits(refs["b"], prompts[2], NUM_NEW)[0]
    with refs["a"].disable_adapter():
        assert plain == hf_greedy_with_logits(refs["a"], prompts[1], NUM_NEW)[0]


async def test_names_forks_and_saves_are_per_user(checkpoint_dir, adapters) -> None:  # type: ignore[no-untyped-def]
    folder, _ = adapters
    runtime = await start(checkpoint_dir("qwen3"), folder)
    prompt = random_prompts(1, VOCAB, 6, 6, seed=9)[0]
    try:
        async def alice(host: Host) -> list[int]:
            a = host.adapter_create("m", "a")
            host.adapter_load(a, "a")
            copy = host.adapter_fork(a, "a-copy")
            host.adapter_save(copy, "saved/a-copy")
            return await greedy(host, prompt, a)

        expected = await run(runtime, alice, "alice")

        async def alice_later(host: Host) -> list[int]:  # another instance of alice: the name persists
            a = host.adapter_open("m", "a-copy")
            assert a is not None
            return await greedy(host, prompt, a)

        assert await run(runtime, alice_later, "alice") == expected

        async def bob(host: Host) -> None:
            assert host.adapter_open("m", "a") is None  # alice's names are not bob's
            mine = host.adapter_create("m", "a")
            with pytest.raises(HostError, match="no weights yet"):
                await greedy(host, prompt, mine)
            with pytest.raises(HostError, match="looked in"):
                host.adapter_load(mine, "b")  # alice/b is not in bob's folder
            with pytest.raises(HostError, match="must be relative"):
                host.adapter_load(mine, "../adapters/alice/b")

        await run(runtime, bob, "bob")
    finally:
        await runtime.shutdown(0)
    assert (folder / "alice" / "saved" / "a-copy" / "adapter_config.json").is_file()


async def test_an_adapter_over_the_rank_limit_fails_the_inferlet_and_the_server_goes_on(checkpoint_dir,  # type: ignore[no-untyped-def]
                                                                                       adapters) -> None:
    folder, _ = adapters
    runtime = await start(checkpoint_dir("qwen3"), folder)
    try:
        async def greedy_loader(instance: Instance) -> str:
            host = instance.host
            big = host.adapter_create("m", "big")
            host.adapter_load(big, "big")
            return "loaded"

        final = await runtime.spawn(greedy_loader, program="test", username="carol").wait()
        assert final.kind == "error" and "max_adapter_rank" in str(final.value), final

        async def fine(host: Host) -> list[int]:
            a = host.adapter_create("m", "a")
            host.adapter_load(a, "a")
            return await greedy(host, [5, 6, 7], a)

        assert len(await run(runtime, fine, "carol")) == NUM_NEW
        runtime.check_integrity()
    finally:
        await runtime.shutdown(0)


PROGRAM = '''
from inferlet import Adapter, Context, Model, Sampler

async def main(input):
    model = Model.load("")
    adapter = None
    if input.get("adapter"):
        adapter = Adapter.open(model, "mine") or Adapter.create(model, "mine")
        adapter.load(input["adapter"])
    ctx = Context(model).append(input["prompt"])
    gen = ctx.generate(Sampler.argmax(), max_tokens=8, stop=[], adapter=adapter, auto_flush=False)  # no chat cue
    return await gen.collect_tokens()
'''


@pytest.mark.parametrize("isolation", ["trusted", "isolated"])
async def test_an_inferlet_uses_an_adapter_through_the_sdk(tmp_path: Path, isolation: str) -> None:
    """`Adapter.create/open/load` and `generate(adapter=...)` from a launched program, in the server
    process and through the sandbox's IPC, give transformers + PEFT's greedy tokens."""
    from inferlet_helpers import result

    from pie.config import parse_config
    from pie.tiny_model import TINY_MODEL_ID, ensure_tiny_model

    base = ensure_tiny_model(tmp_path)
    ref = make_adapter(base, tmp_path / "adapters" / "alice" / "tiny-lora", seed=4, r=4, lora_alpha=8,
                       target_modules=["q_proj", "v_proj", "gate_proj"])
    (tmp_path / "programs" / "lora-gen").mkdir(parents=True)
    (tmp_path / "programs" / "lora-gen" / "Pie.toml").write_text('[package]\nname = "lora-gen"\nversion = "0.1.0"\n')
    (tmp_path / "programs" / "lora-gen" / "main.py").write_text(PROGRAM)
    data: dict[str, Any] = {
        "model": {"hf_repo": TINY_MODEL_ID, "device": ["cpu"], "max_num_kv_pages": 64,
                  "adapter_path": str(tmp_path / "adapters")},
        "runtime": {"inferlet_paths": [str(tmp_path / "programs")], "isolation": isolation},
    }
    if isolation == "isolated":
        data["sandbox"] = {"scratch_root": str(tmp_path / "scratch"), "cpu_time_s": 60, "allow_weaker": True}
    runtime = await Runtime.start(parse_config(data, source=None, home=tmp_path))
    prompt = [12, 40, 41, 7, 99]
    try:
        tuned = await result(runtime, "lora-gen", {"prompt": prompt, "adapter": "tiny-lora"})
        again = await result(runtime, "lora-gen", {"prompt": prompt, "adapter": "tiny-lora"})  # opened by name
        plain = await result(runtime, "lora-gen", {"prompt": prompt})
    finally:
        await runtime.shutdown(0)
    assert tuned == again == hf_greedy_with_logits(ref, prompt, 8)[0]
    with ref.disable_adapter():
        assert plain == hf_greedy_with_logits(ref, prompt, 8)[0]
    assert tuned != plain  # the adapter really changed the output
