"""bf16 on the CPU: which dtype `auto` picks there, and that the bf16 path (torch_ref attention upcast to
float32) stays within bf16 tolerance of transformers in float32 and picks its argmax tokens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import VOCAB, load_reference
from engine_helpers import all_row_logits, greedy_generate, make_engine, random_prompts, rel_err

import pie.engine.device as device_mod
from pie.engine.device import resolve_activation_dtype

BF16_REL = 3e-2  # as the GPU bf16 tests


def bf16_checkpoint(checkpoint_dir, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    """The tiny qwen3 checkpoint, declared bf16 (weights cast), in a folder of its own."""
    from safetensors.torch import load_file, save_file

    src = checkpoint_dir("qwen3")
    dst = tmp_path / "qwen3-bf16"
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            save_file({k: v.to(torch.bfloat16) for k, v in load_file(f).items()}, dst / f.name,
                      metadata={"format": "pt"})
        elif f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((dst / "config.json").read_text())
    cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(("fast", "checkpoint", "expected"), [
    (True, "bfloat16", torch.bfloat16), (False, "bfloat16", torch.float32),
    (True, "float32", torch.float32), (True, "float16", torch.float32),
])
def test_auto_on_cpu_is_bf16_only_for_bf16_checkpoints_on_bf16_hardware(monkeypatch: pytest.MonkeyPatch,
                                                                       fast: bool, checkpoint: str,
                                                                       expected: torch.dtype) -> None:
    monkeypatch.setattr(device_mod, "cpu_has_fast_bf16", lambda: fast)
    config = type("Config", (), {"torch_dtype": checkpoint})()
    assert resolve_activation_dtype("auto", config, torch.device("cpu")) == expected
    assert resolve_activation_dtype("float32", config, torch.device("cpu")) == torch.float32  # asked for


def test_bf16_on_cpu_matches_transformers_within_bf16_tolerance(checkpoint_dir, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = bf16_checkpoint(checkpoint_dir, tmp_path)
    engine = make_engine(d, activation_dtype="bfloat16", kv_page_size=4)
    assert engine.dtype == torch.bfloat16 and engine.info.attention_backend == "torch_ref"
    ref = load_reference(d)  # float32, from the same bf16 weights
    prompts = random_prompts(4, VOCAB, 2, 40, seed=11)
    for prompt, ours in zip(prompts, all_row_logits(engine, prompts), strict=True):
        with torch.no_grad():
            expected = ref(input_ids=torch.tensor([prompt])).logits[0].float().numpy()
        assert rel_err(ours, expected) < BF16_REL
    for prompt, toks in zip(prompts, greedy_generate(engine, prompts, 24), strict=True):
        with torch.no_grad():
            logits = ref(input_ids=torch.tensor([prompt + toks])).logits[0].float().numpy()
        rows = logits[len(prompt) - 1: -1]  # the rows that chose each token
        margin = rows.max(axis=1) - rows[np.arange(len(toks)), toks]
        assert margin.max() < 0.05 * np.abs(rows).max(), f"a token was not the reference argmax: {margin.max()}"


def test_one_query_attention_equals_sdpa_with_grouped_heads_and_padding() -> None:
    """The bf16 decode path's math (grouped-query matmuls, float32 softmax) against PyTorch's SDPA."""
    import torch.nn.functional as F

    from pie.engine.attention.torch_ref import _attend_one_query

    gen = torch.Generator().manual_seed(0)
    n, heads, kv_heads, slots, dim = 5, 8, 2, 40, 16
    q = torch.randn(n, heads, 1, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(n, slots, kv_heads, dim, generator=gen, dtype=torch.float64).transpose(1, 2)  # strided
    v = torch.randn(n, slots, kv_heads, dim, generator=gen, dtype=torch.float64).transpose(1, 2)
    lens = torch.tensor([1, 7, 40, 23, 16])
    mask = (torch.arange(slots)[None, :] < lens[:, None])[:, None, None, :]  # [n, 1, 1, slots]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    assert torch.allclose(_attend_one_query(q, k, v, mask, 0.3).double(), expected, atol=1e-6)
