"""The engine's parity tests on CUDA with the FlashInfer backend (bf16 tolerances).

bf16 trajectories may legitimately diverge from the reference where two
logits tie within rounding, so greedy tokens are checked by teacher forcing:
every token we chose must be the reference's argmax up to a small logit margin.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checkpoints import VOCAB
from engine_helpers import (
    SeqPager,
    all_row_logits,
    greedy_generate,
    logits_of,
    make_engine,
    random_prompts,
    rel_err,
)

from pie.engine import brle
from pie.engine.batch import ForwardBatch, OutputSpec, Probe

pytestmark = pytest.mark.gpu

# FlashInfer kernels need a real head size (64/128/256), unlike the CPU tests' 16.
GPU_SHAPES = {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
              "intermediate_size": 512}
BF16_REL = 3e-2


def _engine(d, **kw):  # type: ignore[no-untyped-def]
    return make_engine(d, device="cuda:0", activation_dtype="bfloat16", attention_backend="flashinfer",
                       max_num_kv_pages=2048, **kw)


def _reference(d):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).cuda().eval()


def _ref_logits(model, prompt: list[int]) -> np.ndarray:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(torch.tensor([prompt], device="cuda")).logits[0].float().cpu().numpy()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_flashinfer_logits_match_transformers(arch: str, checkpoint_dir) -> None:  # type: ignore[no-untyped-def]
    d = checkpoint_dir(arch, **GPU_SHAPES)
    engine, ref = _engine(d), _reference(d)
    assert engine.info.attention_backend == "flashinfer"
    prompts = random_prompts(6, VOCAB, 1, 90, seed=1)
    for prompt, ours in zip(prompts, all_row_logits(engine, prompts), strict=True):
        assert rel_err(ours, _ref_logits(ref, prompt)) < BF16_REL


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_flashinfer_greedy_is_reference_argmax(arch: str, checkpoint_dir) -> None:  # type: ignore[no-untyped-def]
    d = checkpoint_dir(arch, **GPU_SHAPES)
    engine, ref = _engine(d), _reference(d)
    prompts = random_prompts(8, VOCAB, 2, 60, seed=2)
    for prompt, toks in zip(prompts, greedy_generate(engine, prompts, 64), strict=True):
        logits = _ref_logits(ref, prompt + toks)[len(prompt) - 1: -1]  # the rows that chose each token
        chosen = logits[np.arange(len(toks)), toks]
        margin = logits.max(axis=1) - chosen
        assert margin.max() < 0.05 * np.abs(logits).max(), f"a token was not the reference argmax: {margin.max()}"


def test_flashinfer_matches_torch_ref_on_cuda(checkpoint_dir) -> None:  # type: ignore[no-untyped-def]
    d = checkpoint_dir("qwen3", **GPU_SHAPES)
    fi = _engine(d)
    tr = make_engine(d, device="cuda:0", activation_dtype="bfloat16", attention_backend="torch_ref",
                     max_num_kv_pages=2048)
    prompts = random_prompts(5, VOCAB, 1, 70, seed=3)
    for a, b in zip(all_row_logits(fi, prompts), all_row_logits(tr, prompts), strict=True):
        assert rel_err(a, b) < 1e-2


def test_flashinfer_page_sizes_agree(checkpoint_dir) -> None:  # type: ignore[no-untyped-def]
    d = checkpoint_dir("llama", **GPU_SHAPES)
    prompts = random_prompts(4, VOCAB, 1, 70, seed=4)
    results = [all_row_logits(_engine(d, kv_page_size=ps), prompts) for ps in (1, 16, 32)]
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert rel_err(b, a) < 1e-2


def test_flashinfer_custom_masks(checkpoint_dir) -> None:  # type: ignore[no-untyped-def]
    """A causal custom mask gives the causal result; a window mask matches torch_ref's window."""
    d = checkpoint_dir("qwen3", **GPU_SHAPES)
    fi = _engine(d)
    tr = make_engine(d, device="cuda:0", activation_dtype="bfloat16", attention_backend="torch_ref",
                     max_num_kv_pages=2048)
    prompt = random_prompts(1, VOCAB, 40, 40, seed=5)[0]
    n, window = len(prompt), 7
    causal = [brle.encode(np.arange(n) <= r) for r in range(n)]
    windowed = [brle.encode((np.arange(n) <= r) & (np.arange(n) > r - window)) for r in range(n)]

    def run(engine, masks):  # type: ignore[no-untyped-def]
        req = SeqPager(engine).request(0, prompt, [OutputSpec(j, probe=Probe("logits")) for j in range(n)],
                                       attention_mask=masks)
        return np.stack([logits_of(v) for v in engine.forward_batch(ForwardBatch([req])).outputs[0]])  # type: ignore[arg-type]

    plain = all_row_logits(fi, [prompt])[0]
    assert rel_err(run(fi, causal), plain) < 1e-2
    assert rel_err(run(fi, windowed), run(tr, windowed)) < 1e-2


def test_flashinfer_gemma4_image_masks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Gemma 4's image rows attend both ways on its sliding layers only (`BatchLayout.window_masks`):
    FlashInfer's masked prefill gives torch_ref's logits on every row, for an image request batched with
    a causal one."""
    from vision_support import engine_greedy, gemma4_checkpoint, image_prompt, png

    d = gemma4_checkpoint(tmp_path / "gemma4", hidden_size=256, head_dim=64, global_head_dim=64)
    fi, tr = _engine(d, max_num_embeds=256), make_engine(
        d, device="cuda:0", activation_dtype="bfloat16", attention_backend="torch_ref", max_num_kv_pages=2048,
        max_num_embeds=256)
    text = random_prompts(1, VOCAB - 8, 30, 30, seed=6)[0]

    def rows(engine):  # type: ignore[no-untyped-def]
        tokens, placed = image_prompt(engine, [png(1)], [[5, 6, 7, 8, 9, 10, 11, 12, 13], [7, 8, 9]])
        pager = SeqPager(engine)
        reqs = [pager.request(0, tokens, [OutputSpec(j, probe=Probe("logits")) for j in range(len(tokens))],
                              images=placed),
                pager.request(1, text, [OutputSpec(j, probe=Probe("logits")) for j in range(len(text))])]
        out = engine.forward_batch(ForwardBatch(reqs)).outputs
        return [np.stack([logits_of(v) for v in o]) for o in out], engine_greedy(engine, tokens, placed, 4)[0]  # type: ignore[arg-type]

    (fi_image, fi_text), fi_tokens = rows(fi)
    (tr_image, tr_text), tr_tokens = rows(tr)
    assert rel_err(fi_image, tr_image) < 1e-2 and rel_err(fi_text, tr_text) < 1e-2
    assert len(fi_tokens) == len(tr_tokens) == 4
