"""A hybrid model (tiny Qwen 3.5, transformers' own classes) through the runtime: contexts own state slots.

The standard text-completion inferlet and SDK loops give transformers' greedy tokens; fork mid-generation
(a state copy), truncate (recompute from the record), snapshot save/open, and suspension under a small page
pool all equal recomputation; every page and every state slot comes back.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoints import load_reference, tiny_checkpoint
from inferlet_helpers import pages_in_use, result, run_sdk, start_runtime

from inferlet import Context, Model, Sampler
from inferlet._host import HostError
from pie.runtime.runtime import Runtime

PROMPT = [5, 9, 100, 3, 77, 41, 8, 250, 13, 6, 99, 120, 7, 30, 31, 32, 33]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    directory = tiny_checkpoint(tmp_path_factory.mktemp("home") / "a" / "qwen3_5", "qwen3_5_text", seed=3)
    return directory, load_reference(directory)


async def _runtime(directory: Path, **engine: Any) -> Runtime:
    return await start_runtime(directory, activation_dtype="float32", kv_page_size=4,
                               **{"max_num_state_slots": 16, "max_num_kv_pages": 256, **engine})


async def _close(rt: Runtime) -> None:
    space = rt.model().groups[0].space
    assert pages_in_use(rt) == 0 or rt.model().snapshots
    assert space.states is not None and space.states.num_held == len(space.live) + space.states.num_checkpoints
    rt.check_integrity()
    await rt.shutdown(0)


def _greedy(ref: Any, tokens: list[int], n: int) -> list[int]:
    seq = list(tokens)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(ref(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(tokens):]


async def _generate(ctx: Context, n: int) -> list[int]:
    return await ctx.generate(Sampler.argmax(), max_tokens=n, stop=[], auto_flush=False).collect_tokens()


async def test_text_completion_gives_transformers_greedy_tokens(checkpoint: tuple[Path, Any]) -> None:
    directory, ref = checkpoint
    rt = await _runtime(directory)
    try:
        assert rt.model().describe()["run_ahead"] is False  # the SDK runs its step-by-step loop

        async def reference() -> tuple[list[int], list[int], str]:
            ctx = Context(Model.load(""))
            ctx.system("Be terse.").user("Name a color.")
            gen = ctx.generate(Sampler.argmax(), max_tokens=12)
            prompt = ctx.buffer()
            tokens = await gen.collect_tokens()
            again = Context(Model.load(""))
            again.system("Be terse.").user("Name a color.")
            return prompt, tokens, await again.generate(Sampler.argmax(), max_tokens=12).collect_text()

        prompt, tokens, text = await run_sdk(rt, reference)
        assert tokens == _greedy(ref, prompt, len(tokens))
        inputs = {"prompt": "Name a color.", "system": "Be terse.", "max_tokens": 12}
        assert await result(rt, "text-completion", inputs) == text
        assert await result(rt, "text-completion", {**inputs, "stream": True}) == text
    finally:
        await _close(rt)


async def test_fork_truncate_and_snapshots_equal_recompute(checkpoint: tuple[Path, Any]) -> None:
    directory, ref = checkpoint
    rt = await _runtime(directory)
    try:
        async def body() -> dict[str, list[int]]:
            ctx = Context(Model.load(""))
            ctx.append(PROMPT)
            head = await _generate(ctx, 5)
            child = ctx.fork()  # mid-generation: the state slot is copied in the next batch
            child.append([42])
            out = {"head": head, "parent": await _generate(ctx, 6), "child": await _generate(child, 6)}
            ctx.save("mid")
            ctx.truncate(3)  # the state cannot be cut back: recomputed from the record
            out["truncated"] = await _generate(ctx, 4)
            opened = Context.open(Model.load(""), "mid")  # the record only: the SDK's buffer is not saved
            opened.append(out["parent"][-1:])
            out["opened"] = await _generate(opened, 4)
            Context.delete(Model.load(""), "mid")
            for c in (ctx, child, opened):
                c.release()
            return out

        out = await run_sdk(rt, body)
        head = out["head"]
        assert head == _greedy(ref, PROMPT, 5)
        # Generated tokens enter the record one step later (the SDK feeds each back with the next step).
        assert out["parent"] == _greedy(ref, [*PROMPT, *head], 6)[:6]
        assert out["child"] == _greedy(ref, [*PROMPT, *head, 42], 6)
        base = [*PROMPT, *head, *out["parent"][:-1]]  # the record at the save: the last token still buffered
        assert out["opened"] == _greedy(ref, [*base, out["parent"][-1]], 4)
        assert out["truncated"] == _greedy(ref, [*base[:-3], out["parent"][-1]], 4)
    finally:
        await _close(rt)


@pytest.mark.parametrize("swap_pool_size", [0, 64])
async def test_eight_contexts_on_a_small_pool_finish_with_their_solo_tokens(checkpoint: tuple[Path, Any],
                                                                            swap_pool_size: int) -> None:
    """Eight instances whose contexts need 40 pages of a 14-page pool: suspension drops pages and recomputes
    (the state is recomputed from slot 0) or swaps every computed page to the host (the state stays in the
    context's slot)."""
    directory, ref = checkpoint
    rt = await _runtime(directory, max_num_kv_pages=14, swap_pool_size=swap_pool_size)
    try:
        prompts = [[*PROMPT[: 6 + i], 100 + i] for i in range(8)]

        def one(p: list[int]) -> Any:
            async def body() -> list[int]:
                ctx = Context(Model.load(""))
                ctx.append(p)
                try:
                    return await _generate(ctx, 6)
                finally:
                    ctx.release()
            return body

        outs = await asyncio.gather(*(run_sdk(rt, one(p)) for p in prompts))  # eight instances at once
        stats = rt.model().groups[0].scheduler.stats
        assert stats.suspensions > 0  # the pool really was too small
        assert (stats.swapped_out_pages > 0) == bool(swap_pool_size)
        for p, out in zip(prompts, outs, strict=True):
            assert out == _greedy(ref, p, 6)
    finally:
        await _close(rt)


async def test_terminating_mid_generation_returns_every_page_and_state_slot(checkpoint: tuple[Path, Any]) -> None:
    directory, _ = checkpoint
    rt = await _runtime(directory)
    try:
        space = rt.model().groups[0].space
        assert space.states is not None
        process = await rt.launch("best-of-n", '{"prompt": "Say something.", "n": 3, "max_tokens": 400, '
                                  '"temperature": 1.0, "seed": 1}', username="alice")
        while space.states.num_held - space.states.num_checkpoints < 3:  # the forks exist: one slot each
            await asyncio.sleep(0.01)
        await process.terminate("stopped by the test")
        assert [e.kind async for e in process.events()][-1] != "return"
        assert space.states.num_held == space.states.num_checkpoints and pages_in_use(rt) == 0
    finally:
        await _close(rt)


def test_state_slots_queue_copies_against_the_states_before_the_batch() -> None:
    from pie.runtime.state_slots import StateSlots

    slots = StateSlots(4)
    a, b, c = slots.allocate(), slots.allocate(), slots.allocate()
    slots.copy(a, b)  # fork a -> b, then b -> c before any batch: c must read a (b is written in the same batch)
    slots.copy(b, c)
    assert sorted(slots.drain()) == [(a, b), (a, c)] and slots.drain() == []
    slots.copy(a, c)
    slots.free(c)  # the child is gone before the batch: its copy is dropped
    assert slots.drain() == []
    d, e = slots.allocate(), slots.allocate()
    with pytest.raises(HostError, match="all 4 recurrent-state slots"):
        slots.allocate()
    assert {a, b, d, e} == {0, 1, 2, 3}
    slots.check_integrity()


def test_prefix_checkpoints_take_free_slots_and_are_evicted_least_recently_used_first() -> None:
    from pie.runtime.state_slots import StateSlots

    slots = StateSlots(4)
    ctx = slots.allocate()
    for key in ("p1", "p2", "p3"):
        slots.checkpoint(key, ctx)
    assert slots.num_checkpoints == 3 and slots.num_free == 0
    assert slots.lookup("p1") is not None  # p1 is now the most recently used
    slots.checkpoint("p4", ctx)  # no free slot: the oldest checkpoint (p2) makes room
    assert not slots.has_checkpoint("p2") and slots.has_checkpoint("p1")
    other = slots.allocate()  # a context's slot comes before any checkpoint: p3 goes
    assert not slots.has_checkpoint("p3") and other not in (slots.lookup("p1"), slots.lookup("p4"))
    copies = dict((dst, src) for src, dst in slots.drain())
    assert other not in copies and all(src == ctx for src in copies.values())  # p3's copy went with it
    slots.check_integrity()


async def test_standard_inferlets_run_on_a_hybrid_model(checkpoint: tuple[Path, Any]) -> None:
    """chat, best-of-n, beam-search, speculative-decoding, constrained-json and modular-cache on Qwen 3.5, each
    checked against greedy text-completion or its own property (forks copy states; rejected drafts truncate)."""
    directory, _ = checkpoint
    rt = await _runtime(directory)
    try:
        system = "You are a helpful assistant."
        greedy = await result(rt, "text-completion", {"prompt": "Say something.", "max_tokens": 8, "system": system})
        best = await result(rt, "best-of-n", {"prompt": "Say something.", "n": 3, "max_tokens": 8, "temperature": 0})
        assert set(best["candidates"]) == {greedy}  # three forks of one prefill decode like one context
        spec = await result(rt, "speculative-decoding", {"prompt": "Say something.", "max_tokens": 8})
        assert spec["text"] == greedy  # drafts rejected by truncate: recomputed, not corrupted
        beams = await result(rt, "beam-search", {"prompt": "Once upon a time", "beam_width": 3, "max_tokens": 6})
        assert beams
        schema = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}},
                  "additionalProperties": False}
        value = await result(rt, "constrained-json", {"prompt": "a number", "schema": json.dumps(schema),
                                                      "temperature": 1.0, "seed": 1, "max_tokens": 60})
        assert isinstance(value["n"], int)
        modules = ["You answer from documents.", "Doc one: the sky is blue."]
        first = await result(rt, "modular-cache", {"modules": modules, "prompt": "Color?", "max_tokens": 6})
        second = await result(rt, "modular-cache", {"modules": modules, "prompt": "Color?", "max_tokens": 6})
        assert second["reused_modules"] == 2 and second["text"] == first["text"]
        process = await rt.launch("chat", json.dumps({"max_tokens": 6}), username="alice")
        for message in ("hello", "and then?", "/exit"):
            process.send_message(message)
        events = [e async for e in process.events()]
        assert events[-1].kind == "return", events[-1].value
    finally:
        await _close(rt)


