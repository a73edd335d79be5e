"""The Generator's bookkeeping (spec 1.7) on the real runtime: buffering, stops, caps, manual sampling,
speculation equal to greedy, constraints and collectors."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import numpy as np
import pytest
from inferlet_helpers import run_sdk, start_runtime

from inferlet import (
    Context,
    Ebnf,
    Logits,
    Model,
    NgramSpeculator,
    Regex,
    Sampler,
    brle,
    chat,
)
from pie.runtime.runtime import Runtime
from pie.tiny_model import ensure_tiny_model

PROMPT = list(range(40, 75))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("pie-home"))


@pytest.fixture
async def rt(tiny: Path) -> Runtime:
    runtime_ = await start_runtime(tiny)
    yield runtime_
    runtime_.check_integrity()
    await runtime_.shutdown(0)


async def reference_greedy(prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with raw forward passes, one token per pass."""
    ctx = Context(Model.load(""))
    feed, out = list(prompt), []
    for _ in range(n):
        fwd = ctx.forward().input(feed)
        h = fwd.sample([len(feed) - 1], Sampler.argmax())
        feed = [(await fwd.execute()).token(h)]
        out += feed
    return out


async def test_last_token_stays_buffered_and_seal_follows_it(rt: Runtime) -> None:
    async def body() -> dict[str, object]:
        model = Model.load("")
        ctx = Context(model).append(PROMPT)
        gen = ctx.generate(Sampler.argmax(), max_tokens=6, auto_flush=False, stop=[])
        tokens = await gen.collect_tokens()
        state = {"tokens": tokens, "seq": ctx.seq_len, "buffer": ctx.buffer(), "n": gen.tokens_generated,
                 "done": gen.is_done, "ref": await reference_greedy(PROMPT, 6)}
        ctx.seal()
        state["after_seal"] = ctx.buffer()
        state["seal"] = chat.seal(model)
        return state

    r = await run_sdk(rt, body)
    assert r["tokens"] == r["ref"] and r["n"] == 6 and r["done"]
    assert r["seq"] == len(PROMPT) + 5  # the 6th token is not in the KV cache yet
    assert r["buffer"] == r["tokens"][-1:]
    assert r["after_seal"] == r["tokens"][-1:] + r["seal"]


async def test_generate_appends_the_cue_and_stops_at_end_of_turn(rt: Runtime) -> None:
    async def body() -> tuple[list[int], list[int], list[int]]:
        model = Model.load("")
        ctx = Context(model).user("hello")
        before = ctx.buffer()
        ctx.generate(Sampler.argmax(), max_tokens=3)
        return before, ctx.buffer(), chat.cue(model)

    before, after, cue = await run_sdk(rt, body)
    assert after == before + cue  # auto_flush: exactly one cue, added by generate()

    async def stopping() -> tuple[list[int], list[int]]:
        ctx = Context(Model.load("")).append(PROMPT)
        ref = await reference_greedy(PROMPT, 8)
        stop = ref[3]
        out = await ctx.generate(Sampler.argmax(), max_tokens=8, stop=[stop], auto_flush=False).collect_tokens()
        return out, ref[:ref.index(stop)]

    out, expected = await run_sdk(rt, stopping)
    assert out == expected  # the stop token itself is not returned


async def test_stepwise_iteration_and_manual_sampling(rt: Runtime) -> None:
    async def body() -> tuple[list[int], list[int], int]:
        ctx = Context(Model.load("")).append(PROMPT)
        gen = ctx.generate(Sampler.argmax(), max_tokens=5, auto_flush=False, stop=[])
        tokens, steps = [], 0
        async for step in gen:
            step.clear_sampler()
            h = step.probe(len(step.pending) - 1, Logits())
            out = await step.execute()
            assert out.tokens == [] and out.auto_sampler is None
            pick = int(np.argmax(np.frombuffer(out.logits(h), dtype="<f4")))
            tokens += gen.accept([pick])
            steps += 1
        return tokens, await reference_greedy(PROMPT, 5), steps

    manual, ref, steps = await run_sdk(rt, body)
    assert manual == ref and steps == 5


class WrongDrafter:
    """Always proposes tokens the model will not pick: every draft is rejected and rolled back."""

    def __init__(self) -> None:
        self.rolled_back = 0

    def draft(self) -> tuple[list[int], list[int]]:
        return [511, 510, 509], []

    def accept(self, tokens: list[int]) -> None:
        pass

    def rollback(self, n: int) -> None:
        self.rolled_back += n

    def reset(self) -> None:
        pass


@pytest.mark.parametrize("mode", ["ngram", "wrong", "system"])
async def test_speculation_gives_exactly_greedy_output(rt: Runtime, mode: str) -> None:
    repetitive = [7, 8, 9, 10] * 8  # prompt lookup finds continuations here

    async def body() -> tuple[list[int], list[int], int, int]:
        ctx = Context(Model.load("")).append(repetitive)
        drafter = {"ngram": NgramSpeculator(repetitive), "wrong": WrongDrafter(), "system": None}[mode]
        gen = ctx.generate(Sampler.argmax(), max_tokens=24, auto_flush=False, stop=[], speculator=drafter,
                           system_speculation=True if mode == "system" else None)
        tokens, steps = [], 0
        async for step in gen:
            tokens += (await step.execute()).tokens
            steps += 1
        kv = ctx.seq_len
        return tokens, await reference_greedy(repetitive, 24), steps, kv

    tokens, ref, steps, kv = await run_sdk(rt, body)
    assert tokens == ref
    assert kv == len(repetitive) + 23  # rejected drafts left no KV behind
    if mode == "wrong":
        assert steps == 24
    if mode != "wrong":
        assert steps < 24, ref  # the tiny model's output repeats itself: drafts were accepted


