"""Every model family against transformers on the same tiny random checkpoint.

For each family (tests/checkpoints.py builds it through transformers' own
config class, with the family's distinctive features switched on: sliding
windows shorter than the sequences, soft-caps, MoE, per-layer RoPE, KV
sharing, ...):
- the logits of every prompt row, prompts of different lengths batched together;
- 32 greedy steps of 3 sequences decoded together: identical tokens and every
  step's logits, against transformers' own generate with its KV cache.
Tolerance: max |ours - ref| / max |ref| < 1e-4 in float32.
"""

from __future__ import annotations

import pytest
from checkpoints import VOCAB, load_reference
from engine_helpers import all_row_logits, hf_logits, make_engine, random_prompts, rel_err
from parity_helpers import engine_greedy, hf_greedy_with_logits

FAMILIES = [
    "mistral", "ministral", "ministral3", "mistral3", "mistral3:mistral", "qwen2:sliding", "qwen3:sliding",
    "phi3", "mixtral", "qwen3_moe", "gemma2", "gemma3_text", "gemma3", "gemma4_text", "gemma4_text:moe", "gemma4",
    "olmo3", "gpt_oss",
]
TOL = 1e-4
# Phi-3's tiny LongRoPE threshold is 16 tokens. HF runs a whole sequence with the long factors once it is
# longer than that (re-prefilling at the crossing); prompts past it make both sides long from the start.
GREEDY_PROMPT_LENS = {"phi3": (17, 28)}


@pytest.mark.parametrize("arch", FAMILIES)
def test_prefill_logits_match_transformers(arch: str, checkpoint_dir) -> None:  # type: ignore[no-untyped-def]
    d = checkpoint_dir(arch)
    engine, ref = make_engine(d, kv_page_size=8), load_reference(d)
    prompts = random_prompts(3, VOCAB, 2, 40, seed=11)
    for prompt, ours in zip(prompts, all_row_logits(engine, prompts), strict=True):
        assert rel_err(ours, hf_logits(ref, prompt)) < TOL


@pytest.mark.parametrize("arch", FAMILIES)
def test_greedy_32_steps_match_transformers(arch: str, checkpoint_dir) -> None:  # type: ignore[no-untyped-def]
    d = checkpoint_dir(arch)
    engine, ref = make_engine(d, kv_page_size=8), load_reference(d)
    lo, hi = GREEDY_PROMPT_LENS.get(arch, (2, 16))
    prompts = random_prompts(2, VOCAB, lo, hi, seed=12)
    tokens, logits = engine_greedy(engine, prompts, 32)
    for prompt, toks, steps in zip(prompts, tokens, logits, strict=True):
        ref_toks, ref_steps = hf_greedy_with_logits(ref, prompt, 32)
        assert toks == ref_toks
        assert max(rel_err(a, b) for a, b in zip(steps, ref_steps, strict=True)) < TOL
