"""Run-ahead token streams (pie/runtime/runahead.py, inferlet/generation.py): the same tokens and the same
final context (token record, KV length, pages, and KV contents recomputed from the record) as the
step-by-step loop, for random generate loops and for every standard inferlet; cancelling a stream
mid-run returns every page."""

from __future__ import annotations

import asyncio
import gc
import json
import random
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from inferlet_helpers import launch, pages_in_use, run_sdk, start_runtime

import inferlet.generation
from inferlet import Context, Logits, Model, NgramSpeculator, Regex, Sampler, brle
from inferlet._host import get_host
from inferlet._instance import use_instance
from pie.engine.config import EngineConfig
from pie.runtime.fake_engines import NullEngine, fake_info, null_token
from pie.runtime.host import InstanceHost
from pie.runtime.instance import Instance
from pie.runtime.runtime import GC_YOUNG_THRESHOLD, ModelSpec, Runtime, RuntimeConfig, RuntimeLimits
from pie.tiny_model import ensure_tiny_model

VOCAB = 1000
PS = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("pie-home"))


@pytest.fixture
async def rt(tiny: Path) -> Iterator[Runtime]:
    runtime_ = await start_runtime(tiny, max_num_kv_pages=512)
    yield runtime_
    runtime_.check_integrity()
    await runtime_.shutdown(0)


@pytest.fixture
async def null_rt() -> Iterator[Runtime]:
    engine = NullEngine(fake_info(num_pages=512, page_size=PS, vocab_size=VOCAB, max_batch_size=64))
    spec = ModelSpec("null", EngineConfig(model="pie/tiny-random"))
    runtime_ = await Runtime.start(RuntimeConfig((spec,), RuntimeLimits(), freeze_gc=False), engines={"null": engine})
    yield runtime_
    runtime_.check_integrity()
    await runtime_.shutdown(0)