async def test_json_schema_output_validates(rt: Runtime) -> None:
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "count", "tags"],
              "properties": {"name": {"type": "string", "maxLength": 12},
                             "count": {"type": "integer", "minimum": 0, "maximum": 999},
                             "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["a", "b", "c"]}}}}

    async def body(seed: int) -> object:
        ctx = Context(Model.load("")).user("make a record")
        gen = ctx.generate(Sampler.top_p(1.0, 1.0), max_tokens=160, seed=seed)
        return await gen.collect_json(schema=schema)

    for seed in range(3):
        value = await run_sdk(rt, lambda s=seed: body(s))
        jsonschema.validate(value, schema)


async def test_regex_and_lark_constraints(rt: Runtime) -> None:
    async def body() -> tuple[str, str]:
        model = Model.load("")
        date = await Context(model).user("a date").generate(
            Sampler.top_p(1.0, 1.0), max_tokens=20, constrain=Regex(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"),
            seed=1).collect_text()
        grammar = 'start: "yes" | "no" | "maybe " NUMBER\nNUMBER: /[0-9]{1,3}/'
        answer = await Context(model).user("answer").generate(
            Sampler.top_p(1.0, 1.0), max_tokens=20, constrain=Ebnf(grammar), seed=2).collect_text()
        return date, answer

    date, answer = await run_sdk(rt, body)
    assert __import__("re").fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", date), date
    assert __import__("re").fullmatch(r"yes|no|maybe [0-9]{1,3}", answer), answer


async def test_logit_mask_and_constraints_combine(rt: Runtime) -> None:
    allowed = [100, 101, 102, 103]

    async def body() -> list[int]:
        ctx = Context(Model.load("")).append(PROMPT)
        mask = brle.from_tokens(512, allowed)
        only_even = Mask(brle.from_tokens(512, [100, 102]))
        gen = ctx.generate(Sampler.top_p(1.0, 1.0), max_tokens=12, auto_flush=False, stop=[], logit_mask=mask,
                           constrain=only_even, seed=3)
        return await gen.collect_tokens()

    tokens = await run_sdk(rt, body)
    assert len(tokens) == 12 and set(tokens) <= {100, 102}


class Mask:
    """A user constraint: any object with step(accepted) -> brle."""

    def __init__(self, mask: list[int]) -> None:
        self.mask = mask
        self.seen: list[int] = []

    def step(self, accepted: list[int]) -> list[int]:
        self.seen += accepted
        return self.mask


async def test_collect_text_equals_decoding_the_tokens(rt: Runtime) -> None:
    async def body() -> tuple[str, str, str]:
        model = Model.load("")
        ctx = Context(model).user("tell me")
        fork = ctx.fork()
        text = await ctx.generate(Sampler.argmax(), max_tokens=20).collect_text()
        tokens = await fork.generate(Sampler.argmax(), max_tokens=20).collect_tokens()
        decoder = chat.Decoder(model)
        streamed = "".join(e.text for t in tokens if isinstance(e := decoder.feed([t]), chat.Event.Delta))
        streamed += decoder.finish()
        return text, model.tokenizer().decode(tokens), streamed

    text, decoded, streamed = await run_sdk(rt, body)
    assert text == decoded == streamed


async def test_probe_each_step_sees_every_step(rt: Runtime) -> None:
    async def body() -> tuple[int, list[int], list[int]]:
        ctx = Context(Model.load("")).append(PROMPT)
        gen = ctx.generate(Sampler.argmax(), max_tokens=4, auto_flush=False, stop=[])
        probe = gen.probe_each_step(-1, Logits())
        picks, tokens = [], []
        async for step in gen:
            out = await step.execute()
            picks.append(int(np.argmax(np.frombuffer(out.logits(probe), dtype="<f4"))))
            tokens += out.tokens
        return len(picks), picks, tokens

    n, picks, tokens = await run_sdk(rt, body)
    assert n == 4 and picks == tokens


async def test_speculator_and_system_speculation_are_exclusive(rt: Runtime) -> None:
    async def body() -> None:
        ctx = Context(Model.load(""))
        with pytest.raises(ValueError, match="mutually exclusive"):
            ctx.generate(Sampler.argmax(), speculator=NgramSpeculator(), system_speculation=True)

    await run_sdk(rt, body)


async def test_asking_for_a_step_before_executing_the_last_one_is_an_error(rt: Runtime) -> None:
    async def body() -> list[int]:
        ctx = Context(Model.load("")).append(PROMPT)
        gen = ctx.generate(Sampler.argmax(), max_tokens=4, auto_flush=False, stop=[])
        first = await anext(aiter(gen))
        with pytest.raises(RuntimeError, match="execute"):  # it would generate from nothing, forever
            await anext(aiter(gen))
        tokens = (await first.execute()).tokens  # the step still runs, and the generator goes on
        return tokens + await gen.collect_tokens()

    assert await run_sdk(rt, body) == await run_sdk(rt, lambda: reference_greedy(PROMPT, 4))
