"""SDK pieces that need no engine pass (BRLE, drafting, tag scanning) and the grammar masks checked
against llguidance compiled from the model's own tokenizer.json."""

from __future__ import annotations

import json
from pathlib import Path

import llguidance
import numpy as np
import pytest
from inferlet_helpers import run_sdk, start_runtime
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from inferlet import (
    GrammarConstraint,
    GrammarError,
    JsonSchema,
    Model,
    NgramSpeculator,
    Regex,
    brle,
    reasoning,
    tools,
)
from inferlet._tags import TagScanner
from pie.runtime.tokenizer import ModelTokenizer
from pie.tiny_model import ensure_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("pie-home"))


def test_brle_round_trip_and_algebra() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        mask = rng.random(int(rng.integers(1, 40))) < 0.5
        runs = brle.encode(mask)
        assert runs[0] == 0 if mask[0] else runs[0] > 0  # runs start with a false run
        assert (brle.decode(runs) == mask).all()
        assert all(brle.is_allowed(runs, i) == bool(m) for i, m in enumerate(mask))
    assert brle.encode([True, True, False]) == [0, 2, 1]
    a, b = brle.from_tokens(10, [1, 2, 3]), brle.from_tokens(10, [2, 3, 4])
    assert np.flatnonzero(brle.decode(brle.and_(a, b))).tolist() == [2, 3]
    assert np.flatnonzero(brle.decode(brle.or_(a, b))).tolist() == [1, 2, 3, 4]
    assert brle.and_([], a) == a  # [] means no restriction
    assert brle.from_ranges(8, [(0, 2), (5, 7)]) == [0, 2, 3, 2, 1]
    bits = np.array([0b1010_0000_0000_0000_0000_0000_0000_0101], dtype=np.uint32).view(np.int32)
    assert np.flatnonzero(brle.decode(brle.from_bitmask(bits, 32))).tolist() == [0, 2, 29, 31]


def test_ngram_speculator_proposes_the_latest_continuation() -> None:
    s = NgramSpeculator([1, 2, 3, 4, 5, 1, 2, 3], ngram=3, max_draft=3)
    assert s.draft() == ([4, 5, 1], [])
    s.accept([9])
    assert s.draft() == ([], [])  # "9" never seen before
    s = NgramSpeculator([5, 6, 7, 5, 6, 8, 5, 6], ngram=2, max_draft=2, start_position=100)
    assert s.draft() == ([8, 5], [108, 109])  # the most recent "5 6" is followed by 8


def test_tag_scanner_handles_tags_split_across_chunks() -> None:
    scan = TagScanner("<think>", "</think>")
    events = []
    for chunk in ["Hi <th", "ink>rea", "son</thi", "nk> done"]:
        events += scan.push(chunk)
    assert events == [("text", "Hi "), ("open", "<think>"), ("inner", "rea"), ("inner", "son"),
                      ("close", "</think>"), ("text", " done")]


async def test_grammar_masks_equal_llguidance_on_the_hf_tokenizer(tiny: Path) -> None:
    """Our constraint (vocab bytes from the host) allows exactly what llguidance allows when it reads the
    model's tokenizer.json itself, step after step."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}
    tok = ModelTokenizer(tiny)
    text = '{"n":42,"ok":true}'
    steps = [[], *[[t] for t in tok.encode(text)]]
    reference_tok = llguidance.LLTokenizer((tiny / "tokenizer.json").read_text(), eos_token=tok.stop_tokens)
    matcher = llguidance.LLMatcher(reference_tok, llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema)))
    bitmask = allocate_token_bitmask(1, reference_tok.vocab_size)
    expected = []
    for accepted in steps:
        assert matcher.consume_tokens(accepted)
        fill_next_token_bitmask(matcher, bitmask)
        expected.append(np.flatnonzero(brle.decode(brle.from_bitmask(bitmask[0], 512))).tolist())

    rt = await start_runtime(tiny)

    async def body() -> list[list[int]]:
        constraint = JsonSchema(schema).build_constraint(Model.load(""))
        return [np.flatnonzero(brle.decode(constraint.step(a), 512)).tolist() for a in steps]

    try:
        got = await run_sdk(rt, body)
    finally:
        await rt.shutdown(0)
    assert got == expected
    assert set(got[-1]) == set(tok.stop_tokens)  # complete: only end-of-sequence tokens remain


async def test_grammar_errors_are_clear(tiny: Path) -> None:
    rt = await start_runtime(tiny)

    async def body() -> None:
        model = Model.load("")
        with pytest.raises(GrammarError, match="does not compile"):
            GrammarConstraint.from_ebnf("start: undefined_rule", model)
        constraint = Regex("ab").build_constraint(model)
        constraint.step([])
        with pytest.raises(GrammarError, match="leave the grammar"):
            constraint.step(model.tokenizer().encode("zz"))

    try:
        await run_sdk(rt, body)
    finally:
        await rt.shutdown(0)


async def test_reasoning_and_tool_decoders(tiny: Path) -> None:
    rt = await start_runtime(tiny)

    async def body() -> tuple[list[object], list[object]]:
        model = Model.load("")
        enc = model.tokenizer().encode
        r = reasoning.Decoder(model)
        r_events = [r.feed(enc(piece)) for piece in ["<think>", "so ", "yes", "</think>", "Answer"]]
        t = tools.Decoder(model)
        call = '<tool_call>{"name": "calculator", "arguments": {"expression": "2+3"}}</tool_call>'
        t_events = [t.feed([tok]) for tok in enc("ok " + call)]
        with pytest.raises(ValueError, match="not JSON"):
            tools.Decoder(model).feed(enc("<tool_call>{oops</tool_call>"))
        return r_events, t_events

    try:
        r_events, t_events = await run_sdk(rt, body)
    finally:
        await rt.shutdown(0)
    assert r_events[0] == reasoning.Start()
    assert r_events[1:3] == [reasoning.Delta("so "), reasoning.Delta("yes")]
    assert r_events[3] == reasoning.End("so yes") and r_events[4] == reasoning.Idle()
    starts = [e for e in t_events if isinstance(e, tools.Start)]
    calls = [e for e in t_events if isinstance(e, tools.Call)]
    assert len(starts) == 1 and len(calls) == 1 and t_events[-1] == calls[0]
    assert calls[0].name == "calculator" and calls[0].arguments == {"expression": "2+3"}
