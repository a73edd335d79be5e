"""Quantized weights: kernels equal their dequantized reference; model error stays within documented bounds.

Documented bounds (docs/quantization.md), measured on a random qwen3 checkpoint (hidden 256, 2 layers)
against float32: int8 max logit error 1.6e-2, float8 5.9e-2, int4 (group 128) 2.4e-1; greedy
agreement over 32 tokens on 8 fixed prompts: int8 100%, float8 100%, int4 88%.
"""

from __future__ import annotations

import pytest
import torch
from checkpoints import VOCAB
from engine_helpers import all_row_logits, greedy_generate, make_engine, random_prompts, rel_err

from pie.engine.layers.quant import Fp8Weight, Int4Weight, Int8Weight
from pie.errors import ConfigError

SHAPES = {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64}
BOUNDS = {"int8": (0.05, 0.9), "float8": (0.1, 0.9), "int4": (0.4, 0.6)}  # (max logit rel err, greedy agreement)


@pytest.fixture
def weight() -> torch.Tensor:
    return torch.randn(96, 256, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("cls", [Int8Weight, Int4Weight, Fp8Weight])
def test_kernel_equals_dequantized_reference(cls, weight: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    q = cls(weight)
    x = torch.randn(7, 256, generator=torch.Generator().manual_seed(1))
    ref = x @ q.dequantize().t()
    assert rel_err(q.matmul(x).numpy(), ref.numpy()) < 1e-4
    assert q.nbytes < weight.numel() * 4 * q.bits / 32 * 1.2  # really stored at about `bits` per weight


def test_int8_rounding_error_is_half_a_step(weight: torch.Tensor) -> None:
    q = Int8Weight(weight)
    assert ((q.dequantize() - weight).abs() <= q.scale[:, None] / 2 + 1e-6).all()


def test_int4_groups_and_error(weight: torch.Tensor) -> None:
    q = Int4Weight(weight, group_size=64)
    assert q.group_size == 64 and q.scales_and_zeros.shape == (4, 96, 2)
    step = q.scales_and_zeros[..., 0].t().repeat_interleave(64, dim=1)
    assert ((q.dequantize() - weight).abs() <= step / 2 + 1e-5).all()


@pytest.mark.parametrize("mode", list(BOUNDS))
def test_quantized_model_within_bounds(mode: str, checkpoint_dir, capsys) -> None:  # type: ignore[no-untyped-def]
    d = checkpoint_dir("qwen3", **SHAPES)
    prompts = random_prompts(8, VOCAB, 8, 24, seed=0)
    base, quant = make_engine(d), make_engine(d, weight_dtype=mode)
    err = max(rel_err(a, b) for a, b in zip(all_row_logits(quant, prompts), all_row_logits(base, prompts), strict=True))
    ref, got = greedy_generate(base, prompts, 32), greedy_generate(quant, prompts, 32)
    agree = sum(a == b for r, g in zip(ref, got, strict=True) for a, b in zip(r, g, strict=True)) / (8 * 32)
    with capsys.disabled():
        print(f"\n{mode}: max logit rel err {err:.4f}, greedy agreement over 32 tokens {agree:.0%}")
    max_err, min_agree = BOUNDS[mode]
    assert err < max_err and agree >= min_agree
    proj = quant.model.model.layers[0].self_attn.qkv_proj
    assert proj.qweight is not None and proj.weight.numel() == 0  # the float copy is gone


def test_runtime_fp8_conflicts_with_int_weights(checkpoint_dir) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="runtime_quant = 'fp8'"):
        make_engine(checkpoint_dir("qwen3"), weight_dtype="int8", runtime_quant="fp8")


@pytest.mark.gpu
@pytest.mark.parametrize("mode,runtime", [("int8", ""), ("int4", ""), ("float8", ""), ("bfloat16", "fp8")])
def test_quantized_paths_on_cuda(mode: str, runtime: str, checkpoint_dir) -> None:  # type: ignore[no-untyped-def]
    d = checkpoint_dir("qwen3", hidden_size=256, intermediate_size=512, head_dim=64, num_attention_heads=4,
                       num_key_value_heads=2)
    kw = {"device": "cuda:0", "activation_dtype": "bfloat16", "max_num_kv_pages": 1024}
    prompts = random_prompts(6, VOCAB, 8, 40, seed=3)
    base = all_row_logits(make_engine(d, **kw), prompts)
    quant_engine = make_engine(d, weight_dtype=mode, runtime_quant=runtime, **kw)
    quant = all_row_logits(quant_engine, prompts)
    limit = BOUNDS["int4" if mode == "int4" else "float8"][0]
    assert max(rel_err(a, b) for a, b in zip(quant, base, strict=True)) < limit
    qw = quant_engine.model.model.layers[0].mlp.gate_up_proj.qweight
    x = torch.randn(5, 256, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ qw.dequantize().float().t()
    assert rel_err(qw.matmul(x).float().cpu().numpy(), ref.cpu().numpy()) < 3e-2
