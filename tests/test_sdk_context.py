"""The SDK's Context and Forward on the real runtime: buffering, passes, forks, snapshots, outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from inferlet_helpers import pages_in_use, run_sdk, start_runtime

from inferlet import (
    Context,
    Distribution,
    Entropy,
    HostError,
    Logits,
    Logprob,
    Logprobs,
    Model,
    Sampler,
    brle,
    chat,
    runtime,
)
from pie.runtime.runtime import Runtime
from pie.runtime.tokenizer import ModelTokenizer
from pie.tiny_model import ensure_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("pie-home"))


@pytest.fixture
async def rt(tiny: Path) -> Runtime:
    runtime_ = await start_runtime(tiny)
    yield runtime_
    runtime_.check_integrity()
    await runtime_.shutdown(0)


async def test_runtime_facts_and_model(rt: Runtime) -> None:
    async def body() -> tuple[object, ...]:
        model = Model.load("tiny")
        with pytest.raises(HostError, match=r"no model 'gpt-9'.*\['tiny'\]"):
            Model.load("gpt-9")
        return runtime.models(), runtime.username(), runtime.instance_id(), model.page_size, model.vocab_size

    models, user, instance, page_size, vocab = await run_sdk(rt, body, username="bob")
    assert models == ["tiny"] and user == "bob" and len(instance) > 8
    assert page_size == 16 and vocab == 512


async def test_fillers_are_the_chat_template_and_stay_buffered(rt: Runtime, tiny: Path) -> None:
    tok = ModelTokenizer(tiny)

    async def body() -> tuple[list[int], int, int]:
        ctx = Context(Model.load(""))
        ctx.system("Be brief.").user("Hi there").cue()
        buffered, before = ctx.buffer(), ctx.seq_len
        await ctx.flush()
        return buffered, before, ctx.seq_len

    buffered, before, after = await run_sdk(rt, body)
    expected = tok.chat_tokens("system", "Be brief.") + tok.chat_tokens("user", "Hi there") + tok.chat_tokens("cue")
    assert buffered == expected
    assert (before, after) == (0, len(expected))


async def test_first_user_turn_gets_the_template_preamble(rt: Runtime, tiny: Path) -> None:
    tok = ModelTokenizer(tiny)

    async def body() -> list[int]:
        return Context(Model.load("")).user("Hi").buffer()

    assert await run_sdk(rt, body) == tok.chat_tokens("begin") + tok.chat_tokens("user", "Hi")


async def test_forward_outputs_and_handle_kinds(rt: Runtime) -> None:
    async def body() -> dict[str, object]:
        ctx = Context(Model.load(""))
        fwd = ctx.forward().input([5, 6, 7, 8])
        greedy = fwd.sample([2, 3], Sampler.argmax())
        dist = fwd.probe(3, Distribution(k=5))
        logits = fwd.probe(3, Logits())
        lp = fwd.probe(3, Logprobs([10, 11]))
        one = fwd.probe(3, Logprob(10))
        ent = fwd.probe(3, Entropy())
        out = await fwd.execute()
        return {"tokens": out.tokens_at(greedy), "first": out.token(greedy), "dist": out.distribution(dist),
                "logits": out.logits(logits), "lp": out.logprobs(lp), "one": out.logprobs(one),
                "ent": out.entropy(ent), "wrong": (out.distribution(logits), out.token(dist)), "seq": ctx.seq_len}

    r = await run_sdk(rt, body)
    logits = np.frombuffer(r["logits"], dtype="<f4")
    assert logits.shape == (512,)
    logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    ids, probs = r["dist"]
    assert len(ids) == 5 and ids[0] == int(np.argmax(logits)) == r["tokens"][1]
    assert np.allclose(probs, np.exp(logp[ids]), atol=1e-4) and probs == sorted(probs, reverse=True)
    assert r["first"] == r["tokens"][0]
    assert np.allclose(r["lp"], logp[[10, 11]], atol=1e-4) and np.isclose(r["one"][0], logp[10], atol=1e-4)
    assert np.isclose(r["ent"], -(np.exp(logp) * logp).sum(), atol=1e-4)
    assert r["wrong"] == (None, None)  # a handle of another kind reads as None
    assert r["seq"] == 4


async def test_fork_continues_like_recomputing(rt: Runtime) -> None:
    """A fork's next-token distribution equals a fresh context fed the same tokens, and forks copy the buffer."""
    prompt = list(range(20, 60))  # crosses a page boundary: committed + working pages

    async def body() -> tuple[list[float], list[float], list[int]]:
        model = Model.load("")
        base = Context(model).append(prompt)
        await base.flush()
        base.append([99, 100])
        child = base.fork()
        forked = await _logits_after(child, child.buffer())
        fresh = Context(model)
        recomputed = await _logits_after(fresh, [*prompt, 99, 100])
        return forked, recomputed, child.buffer()

    forked, recomputed, child_buffer = await run_sdk(rt, body)
    assert child_buffer == [99, 100]
    assert np.allclose(forked, recomputed, atol=1e-4)


