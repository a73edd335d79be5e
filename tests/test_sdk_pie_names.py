"""Names and signatures written as Pie's Python SDK documents them (shared/spec/inferlet-api.md), each
used the way a program written for Pie uses it."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
from inferlet_helpers import run_sdk, start_runtime

from inferlet import (
    Adapter,
    Context,
    Grammar,
    GrammarConstraint,
    Logprobs,
    Matcher,
    Model,
    Sampler,
    chat,
    reasoning,
    tools,
)
from pie.tiny_model import ensure_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("pie-home"))


def test_keyword_names_are_pies() -> None:
    assert list(inspect.signature(Matcher).parameters) == ["grammar", "tokenizer"]
    assert list(inspect.signature(Matcher.accept_tokens).parameters) == ["self", "token_ids"]
    assert list(inspect.signature(Grammar.from_ebnf).parameters) == ["ebnf"]
    assert list(inspect.signature(GrammarConstraint.from_ebnf).parameters) == ["ebnf", "model"]
    assert Logprobs().tokens == () and Logprobs(tokens=[3, 4]).tokens == (3, 4)


def test_any_event_unions_name_every_event() -> None:
    assert set(chat.AnyEvent.__args__) == {chat.Idle, chat.Delta, chat.Done, chat.Interrupt}
    assert set(reasoning.AnyEvent.__args__) == {reasoning.Idle, reasoning.Start, reasoning.Delta, reasoning.End}
    assert set(tools.AnyEvent.__args__) == {tools.Idle, tools.Start, tools.Call}


async def test_matcher_is_terminated_is_a_property(tiny: Path) -> None:
    rt = await start_runtime(tiny)

    async def body() -> list[bool]:
        model = Model.load("")
        m = Matcher(Grammar.from_regex("ab"), tokenizer=model.tokenizer())
        seen = [m.is_terminated]
        m.accept_tokens(token_ids=model.tokenizer().encode("ab"))
        m.next_token_logit_mask()
        return [*seen, m.is_accepting()]

    try:
        before, accepting = await run_sdk(rt, body)
    finally:
        await rt.shutdown(0)
    assert before is False  # `if m.is_terminated:` must not be always true (a bound method is truthy)
    assert accepting


async def test_native_matcher_forces_a_call_that_parses_and_fits_its_schema(tiny: Path) -> None:
    rt = await start_runtime(tiny)
    weather = {"name": "weather", "description": "the weather in a city",
               "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                              "properties": {"city": {"enum": ["Paris", "Rome"]}}}}

    async def body() -> tuple[object, str]:
        model = Model.load("")
        assert tools.native_matcher(model, []) is None
        matcher = tools.native_matcher(model, [weather])
        assert matcher is not None
        ctx = Context(model)
        ctx.user("Weather in Paris?")
        ctx.cue()
        text = await ctx.generate(Sampler.argmax(), max_tokens=64,
                                  constrain=GrammarConstraint(matcher)).collect_text()
        decoder = tools.Decoder(model)
        event = decoder.feed(model.tokenizer().encode(text))
        return event, text

    try:
        event, text = await run_sdk(rt, body)
    finally:
        await rt.shutdown(0)
    assert isinstance(event, tools.Call), text
    assert event.name == "weather" and event.arguments["city"] in ("Paris", "Rome")
    assert json.loads(event.args) == event.arguments


async def test_adapter_is_a_context_manager(tiny: Path) -> None:
    rt = await start_runtime(tiny)

    async def body() -> str:
        model = Model.load("")
        with Adapter.create(model, "scoped") as a:
            return a.name

    try:
        assert await run_sdk(rt, body) == "scoped"
    finally:
        await rt.shutdown(0)


async def test_scheduling_reports_pages_and_latency_in_pies_units(tiny: Path) -> None:
    from inferlet import scheduling

    rt = await start_runtime(tiny)

    async def body() -> dict[str, float]:
        model = Model.load("")
        before = scheduling.balance(model)
        ctx = Context(model)
        ctx.user("Hello there, how are you?")
        await ctx.generate(Sampler.argmax(), max_tokens=4).collect_tokens()
        return {"price": scheduling.price(), "before": before, "after": scheduling.balance(model),
                "rent": scheduling.rent(ctx),
                "dividend": scheduling.dividend(model), "latency": scheduling.latency(ctx)}

    try:
        got = await run_sdk(rt, body)
    finally:
        await rt.shutdown(0)
    assert got["price"] == 1.0 and got["dividend"] == 0.0
    assert got["rent"] >= 1.0 and got["before"] - got["after"] == got["rent"]  # pages now held by the context
    assert got["latency"] > 0.0


async def test_generator_and_output_as_pie_has_them(tiny: Path) -> None:
    from inferlet import Forward  # noqa: F401  (the names a Pie program imports)

    rt = await start_runtime(tiny)

    async def body() -> dict[str, object]:
        model = Model.load("")
        ctx = Context(model)
        ctx.user("Hi")
        gen = ctx.generate(Sampler.argmax(), max_tokens=3)
        with pytest.raises(AttributeError):
            gen.tokens_generated = 5  # type: ignore[misc]  # read-only, as in Pie
        steps = []
        async for step in gen:
            out = await step.execute()
            steps.append((out.raw.slots, out.raw.spec_tokens, out.raw.spec_positions, list(out.raw)))
        return {"generated": gen.tokens_generated, "steps": steps}

    try:
        got = await run_sdk(rt, body)
    finally:
        await rt.shutdown(0)
    assert got["generated"] == 3
    for slots, spec_tokens, spec_positions, as_list in got["steps"]:  # type: ignore[attr-defined]
        assert spec_tokens == [] and spec_positions == [] and as_list == slots and len(slots) >= 1
