"""The engine against transformers on the same weights: logits, greedy tokens, pages, masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checkpoints import VOCAB, load_reference
from engine_helpers import (
    SeqPager,
    all_row_logits,
    greedy_generate,
    hf_greedy,
    hf_logits,
    logits_of,
    make_engine,
    random_prompts,
    rel_err,
)

from pie.engine import brle
from pie.engine.batch import ForwardBatch, OutputSpec, Probe, Sampler

ARCHS = ["llama", "qwen2", "qwen3"]


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_logits_match_transformers(arch: str, checkpoint_dir) -> None:  # type: ignore[no-untyped-def]
    d = checkpoint_dir(arch)
    engine, ref = make_engine(d), load_reference(d)
    prompts = random_prompts(5, VOCAB, 1, 40, seed=1)
    for prompt, ours in zip(prompts, all_row_logits(engine, prompts), strict=True):
        assert rel_err(ours, hf_logits(ref, prompt)) < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_64_tokens_batch_of_8_matches_transformers(arch: str, checkpoint_dir) -> None:  # type: ignore[no-untyped-def]
    d = checkpoint_dir(arch)
    engine, ref = make_engine(d), load_reference(d)
    prompts = random_prompts(8, VOCAB, 2, 30, seed=2)
    ours = greedy_generate(engine, prompts, 64)
    for prompt, toks in zip(prompts, ours, strict=True):
        assert toks == hf_greedy(ref, prompt, 64)


def test_page_sizes_give_the_same_logits(checkpoint_dir) -> None:  # type: ignore[no-untyped-def]
    d = checkpoint_dir("qwen3")
    prompts = random_prompts(4, VOCAB, 1, 70, seed=3)
    results = [all_row_logits(make_engine(d, kv_page_size=ps, max_num_kv_pages=1024), prompts) for ps in (1, 16, 32)]
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert rel_err(b, a) < 1e-5


def test_decode_after_prefill_in_chunks_matches_single_prefill(checkpoint_dir) -> None:  # type: ignore[no-untyped-def]
    """A prompt fed in three passes (as the runtime chunks long prefills) gives the same logits."""
    d = checkpoint_dir("llama")
    engine = make_engine(d, kv_page_size=4)
    prompt = random_prompts(1, VOCAB, 37, 37, seed=4)[0]
    whole = all_row_logits(engine, [prompt])[0][-1]
    pager = SeqPager(engine)
    for chunk in (prompt[:10], prompt[10:30]):
        engine.forward_batch(ForwardBatch([pager.request(0, chunk, [])]))
    last = pager.request(0, prompt[30:], [OutputSpec(6, probe=Probe("logits"))])
    chunked = logits_of(engine.forward_batch(ForwardBatch([last])).outputs[0][0])  # type: ignore[arg-type]
    assert rel_err(chunked, whole) < 1e-5


def test_custom_mask_equal_to_causal_gives_causal_result(checkpoint_dir) -> None:  # type: ignore[no-untyped-def]
    d = checkpoint_dir("qwen3")
    engine = make_engine(d)
    prompts = random_prompts(3, VOCAB, 5, 25, seed=5)
    causal = all_row_logits(engine, prompts)
    pager = SeqPager(engine)
    reqs = []
    for i, p in enumerate(prompts):
        n = len(p)
        masks = [brle.encode(np.arange(n) <= row) for row in range(n)]
        reqs.append(pager.request(i, p, [OutputSpec(j, probe=Probe("logits")) for j in range(n)],
                                  attention_mask=masks))
    outs = engine.forward_batch(ForwardBatch(reqs)).outputs
    for ref, out in zip(causal, outs, strict=True):
        assert rel_err(np.stack([logits_of(v) for v in out]), ref) < 1e-5  # type: ignore[arg-type]


def test_sliding_window_mask_matches_dense_reference(checkpoint_dir) -> None:  # type: ignore[no-untyped-def]
    """BRLE window masks (attend to the last W slots) equal transformers' own sliding-window attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    window = 6
    d = checkpoint_dir("qwen2")
    cfg = AutoConfig.from_pretrained(d, use_sliding_window=True, sliding_window=window, max_window_layers=0,
                                     layer_types=["sliding_attention"] * 2)
    ref = AutoModelForCausalLM.from_pretrained(d, config=cfg, attn_implementation="eager").eval()
    assert set(ref.config.layer_types) == {"sliding_attention"}
    engine = make_engine(d, kv_page_size=4)
    prompt = random_prompts(1, VOCAB, 30, 30, seed=6)[0]
    n = len(prompt)
    masks = [brle.encode((np.arange(n) <= row) & (np.arange(n) > row - window)) for row in range(n)]
    req = SeqPager(engine).request(0, prompt, [OutputSpec(j, probe=Probe("logits")) for j in range(n)],
                                   attention_mask=masks)
    out = engine.forward_batch(ForwardBatch([req])).outputs[0]
    ours = np.stack([logits_of(v) for v in out])  # type: ignore[arg-type]
    assert rel_err(ours, hf_logits(ref, prompt)) < 1e-4
    assert rel_err(ours, all_row_logits(engine, [prompt])[0]) > 1e-3  # the window really changed something