async def test_a_shared_prefix_resumes_from_its_state_checkpoint(checkpoint: tuple[Path, Any]) -> None:
    """A 1,000-token prefix is computed once: the second prompt attaches its 992 tokens of full pages (16-token
    pages) and copies the state checkpoint at page 62's end, and decodes exactly as a cold run."""
    directory, ref = checkpoint
    rt = await start_runtime(directory, activation_dtype="float32", kv_page_size=16, max_num_state_slots=8,
                             max_num_kv_pages=256)
    try:
        prefix = [(7 * i + 3) % 500 + 5 for i in range(1000)]
        stats = rt.model().groups[0].scheduler.stats

        async def generate(tail: list[int]) -> tuple[list[int], int, int]:
            before, cached = stats.tokens_processed, stats.cached_tokens

            async def body() -> list[int]:
                ctx = Context(Model.load(""))
                ctx.append([*prefix, *tail])
                try:
                    return await _generate(ctx, 4)
                finally:
                    ctx.release()
            tokens = await run_sdk(rt, body)
            return tokens, stats.tokens_processed - before, stats.cached_tokens - cached

        first, first_computed, first_cached = await generate([11, 12, 13])
        assert (first_computed, first_cached) == (1003 + 3, 0)  # the prompt, then one row per later step
        assert rt.model().groups[0].space.states.num_checkpoints >= 1  # type: ignore[union-attr]
        second, second_computed, second_cached = await generate([21, 22, 23, 24, 25])
        assert second_cached == 992 and second_computed == 1005 - 992 + 3
        assert first == _greedy(ref, [*prefix, 11, 12, 13], 4)
        assert second == _greedy(ref, [*prefix, 21, 22, 23, 24, 25], 4)
    finally:
        await _close(rt)


async def test_the_server_serves_a_hybrid_model_over_http(checkpoint: tuple[Path, Any]) -> None:
    """What `pie serve` runs: the OpenAI-compatible API on the hybrid checkpoint (server-rendered chat,
    the openai-compat inferlet's step loop)."""
    import httpx
    from server_support import running_server

    from pie.engine.config import EngineConfig
    from pie.runtime.runtime import ModelSpec, RuntimeConfig, RuntimeLimits

    directory, _ = checkpoint
    engine = EngineConfig(model=str(directory), device="cpu", activation_dtype="float32", max_num_kv_pages=128,
                          max_num_state_slots=8)
    async with running_server(RuntimeConfig((ModelSpec("qwen3.5-tiny", engine),), RuntimeLimits())) as server:
        body = {"model": "qwen3.5-tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6,
                "temperature": 0, "n": 2}
        async with httpx.AsyncClient(base_url=server.http_url, timeout=120) as client:
            reply = (await client.post("/v1/chat/completions", json=body)).json()
        choices = reply["choices"]
        assert len(choices) == 2 and choices[0]["message"] == choices[1]["message"]  # n forks of one prefill
        assert 0 < reply["usage"]["completion_tokens"] <= 12
