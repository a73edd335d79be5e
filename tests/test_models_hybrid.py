"""Hybrid families (Qwen 3.5 + MoE, Qwen3-Next, Nemotron-H) through HybridRunner vs transformers (tiny, float32).

The model alone, without an Engine (prefill logits of every type through `Engine.forward_batch` are in
test_engine_hybrid.py). The full-attention layers run on the paged KV cache, the Gated DeltaNet / Mamba-2 layers on
the state pool: 32 greedy steps of two sequences decoded together (the recurrent path), chunked
prefill resuming from the slot, a mixed prefill + decode batch, and fork (state copy) then continue.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoints import load_reference, tiny_checkpoint

from pie.engine.hybrid_runner import HybridRunner

ARCHS = ["qwen3_5_text", "qwen3_5", "qwen3_next", "qwen3_5_moe_text", "qwen3_5_moe", "nemotron_h"]
TEXT_ARCHS = ["qwen3_5_text", "qwen3_next", "nemotron_h"]  # the distinct mixers and MLPs (the others combine them)
STATE_ARCHS = ["qwen3_5_text", "nemotron_h"]  # Gated DeltaNet and Mamba-2 on the one state pool
PROMPTS = [[5, 9, 100, 3, 77, 41, 8, 250, 13, 6, 99, 120, 7], [11, 300, 4], list(range(20, 90))]
TOL = 1e-4  # max |ours - ref| / max |ref|


def _make(tmp_path_factory: pytest.TempPathFactory, arch: str) -> tuple[Path, Any]:
    directory = tiny_checkpoint(tmp_path_factory.mktemp(arch), arch, seed=3)
    return directory, load_reference(directory)


@pytest.fixture(scope="module", params=ARCHS)
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """Every hybrid checkpoint layout (the image-text wrapper proves its name mapping by the prefill test)."""
    return _make(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """The language model alone, for the state-handling tests (the wrapper runs the same layers)."""
    return _make(tmp_path_factory, "qwen3_5_text")


def _runner(directory: Path, page_size: int = 16) -> HybridRunner:
    return HybridRunner.load(directory, page_size=page_size, num_pages=512, num_slots=8)


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    err = ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    assert err < TOL, f"relative error {err:.3g} >= {TOL}"


def _hf_logits(model: Any, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


@pytest.mark.parametrize("checkpoint", TEXT_ARCHS, indirect=True)
def test_greedy_32_steps_match_transformers(checkpoint: tuple[Path, Any]) -> None:
    """Two sequences of different lengths decoded together: identical tokens and every step's logits."""
    directory, ref = checkpoint
    runner = _runner(directory, page_size=4)
    prompts = PROMPTS[:2]
    seqs = [runner.new_sequence() for _ in prompts]
    feeds = dict(zip(seqs, prompts, strict=True))
    tokens: dict[int, list[int]] = {s: [] for s in seqs}
    logits: dict[int, list[torch.Tensor]] = {s: [] for s in seqs}
    for _ in range(32):
        out = runner.forward(feeds)
        for s in seqs:
            last = out[s][-1]
            tokens[s].append(int(last.argmax()))
            logits[s].append(last)
        feeds = {s: [tokens[s][-1]] for s in seqs}
    for s, prompt in zip(seqs, prompts, strict=True):
        # transformers on the whole generated sequence at once: its row for each step's last token is that
        # step's distribution (its chunked path; ours decoded token by token through the recurrent one).
        ref_logits = _hf_logits(ref, [*prompt, *tokens[s]])[len(prompt) - 1:-1]
        assert tokens[s] == ref_logits.argmax(-1).tolist()
        for ours, theirs in zip(logits[s], ref_logits, strict=True):
            _close(ours, theirs)


@pytest.mark.parametrize("checkpoint", STATE_ARCHS, indirect=True)
def test_chunked_prefill_resumes_from_the_slot(checkpoint: tuple[Path, Any]) -> None:
    """A 70-token prompt in chunks of 30, 1 and 39 (the 1-token chunk takes the recurrent path) == one piece."""
    directory, ref = checkpoint
    runner = _runner(directory)
    prompt = PROMPTS[2]
    s = runner.new_sequence()
    pieces = [runner.forward({s: prompt[a:b]})[s] for a, b in ((0, 30), (30, 31), (31, 70))]
    _close(torch.cat(pieces), _hf_logits(ref, prompt))


def test_mixed_prefill_and_decode_batch(text_checkpoint: tuple[Path, Any]) -> None:
    """One sequence decodes while another starts and a third continues its prefill, all in one batch."""
    directory, ref = text_checkpoint
    runner = _runner(directory)
    a, b, c = (runner.new_sequence() for _ in range(3))
    runner.forward({a: PROMPTS[0][:-1], c: PROMPTS[2][:40]})
    out = runner.forward({a: PROMPTS[0][-1:], b: PROMPTS[1], c: PROMPTS[2][40:]})
    _close(out[a][-1], _hf_logits(ref, PROMPTS[0])[-1])
    _close(out[b], _hf_logits(ref, PROMPTS[1]))
    _close(out[c], _hf_logits(ref, PROMPTS[2])[40:])


@pytest.mark.parametrize("checkpoint", STATE_ARCHS, indirect=True)
def test_fork_then_continue_equals_recompute(checkpoint: tuple[Path, Any]) -> None:
    directory, ref = checkpoint
    runner = _runner(directory)
    prompt = PROMPTS[0]
    parent = runner.new_sequence()
    runner.forward({parent: prompt})
    child = runner.fork(parent)
    assert runner.slot_of(child) != runner.slot_of(parent)
    # The two branches continue differently in one batch; each equals a cold run of its whole sequence.
    out = runner.forward({parent: [42, 43], child: [7, 8, 9]})
    _close(out[parent], _hf_logits(ref, [*prompt, 42, 43])[-2:])
    _close(out[child], _hf_logits(ref, [*prompt, 7, 8, 9])[-3:])
    runner.free(child)
    runner.states.check_integrity()


def test_last_row_logits_only(text_checkpoint: tuple[Path, Any]) -> None:
    directory, ref = text_checkpoint
    runner = _runner(directory)
    a, b = runner.new_sequence(), runner.new_sequence()
    out = runner.forward({a: PROMPTS[0], b: PROMPTS[1]}, all_rows=False)
    assert out[a].shape[0] == out[b].shape[0] == 1
    _close(out[a][0], _hf_logits(ref, PROMPTS[0])[-1])
    _close(out[b][0], _hf_logits(ref, PROMPTS[1])[-1])