async def _logits_after(ctx: Context, tokens: list[int]) -> list[float]:
    fwd = ctx.forward().input(tokens)
    h = fwd.probe(len(tokens) - 1, Logits())
    return np.frombuffer((await fwd.execute()).logits(h), dtype="<f4").tolist()


async def test_snapshots_save_open_take_delete(rt: Runtime) -> None:
    async def body() -> dict[str, object]:
        model = Model.load("")
        ctx = Context(model).append(list(range(30, 70)))
        await ctx.flush()
        ctx.save("doc")
        with pytest.raises(HostError):
            ctx.save("doc")  # names are not overwritten
        opened = Context.open(model, "doc")  # a fork: the snapshot stays
        again = Context.open(model, "doc")
        taken = Context.take(model, "doc")  # the snapshot is gone afterwards
        with pytest.raises(HostError):
            Context.open(model, "doc")
        with pytest.raises(HostError):
            Context.take(model, "doc")
        anon = ctx.snapshot()
        Context.delete(model, anon)
        with pytest.raises(HostError):
            Context.open(model, anon)
        return {"lens": (opened.seq_len, again.seq_len, taken.seq_len), "buffer": opened.buffer()}

    r = await run_sdk(rt, body)
    assert r["lens"] == (40, 40, 40) and r["buffer"] == []
    assert pages_in_use(rt) == 0  # the instance's end released every context


async def test_snapshot_names_are_per_user(rt: Runtime) -> None:
    async def save() -> None:
        ctx = Context(Model.load("")).append([1, 2, 3, 4])
        await ctx.flush()
        ctx.save("shared-name")

    async def open_it() -> int:
        return Context.open(Model.load(""), "shared-name").seq_len

    await run_sdk(rt, save, username="alice")
    assert await run_sdk(rt, open_it, username="alice") == 4
    with pytest.raises(HostError):
        await run_sdk(rt, open_it, username="mallory")


async def test_release_context_manager_and_truncate(rt: Runtime) -> None:
    async def body() -> tuple[int, int, int]:
        model = Model.load("")
        with Context(model) as ctx:
            ctx.append(list(range(40, 60)))
            await ctx.flush()
            held = pages_in_use(rt)
            ctx.truncate(3)  # only working-page tokens: 20 = 16 committed + 4 working
            after_truncate = ctx.seq_len
        ctx.release()  # idempotent
        return held, after_truncate, pages_in_use(rt)

    held, after_truncate, after_release = await run_sdk(rt, body)
    assert held == 2 and after_truncate == 17 and after_release == 0


async def test_input_at_past_the_end_is_reserved_and_masks_apply(rt: Runtime) -> None:
    """input_at writes KV too; the SDK reserves for it. An attention mask that hides the prompt changes
    the output exactly like feeding the last token alone."""
    async def body() -> tuple[int, list[float], list[float]]:
        model = Model.load("")
        ctx = Context(model)
        fwd = ctx.forward().input_at([3, 4, 5, 6], [0, 1, 2, 3])
        await fwd.execute()
        masked = ctx.forward().input([9])
        masked.attention_mask([[4, 1]])  # attend to itself only
        h = masked.probe(0, Logits())
        masked_logits = np.frombuffer((await masked.execute()).logits(h), dtype="<f4").tolist()
        alone = Context(model).forward().input_at([9], [4])
        h2 = alone.probe(0, Logits())
        alone_logits = np.frombuffer((await alone.execute()).logits(h2), dtype="<f4").tolist()
        return ctx.seq_len, masked_logits, alone_logits

    seq, masked, alone = await run_sdk(rt, body)
    assert seq == 5
    assert np.allclose(masked, alone, atol=1e-4)


async def test_bad_rows_and_empty_passes_are_refused(rt: Runtime) -> None:
    async def body() -> None:
        ctx = Context(Model.load(""))
        with pytest.raises(ValueError, match="row 3 is outside"):
            fwd = ctx.forward().input([1, 2])
            fwd.sample([3], Sampler.argmax())
            await fwd.execute()
        with pytest.raises(ValueError, match="no inputs"):
            await ctx.forward().execute()
        with pytest.raises(HostError, match="logit_mask allows no token"):
            await ctx.forward().input([1]).mask(brle.all_false(512)).execute()

    await run_sdk(rt, body)


async def test_bid_maps_to_priority_and_idle_restores_it(rt: Runtime) -> None:
    async def body() -> list[float]:
        ctx = Context(Model.load(""))
        ctx.set_bid(3.5)
        handle = ctx.handle
        ctx_runtime = rt.processes()[-1].host._contexts[handle][1]  # the runtime's side of it
        seen = [ctx_runtime.priority]
        with ctx.idle():
            seen.append(ctx_runtime.priority)
        seen.append(ctx_runtime.priority)
        return seen

    assert await run_sdk(rt, body) == [3.5, 0.0, 3.5]


async def test_chat_helpers_match_context_fillers(rt: Runtime) -> None:
    async def body() -> bool:
        model = Model.load("")
        ctx = Context(model).system("s").user("u").assistant("a").seal()
        expected = chat.system(model, "s") + chat.user(model, "u") + chat.assistant(model, "a") + chat.seal(model)
        return ctx.buffer() == expected

    assert await run_sdk(rt, body)