def test_mixed_prefill_and_decode_in_one_batch(checkpoint_dir) -> None:  # type: ignore[no-untyped-def]
    """Decode rows of running sequences and a new prefill share one batch without interfering."""
    d = checkpoint_dir("qwen3")
    engine, ref = make_engine(d), load_reference(d)
    a, b = random_prompts(2, VOCAB, 12, 20, seed=7)
    pager = SeqPager(engine)
    first = engine.forward_batch(ForwardBatch([pager.request(0, a, [OutputSpec(len(a) - 1, probe=Probe("logits"))])]))
    tok = int(np.argmax(logits_of(first.outputs[0][0])))  # type: ignore[arg-type]
    mixed = engine.forward_batch(ForwardBatch([
        pager.request(1, b, [OutputSpec(len(b) - 1, probe=Probe("logits"))]),
        pager.request(0, [tok], [OutputSpec(0, probe=Probe("logits"))]),
    ]))
    assert rel_err(logits_of(mixed.outputs[0][0]), hf_logits(ref, b)[-1]) < 1e-4  # type: ignore[arg-type]
    assert rel_err(logits_of(mixed.outputs[1][0]), hf_logits(ref, [*a, tok])[-1]) < 1e-4  # type: ignore[arg-type]


def test_sharded_checkpoint_with_index_loads(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from checkpoints import config_for
    from transformers import AutoModelForCausalLM

    from pie.tiny_model import write_tokenizer_files

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_for("llama"))
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    write_tokenizer_files(tmp_path, VOCAB)
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    prompt = [5, 9, 13, 200]
    ours = all_row_logits(make_engine(tmp_path), [prompt])[0]
    assert rel_err(ours, hf_logits(load_reference(tmp_path), prompt)) < 1e-4


@pytest.mark.parametrize("paged", [False, True])
def test_decode_rows_of_mixed_lengths_match_each_row_alone(paged: bool, checkpoint_dir) -> None:  # type: ignore[no-untyped-def]
    """torch_ref cuts a decode batch into groups of similar kv length (paged=False) or sends it to the CPU
    paged kernel in one call (paged=True); either way every row equals its own decode."""
    from pie.engine.attention.torch_ref import MIN_GROUP, _length_groups

    pages = np.array([1, 9, 2, 2, 7, 1, 3])
    groups = _length_groups(pages, np.ones(7, np.int64), np.arange(7) + 10, MIN_GROUP)
    assert sorted(np.concatenate(groups).tolist()) == list(range(10, 17)) and len(groups) == 1  # < MIN_GROUP rows
    engine = make_engine(checkpoint_dir("qwen3"), cpu_paged_attention=paged)
    n = MIN_GROUP + 4
    prompts = [[(i * 13 + j * 5) % (VOCAB - 1) + 1 for j in range(4 + i * i // 4)] for i in range(n)]  # 4..94 tokens
    pager = SeqPager(engine)
    engine.forward_batch(ForwardBatch([pager.request(i, p, [OutputSpec(len(p) - 1, Sampler())]) for i, p in enumerate(prompts)]))
    probe = [OutputSpec(0, probe=Probe("logits"))]
    lens = dict(pager.kv_len)
    together = engine.forward_batch(ForwardBatch([pager.request(i, [7], probe) for i in range(n)])).outputs
    if paged:
        assert engine.backend._decode is not None and not engine.backend._decode_groups  # type: ignore[attr-defined]
    else:
        assert len(engine.backend._decode_groups) >= 2  # type: ignore[attr-defined]
    for i in range(n):  # the same pass again, alone: rewrite the same slot
        pager.kv_len[i] = lens[i]
        alone = engine.forward_batch(ForwardBatch([pager.request(i, [7], probe)])).outputs[0]
        assert rel_err(logits_of(together[i][0]), logits_of(alone[0])) < 1e-5  # type: ignore[arg-type]