@pytest.fixture
def streams(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the run-ahead streams started (so a test knows run-ahead really ran)."""
    started: list[int] = []
    real = InstanceHost.ctx_generate_start

    def counting(self: InstanceHost, ctx: int, spec: Any) -> int:
        started.append(ctx)
        return real(self, ctx, spec)

    monkeypatch.setattr(InstanceHost, "ctx_generate_start", counting)
    return started


async def both(runtime: Runtime, body: Callable[[], Awaitable[Any]]) -> tuple[Any, Any]:
    """`body` run step by step, then with run-ahead; both results."""
    try:
        inferlet.generation.RUNAHEAD = False
        off = await run_sdk(runtime, body)
        inferlet.generation.RUNAHEAD = True
        on = await run_sdk(runtime, body)
    finally:
        inferlet.generation.RUNAHEAD = True
    return off, on


def state(ctx: Context) -> dict[str, Any]:
    """What the inferlet sees of a context and what the runtime holds for it."""
    seq = ctx.seq_len  # stops a stream first
    host = get_host()
    assert isinstance(host, InstanceHost)
    c = host._contexts[ctx.handle][1]
    assert c.computed_len == c.kv_len == seq, "the KV holds exactly the record"
    return {"seq": seq, "buffer": ctx.buffer(), "pages": ctx.page_counts(), "tokens": list(c.tokens),
            "positions": list(c.positions), "num_pages": c.num_pages, "committed": c.num_committed,
            "keys": list(c.keys)}


class EveryOther:
    """A constraint whose mask changes each step (so no stream can serve it): odd or even tokens."""

    def __init__(self, vocab: int) -> None:
        self.vocab, self.n = vocab, 0

    def step(self, accepted: list[int]) -> list[int]:
        self.n += len(accepted)
        allowed = [i % 2 == self.n % 2 for i in range(self.vocab)]
        return brle.encode(allowed)


def scenario(seed: int) -> Callable[[], Awaitable[Any]]:
    """A random generate loop on the null engine: stops, limits, breaks, forks, inspections, masks."""
    rng = random.Random(seed)
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 40))]
    max_tokens = rng.choice([None, rng.randint(1, 40)])
    base = len(prompt)
    stop = sorted({null_token(base - 1 + rng.randint(0, 50), VOCAB) for _ in range(rng.randint(0, 2))})
    break_after = rng.choice([None, None, rng.randint(1, 30)])
    inspect_at = rng.choice([None, rng.randint(1, 20)])
    fork_at = rng.choice([None, rng.randint(1, 20)])
    probe_at = rng.choice([None, rng.randint(1, 20)])
    mask = rng.choice([None, "static", "changing"])
    second_turn = rng.random() < 0.5
    turn2_max = rng.randint(1, 20)

    async def body() -> dict[str, Any]:
        model = Model.load("")
        ctx = Context(model).append(prompt)
        kwargs: dict[str, Any] = {"max_tokens": max_tokens if max_tokens is not None else 60, "stop": stop,
                                  "auto_flush": False}
        if mask == "static":
            kwargs["logit_mask"] = brle.encode([i % 3 != 0 for i in range(VOCAB)])
        gen = ctx.generate(Sampler.argmax(), **kwargs)
        if mask == "changing":
            gen.constrain(EveryOther(VOCAB))
        record: dict[str, Any] = {"steps": [], "seen": []}
        forks: list[Context] = []
        i = 0
        async for step in gen:
            i += 1
            if probe_at == i:
                step.probe(-1, Logits())
            out = await step.execute()
            record["steps"].append(out.tokens)
            if inspect_at == i:
                record["seen"].append(("seq", i, ctx.seq_len, ctx.buffer()))
            if fork_at == i:
                fork = ctx.fork()
                forks.append(fork)
                record["seen"].append(("fork", i, state(fork)))
            if break_after == i:
                break
        record["done"] = (gen.is_done, gen.tokens_generated)
        record["final"] = state(ctx)
        for fork in forks:  # a fork generates on its own after the parent moved on
            record["fork_tokens"] = await fork.generate(Sampler.argmax(), max_tokens=5, stop=[],
                                                        auto_flush=False).collect_tokens()
            record["fork_final"] = state(fork)
        if second_turn:  # a new turn after the kept token, then a collector
            ctx.append([7, 8, 9])
            record["turn2"] = await ctx.generate(Sampler.argmax(), max_tokens=turn2_max, stop=stop,
                                                 auto_flush=False).collect_tokens()
            record["final2"] = state(ctx)
        return record

    return body


async def test_random_loops_match_step_by_step_on_the_null_engine(null_rt: Runtime, streams: list[int]) -> None:
    for seed in range(40):
        off, on = await both(null_rt, scenario(seed))
        assert on == off, f"scenario {seed}"
        null_rt.check_integrity()
        assert pages_in_use(null_rt) == 0
    assert len(streams) >= 40  # run-ahead served most of these loops
    assert null_rt.model().scheduler.stats.chained_steps > 0  # and pipelined steps


async def test_stream_is_refused_calls_while_it_runs_and_stops_exactly(null_rt: Runtime) -> None:
    async def body() -> dict[str, Any]:
        host = get_host()
        ctx = Context(Model.load(""))
        ctx.append(list(range(20)))
        await ctx.flush()
        handle = host.ctx_generate_start(ctx.handle, {"tokens": [5], "sampler": {"kind": "argmax"}, "stop": [],
                                                      "max_tokens": 100, "depth": 4})
        first = await host.stream_next(handle)
        await asyncio.sleep(0)
        refused = ""
        try:
            host.ctx_state(ctx.handle)
        except Exception as e:
            refused = str(e)
        more = await host.stream_next(handle)
        while len(first) + len(more) < 3:  # how far it ran ahead meanwhile depends on the event loop's turns
            more += await host.stream_next(handle)
        host.stream_stop(handle, 3)
        return {"first": first, "more": more, "refused": refused, "state": host.ctx_state(ctx.handle),
                "tokens": host._contexts[ctx.handle][1].tokens[20:]}

    r = await run_sdk(null_rt, body)
    assert "stream_stop" in r["refused"]
    produced = r["first"] + r["more"]
    assert produced == [null_token(20 + i, VOCAB) for i in range(len(produced))] and 3 <= len(produced) <= 4 + 4
    # 3 steps consumed: the buffered token plus the first two sampled ones are in the KV (the third is buffered).
    assert r["tokens"] == [5, produced[0], produced[1]]
    assert r["state"] == (1, 1, 7)  # 23 slots: one committed page (the flush's), 7 in the working page


async def test_a_stream_pipelines_across_page_boundaries(null_rt: Runtime) -> None:
    """Growing the reservation while the step before is in flight: every step after the first is chained,
    including those that open a page (3 of them here), and the tokens are the step-by-step ones. (The
    first pass, one buffered token, is the stream's first lane row, which has nothing to chain to.)"""
    scheduler = null_rt.model().scheduler
    before = scheduler.stats.chained_steps

    async def body() -> list[int]:
        ctx = Context(Model.load(""))
        await ctx.append(list(range(20))).flush()
        ctx.append([5])
        return await ctx.generate(Sampler.argmax(), max_tokens=60, stop=[], auto_flush=False).collect_tokens()

    tokens = await run_sdk(null_rt, body)
    assert tokens == [null_token(20 + i, VOCAB) for i in range(60)]
    assert scheduler.stats.chained_steps - before == 59  # slots 21..79: pages opened at 32, 48 and 64


async def test_a_one_token_first_pass_is_the_first_lane_row(null_rt: Runtime) -> None:
    """Streams whose first pass is one buffered token step in the lane from their first token (no
    ordinary request); a fork whose working page is shared takes the ordinary pass (its page is copied
    first), and both give the step-by-step tokens."""
    scheduler = null_rt.model().scheduler
    seen: list[tuple[int, int, int]] = []  # (requests, step rows, page copies) of each batch

    def on_batch(batch: Any, _result: Any, _s: float) -> None:
        seen.append((len(batch.requests), len(batch.steps) if batch.steps is not None else 0,
                     len(batch.page_copies)))

    async def body() -> dict[str, Any]:
        ctx = Context(Model.load(""))
        await ctx.append(list(range(20))).flush()
        ctx.append([5])
        scheduler.on_batch = on_batch
        first = await ctx.generate(Sampler.argmax(), max_tokens=6, stop=[], auto_flush=False).collect_tokens()
        plain = list(seen)
        seen.clear()
        fork = ctx.fork()  # shares the working page (slots 16..26), which its next token writes into
        forked = await fork.generate(Sampler.argmax(), max_tokens=3, stop=[], auto_flush=False).collect_tokens()
        return {"first": first, "plain": plain, "forked": forked, "fork_batches": list(seen),
                "parent": state(ctx), "fork": state(fork)}

    r = await run_sdk(null_rt, body)
    assert r["first"] == [null_token(20 + i, VOCAB) for i in range(6)]
    assert [rows for reqs, rows, _ in r["plain"]] == [1] * 6 and all(reqs == 0 for reqs, _, _ in r["plain"])
    assert r["forked"] == [null_token(26 + i, VOCAB) for i in range(3)]
    assert r["fork_batches"][0] == (1, 0, 1)  # the ordinary pass, after a copy of the shared page
    assert r["parent"]["tokens"] == [*range(20), 5, *r["first"][:5]]
    assert r["fork"]["tokens"] == [*r["parent"]["tokens"], r["first"][5], *r["forked"][:2]]


async def test_a_stream_charges_the_token_budget_as_the_step_by_step_loop() -> None:
    """With a token budget, the first lane row is charged once (the pass's charge moves to the lane): the
    count after a generation, and after one stopped early, equals the step-by-step loop's."""
    engine = NullEngine(fake_info(num_pages=512, page_size=PS, vocab_size=VOCAB, max_batch_size=64))
    spec = ModelSpec("null", EngineConfig(model="pie/tiny-random"))
    runtime_ = await Runtime.start(RuntimeConfig((spec,), RuntimeLimits(max_tokens_per_instance=100),
                                                 freeze_gc=False), engines={"null": engine})

    async def body() -> list[Any]:
        host = get_host()
        assert isinstance(host, InstanceHost)
        ctx = Context(Model.load("")).append(list(range(10)))
        out: list[Any] = [await ctx.generate(Sampler.argmax(), max_tokens=7, stop=[], auto_flush=False)
                          .collect_tokens(), host.tokens_sampled]
        gen = ctx.generate(Sampler.argmax(), max_tokens=20, stop=[], auto_flush=False)
        async for step in gen:
            await step.execute()
            if gen.tokens_generated == 3:
                break
        out += [ctx.seq_len, host.tokens_sampled]
        return out

    try:
        off, on = await both(runtime_, body)
        assert on == off and off[1] == 7
        runtime_.check_integrity()
    finally:
        await runtime_.shutdown(0)


async def test_serving_raises_the_young_collection_threshold_until_shutdown() -> None:
    """With freeze_gc the runtime collects young objects less often while it serves (so full collections
    over hundreds of streams' objects stay rare) and gives the collector its thresholds back at shutdown."""
    before = gc.get_threshold()
    engine = NullEngine(fake_info(num_pages=64, page_size=PS, vocab_size=VOCAB))
    spec = ModelSpec("null", EngineConfig(model="pie/tiny-random"))
    runtime_ = await Runtime.start(RuntimeConfig((spec,), RuntimeLimits()), engines={"null": engine})
    try:
        assert gc.get_threshold() == (max(GC_YOUNG_THRESHOLD, before[0]), *before[1:])
    finally:
        await runtime_.shutdown(0)
    assert gc.get_threshold() == before


async def test_cancelling_an_instance_mid_stream_returns_every_page(null_rt: Runtime) -> None:
    scheduler = null_rt.model().scheduler
    started = asyncio.Event()
    batches = [0]
    scheduler.on_batch = lambda *_: (batches.__setitem__(0, batches[0] + 1), started.set() if batches[0] > 3 else 0)

    async def long_generation(instance: Instance) -> str:
        assert instance.host is not None
        with use_instance(instance.host):
            ctx = Context(Model.load("")).append(list(range(50)))
            await ctx.generate(Sampler.argmax(), max_tokens=10_000, stop=[], auto_flush=False).collect_tokens()
        return "ok"

    procs = [null_rt.spawn(long_generation, program="t", username="u") for _ in range(4)]
    await started.wait()
    assert pages_in_use(null_rt) > 0
    for p in procs:
        await p.terminate()
    for p in procs:
        await p.wait()
    assert pages_in_use(null_rt) == 0
    assert scheduler.num_pending == 0
    null_rt.check_integrity()


# -- the real tiny model: tokens and KV ----------------------------------------------------------------------

async def kv_matches_record(ctx: Context) -> float:
    """Max |logits| difference at the next row between the context's KV and a fresh prefill of its record."""
    host = get_host()
    assert isinstance(host, InstanceHost)
    record = list(host._contexts[ctx.handle][1].tokens)
    model = ctx.model
    tail = ctx.buffer() or [3]
    probe = ctx.fork()
    fwd = probe.forward().input(tail)
    h = fwd.probe(len(tail) - 1, Logits())
    incremental = np.frombuffer((await fwd.execute()).logits(h) or b"", dtype=np.float32)
    fresh = Context(model)
    fwd = fresh.forward().input(record + tail)
    h = fwd.probe(len(record) + len(tail) - 1, Logits())
    recomputed = np.frombuffer((await fwd.execute()).logits(h) or b"", dtype=np.float32)
    probe.release()
    fresh.release()
    return float(np.max(np.abs(incremental - recomputed)))


def real_scenario(kind: str) -> Callable[[], Awaitable[Any]]:
    async def body() -> dict[str, Any]:
        model = Model.load("")
        ctx = Context(model).append(list(range(40, 75)))
        greedy = await Context(model).append(list(range(40, 75))).generate(
            Sampler.argmax(), max_tokens=30, stop=[], auto_flush=False).collect_tokens()
        record: dict[str, Any] = {"steps": []}
        if kind == "sampled":
            gen = ctx.generate(Sampler.top_p(0.9, 0.9), max_tokens=25, seed=11, stop=[], auto_flush=False)
        elif kind == "stop":
            gen = ctx.generate(Sampler.argmax(), max_tokens=40, stop=[greedy[12]], auto_flush=False)
        elif kind == "regex":
            gen = ctx.generate(Sampler.argmax(), max_tokens=12, constrain=Regex("[a-z ]+"), stop=[],
                               auto_flush=False)
        elif kind == "speculator":
            gen = ctx.generate(Sampler.argmax(), max_tokens=20, speculator=NgramSpeculator(), stop=[],
                               auto_flush=False)
        else:  # masked, break, fork
            gen = ctx.generate(Sampler.argmax(), max_tokens=30, stop=[], auto_flush=False,
                               logit_mask=brle.encode([i % 2 == 0 for i in range(model.vocab_size)])
                               if kind == "masked" else None)
        forks = []
        async for step in gen:
            record["steps"].append((await step.execute()).tokens)
            if kind == "fork" and len(record["steps"]) in (5, 13):
                forks.append(ctx.fork())
            if kind == "break" and len(record["steps"]) == 9:
                break
        record["final"] = state(ctx)
        record["kv_diff"] = await kv_matches_record(ctx)
        for fork in forks:
            record.setdefault("forks", []).append(
                await fork.generate(Sampler.argmax(), max_tokens=6, stop=[], auto_flush=False).collect_tokens())
            record.setdefault("fork_kv", []).append(await kv_matches_record(fork))
        return record
    return body


@pytest.mark.parametrize("kind", ["sampled", "stop", "masked", "break", "fork", "regex", "speculator"])
async def test_generate_loops_match_step_by_step_on_the_tiny_model(rt: Runtime, kind: str) -> None:
    off, on = await both(rt, real_scenario(kind))
    assert on["kv_diff"] < 1e-3 and off["kv_diff"] < 1e-3, (on["kv_diff"], off["kv_diff"])
    for r in (on, off):
        r.pop("kv_diff")
        for d in r.pop("fork_kv", []):
            assert d < 1e-3
    assert on == off
    assert pages_in_use(rt) == 0


# agent-react is left out: it only generates under a JSON schema (never a stream), as constrained-json does.
STANDARD: list[tuple[str, dict[str, Any]]] = [
    ("text-completion", {"prompt": "Name a color.", "system": "Be terse.", "max_tokens": 12}),
    ("text-completion", {"prompt": "Say something.", "max_tokens": 10, "temperature": 1.0, "seed": 7}),
    ("best-of-n", {"prompt": "Say something.", "n": 3, "max_tokens": 8, "temperature": 1.0, "seed": 3}),
    ("constrained-json", {"prompt": "a city", "max_tokens": 24,
                          "schema": json.dumps({"type": "object", "properties": {"name": {"type": "string"}},
                                                "required": ["name"]})}),
    ("modular-cache", {"modules": ["Doc one.", "Doc two."], "prompt": "Color of grass?", "max_tokens": 6}),
    ("watermark", {"prompt": "Write.", "max_tokens": 16, "delta": 4.0, "seed": 1}),
    ("tree-of-thought", {"problem": "2+2?", "depth": 1, "breadth": 2, "keep": 1, "thought_tokens": 6,
                         "answer_tokens": 6}),
    ("attention-sink", {"prompt": "Tell a story.", "sink": 4, "window": 24, "max_tokens": 12}),
    ("speculative-decoding", {"prompt": "Once upon a time", "max_tokens": 12}),
    ("beam-search", {"prompt": "Once upon a time", "beam_width": 2, "max_tokens": 4}),
    # openai-compat takes the server's plan (token-id prompts; pie/server/api/plan.py)
    ("openai-compat", {"model": "", "prompts": [[5, 6, 7, 8]], "n": 1, "max_tokens": 8,
                       "sampler": {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}, "stream": True}),
    ("openai-compat", {"model": "", "prompts": [[9, 10, 11]], "n": 2, "max_tokens": 8, "seed": 5, "stop": ["a"],
                       "sampler": {"temperature": 0.8, "top_p": 0.9, "top_k": 0, "min_p": 0.0}}),
]


@pytest.mark.parametrize(("name", "inputs"), STANDARD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(STANDARD)])
async def test_standard_inferlets_match_step_by_step(rt: Runtime, name: str, inputs: dict[str, Any]) -> None:
    async def run() -> tuple[str, list[Any]]:
        # a user each: snapshots (modular-cache) are per user, so the second run starts as cold as the first
        final, events = await launch(rt, name, inputs, username=f"user-{inferlet.generation.RUNAHEAD}")
        assert final.kind == "return", final.value
        return final.value, [(e.kind, e.value) for e in events]

    try:
        inferlet.generation.RUNAHEAD = False
        off = await run()
        inferlet.generation.RUNAHEAD = True
        on = await run()
    finally:
        inferlet.generation.RUNAHEAD = True
    assert on == off
    assert pages_in_use(rt) == 0 or rt.model().snapshots


async def test_chat_matches_step_by_step(rt: Runtime) -> None:
    async def run() -> list[Any]:
        process = await rt.launch("chat", json.dumps({"max_tokens": 6}), username="alice")
        for message in ("hello", "and then?", "/exit"):
            process.send_message(message)
        return [(e.kind, e.value) async for e in process.events()]

    try:
        inferlet.generation.RUNAHEAD = False
        off = await run()
        inferlet.generation.RUNAHEAD = True
        on = await run()
    finally:
        inferlet.generation.RUNAHEAD = True
    assert on == off and on[-1][0] == "return"
