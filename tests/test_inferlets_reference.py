"""Inferlets whose output has an exact reference: speculative decoding = greedy, beam search = a
brute-force beam search over transformers' model (full recompute of every candidate prefix)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from inferlet_helpers import result, start_runtime

from pie.runtime.tokenizer import ModelTokenizer
from pie.tiny_model import ensure_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("pie-home"))


async def test_speculative_decoding_equals_greedy(tiny: Path) -> None:
    rt = await start_runtime(tiny)
    try:
        for prompt in ("the cat the cat the cat the", "List: one, two, three, one, two,"):
            spec = await result(rt, "speculative-decoding", {"prompt": prompt, "max_tokens": 40})
            greedy = await result(rt, "text-completion", {"prompt": prompt, "max_tokens": 40,
                                                          "system": "You are a helpful assistant."})
            assert spec["text"] == greedy
            assert spec["steps"] < len(spec["tokens"])  # drafts were accepted: fewer passes than tokens
            assert spec["accepted"] <= spec["drafted"]
    finally:
        await rt.shutdown(0)


def brute_force_beam(model: torch.nn.Module, prompt: list[int], width: int, steps: int,
                     stops: set[int]) -> list[tuple[float, list[int]]]:
    """The inferlet's algorithm (keep the `width` best (score, beam, token) candidates; an end-of-turn
    token finishes its beam), each step recomputing every beam from its full token sequence."""
    beams: list[tuple[float, list[int]]] = [(0.0, [])]
    finished: list[tuple[float, list[int]]] = []
    for _ in range(steps):
        candidates = []
        for b, (score, tokens) in enumerate(beams):
            with torch.no_grad():
                logits = model(torch.tensor([prompt + tokens])).logits[0, -1].double()
            top = torch.log_softmax(logits, -1).topk(width)
            candidates += [(score + float(lp), b, int(t)) for lp, t in zip(top.values, top.indices, strict=True)]
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
        next_beams = []
        for score, b, tok in candidates[:width]:
            if tok in stops:
                finished.append((score, beams[b][1]))
            else:
                next_beams.append((score, [*beams[b][1], tok]))
        beams = next_beams
        if not beams:
            break
    finished += beams
    finished.sort(key=lambda f: -f[0])
    return finished


async def test_beam_search_equals_brute_force_reference(tiny: Path) -> None:
    from transformers import AutoModelForCausalLM

    rt = await start_runtime(tiny)
    try:
        out = await result(rt, "beam-search", {"prompt": "Once upon a time", "beam_width": 3, "max_tokens": 6})
    finally:
        await rt.shutdown(0)
    tok = ModelTokenizer(tiny)
    prompt = tok.chat_tokens("system", "You are a helpful assistant.") + \
        tok.chat_tokens("user", "Once upon a time") + tok.chat_tokens("cue")
    assert out["prompt_tokens"] == prompt
    model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32).eval()
    reference = brute_force_beam(model, prompt, 3, 6, set(tok.stop_tokens))
    assert out["tokens"] == reference[0][1]
    assert out["score"] == pytest.approx(reference[0][0], abs=1e-3)
    assert [b["tokens"] for b in out["beams"]] == [t for _, t in reference[:3]]
