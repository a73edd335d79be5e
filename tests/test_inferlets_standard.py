"""Every standard inferlet end to end through the runtime, each checked for a property a user relies on.

(speculative-decoding and beam-search are checked against references in test_inferlets_reference.py,
the messaging pair in test_messaging.py.)
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from inferlet_helpers import launch, pages_in_use, result, run_sdk, start_runtime

from inferlet import Context, Model, Sampler
from pie.runtime.runtime import Runtime
from pie.tiny_model import ensure_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("pie-home"))


@pytest.fixture
async def rt(tiny: Path) -> Runtime:
    runtime_ = await start_runtime(tiny, max_num_kv_pages=512)
    yield runtime_
    assert pages_in_use(runtime_) == 0 or runtime_.model().snapshots  # only snapshots outlive instances
    runtime_.check_integrity()
    await runtime_.shutdown(0)


async def test_text_completion_is_chat_formatted_greedy_and_streams(rt: Runtime) -> None:
    async def reference() -> str:
        ctx = Context(Model.load(""))
        ctx.system("Be terse.").user("Name a color.")
        return await ctx.generate(Sampler.argmax(), max_tokens=12).collect_text()

    expected = await run_sdk(rt, reference)
    inputs = {"prompt": "Name a color.", "system": "Be terse.", "max_tokens": 12}
    assert await result(rt, "text-completion", inputs) == expected
    final, events = await launch(rt, "text-completion", {**inputs, "stream": True})
    assert final.value == expected
    assert "".join(e.value for e in events if e.kind == "message") == expected
    assert sum(e.kind == "message" for e in events) > 1
    sampled = [await result(rt, "text-completion", {**inputs, "temperature": 1.0, "seed": 7}) for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed makes sampling reproducible


async def test_chat_keeps_the_conversation_across_turns(rt: Runtime) -> None:
    process = await rt.launch("chat", json.dumps({"max_tokens": 6}), username="alice")
    for message in ("hello", "and then?", "/exit"):
        process.send_message(message)
    events = [e async for e in process.events()]
    final = events[-1]
    assert final.kind == "return", final.value
    out = json.loads(final.value)
    replies = [e.value for e in events if e.kind == "message"]
    assert [t["assistant"] for t in out["turns"]] == replies and len(replies) == 2
    # The second turn was generated after the first turn's KV, not from scratch.
    async def replay() -> str:
        ctx = Context(Model.load(""))
        ctx.system("You are a helpful assistant.").user("hello")
        await ctx.generate(Sampler.argmax(), max_tokens=6).collect_text()
        ctx.seal().user("and then?")
        return await ctx.generate(Sampler.argmax(), max_tokens=6).collect_text()

    assert await run_sdk(rt, replay) == replies[1]


async def test_best_of_n_forks_one_prefill(rt: Runtime) -> None:
    out = await result(rt, "best-of-n", {"prompt": "Say something.", "n": 4, "max_tokens": 8, "temperature": 1.0,
                                         "seed": 3})
    assert len(out["candidates"]) == 4 and out["best"] == out["candidates"][out["best_index"]]
    assert len(set(out["candidates"])) > 1  # distinct seeds, distinct samples
    greedy = await result(rt, "best-of-n", {"prompt": "Say something.", "n": 3, "max_tokens": 8,
                                            "temperature": 0})
    assert len(set(greedy["candidates"])) == 1  # forks of one prefix decode identically
    single = await result(rt, "text-completion", {"prompt": "Say something.", "max_tokens": 8,
                                                  "system": "You are a helpful assistant."})
    assert greedy["best"] == single


async def test_constrained_json_always_validates(rt: Runtime) -> None:
    schema = {"type": "object", "additionalProperties": False, "required": ["city", "population", "capital"],
              "properties": {"city": {"type": "string", "maxLength": 16},
                             "population": {"type": "integer", "minimum": 0, "maximum": 100000},
                             "capital": {"type": "boolean"}}}
    for seed in range(4):
        value = await result(rt, "constrained-json", {"prompt": "a city", "schema": json.dumps(schema),
                                                      "temperature": 1.0, "seed": seed, "max_tokens": 200})
        jsonschema.validate(value, schema)


async def test_modular_cache_reuses_saved_modules(rt: Runtime) -> None:
    modules = ["You answer from documents.", "Doc one: the sky is blue.", "Doc two: grass is green."]
    first = await result(rt, "modular-cache", {"modules": modules, "prompt": "Color of grass?", "max_tokens": 6})
    used_after_first = pages_in_use(rt)
    second = await result(rt, "modular-cache", {"modules": modules, "prompt": "Color of grass?", "max_tokens": 6})
    third = await result(rt, "modular-cache", {"modules": [*modules[:2], "Doc three."], "prompt": "?",
                                               "max_tokens": 4})
    assert (first["reused_modules"], second["reused_modules"], third["reused_modules"]) == (0, 3, 2)
    assert second["text"] == first["text"]  # the cached KV answers exactly like the fresh prefill
    assert used_after_first > 0  # the snapshots hold pages after the instance ended
    other_user = await result(rt, "modular-cache", {"modules": modules, "prompt": "?", "max_tokens": 2},
                              username="bob")
    assert other_user["reused_modules"] == 0  # snapshot names are per user


async def test_agent_react_runs_tools_and_finishes(rt: Runtime) -> None:
    out = await result(rt, "agent-react", {"question": "What is 6*7?", "max_steps": 1})
    steps = out["steps"]
    assert 1 <= len(steps) <= 2 and "answer" in steps[-1] and out["answer"] == steps[-1]["answer"]
    for step in steps[:-1]:
        assert step["action"] in ("calculator", "lookup")
        assert isinstance(step["observation"], str) and step["observation"]


async def test_watermark_is_detected_only_where_present(rt: Runtime) -> None:
    for seed in range(8):  # a sampled end of turn can cut a text short: take the first long one
        marked = await result(rt, "watermark", {"prompt": "Write.", "max_tokens": 40, "delta": 4.0, "seed": seed})
        if len(marked["tokens"]) >= 24:
            break
    assert len(marked["tokens"]) >= 24 and marked["z"] > 4.0
    detected = await result(rt, "watermark", {"mode": "detect", "tokens": json.dumps(marked["tokens"])})
    assert detected["watermarked"] and np.isclose(detected["z"], marked["z"])
    plain = np.random.default_rng(5).integers(3, 500, 60).tolist()
    assert not (await result(rt, "watermark", {"mode": "detect", "tokens": plain}))["watermarked"]
    wrong_key = await result(rt, "watermark", {"mode": "detect", "tokens": marked["tokens"], "key": 1})
    assert not wrong_key["watermarked"]


async def test_tree_of_thought_explores_and_frees_its_branches(rt: Runtime) -> None:
    out = await result(rt, "tree-of-thought", {"problem": "2+2?", "depth": 2, "breadth": 2, "keep": 2,
                                               "thought_tokens": 4, "answer_tokens": 4})
    assert [len(level) for level in out["tree"]] == [2, 4]
    assert len(out["thoughts"]) == 2 and isinstance(out["answer"], str)
    best_leaf = max(t["score"] for t in out["tree"][-1])
    assert out["score"] == best_leaf
    assert pages_in_use(rt) == 0


def sink_window_row(slot: int, kv_len: int, sink: int, window: int) -> list[int]:
    seen = slot + 1
    if seen <= sink + window:
        return [0, seen, kv_len - seen]
    return [0, sink, seen - sink - window, window, kv_len - seen]


async def test_attention_sink_incremental_equals_recomputed(rt: Runtime) -> None:
    """Decoding step by step under sink+window masks gives the tokens one pass over the whole text
    (with the same masks) picks at every row; with a window larger than the text it is plain greedy."""
    sink, window = 4, 8
    out = await result(rt, "attention-sink", {"prompt": "Tell a story.", "sink": sink, "window": window,
                                              "max_tokens": 16})
    wide = await result(rt, "attention-sink", {"prompt": "Tell a story.", "window": 4096, "max_tokens": 16})
    plain = await result(rt, "text-completion", {"prompt": "Tell a story.", "max_tokens": 16,
                                                 "system": "You are a helpful assistant."})
    assert wide["text"] == plain

    async def recompute() -> list[int]:
        model = Model.load("")
        from inferlet import chat

        prompt = chat.system(model, "You are a helpful assistant.") + chat.user(model, "Tell a story.") + \
            chat.cue(model)
        seq = prompt + out["tokens"]
        fwd = Context(model).forward().input(seq)
        fwd.attention_mask([sink_window_row(i, len(seq), sink, window) for i in range(len(seq))])
        h = fwd.sample(list(range(len(prompt) - 1, len(seq) - 1)), Sampler.argmax())
        return (await fwd.execute()).tokens_at(h)

    assert await run_sdk(rt, recompute) == out["tokens"]
    assert out["kv_len"] > sink + window


async def test_standard_inferlets_run_concurrently(rt: Runtime) -> None:
    jobs = [("text-completion", {"prompt": "a", "max_tokens": 4}), ("best-of-n", {"prompt": "b", "n": 2,
            "max_tokens": 4}), ("beam-search", {"prompt": "c", "max_tokens": 3}),
            ("speculative-decoding", {"prompt": "d", "max_tokens": 4}),
            ("watermark", {"prompt": "e", "max_tokens": 4})]
    finals = await asyncio.gather(*(launch(rt, name, inputs) for name, inputs in jobs))
    assert [f.kind for f, _ in finals] == ["return"] * len(jobs), [f.value for f, _ in finals]
