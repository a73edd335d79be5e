"""Which families the engine runs, why the others are refused, and checkpoint formats beyond plain tensors."""

from __future__ import annotations

import json

import numpy as np
import torch
from checkpoints import VOCAB, tiny_checkpoint
from engine_helpers import all_row_logits, make_engine, random_prompts, rel_err

from pie.engine.models.registry import (
    get_architecture,
    known_unsupported_model_types,
    supported_model_types,
    unsupported_reason,
)

SEED_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "mixtral", "gemma2", "gemma3_text", "gemma3",
                 "gemma4_text", "gemma4", "mistral3", "olmo3", "gpt_oss", "gptoss", "qwen3_moe"]


def test_every_seed_family_is_supported() -> None:
    supported = supported_model_types()
    assert set(SEED_FAMILIES) <= set(supported)
    for model_type in SEED_FAMILIES:
        assert unsupported_reason(model_type) is None
        assert get_architecture(model_type).__name__


def test_hybrid_families_are_served() -> None:
    """Qwen 3.5 / Qwen3-Next / Nemotron-H run on the state pool (tests/test_engine_hybrid.py); none is refused."""
    for model_type in ("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next", "nemotron_h"):
        assert unsupported_reason(model_type) is None
        assert model_type not in known_unsupported_model_types()


def test_unknown_model_type_lists_the_supported_ones() -> None:
    reason = unsupported_reason("frobnicator")
    assert reason is not None and "gemma4" in reason and "gpt_oss" in reason


def _pack_mxfp4(codes: torch.Tensor, exps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP4 codes [E, rows, cols] and power-of-two exponents [E, rows, cols/32] -> checkpoint blocks / scales.

    blocks [E, rows, cols/32, 16] uint8 hold two codes a byte (even column in the low nibble); scales
    are the exponents biased by 127, as in OpenAI's GPT-OSS releases.
    """
    e, rows, cols = codes.shape
    groups = codes.reshape(e, rows, cols // 32, 32)
    blocks = (groups[..., 0::2] | (groups[..., 1::2] << 4)).to(torch.uint8)
    return blocks, (exps + 127).to(torch.uint8)


def test_gpt_oss_mxfp4_experts_load_like_the_dequantized_tensors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """OpenAI's checkpoints store experts as MXFP4 blocks + scales; they must give the same model."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import FP4_VALUES

    dense_dir = tiny_checkpoint(tmp_path / "dense", "gpt_oss", seed=3, hidden_size=64, intermediate_size=64)
    tensors = load_file(str(dense_dir / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    lut = torch.tensor(FP4_VALUES)
    quant = dict(tensors)
    for name in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        e, a, b = tensors[name].shape  # stored [E, in, out]; MXFP4 groups run along `in`
        codes = torch.randint(0, 16, (e, b, a), generator=gen)
        exps = torch.randint(-7, -4, (e, b, a // 32), generator=gen)
        w = (lut[codes].reshape(e, b, a // 32, 32) * torch.exp2(exps.float())[..., None]).reshape(e, b, a)
        tensors[name] = w.transpose(1, 2).contiguous()  # the dense checkpoint: [E, in, out]
        del quant[name]
        quant[name + "_blocks"], quant[name + "_scales"] = _pack_mxfp4(codes, exps)
    save_file(tensors, str(dense_dir / "model.safetensors"))
    quant_dir = tmp_path / "mxfp4"
    quant_dir.mkdir()
    save_file(quant, str(quant_dir / "model.safetensors"))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (quant_dir / f).write_text((dense_dir / f).read_text())
    assert "experts.gate_up_proj_blocks" in json.dumps(list(quant))
    prompts = random_prompts(2, VOCAB, 4, 12, seed=4)
    dense = all_row_logits(make_engine(dense_dir), prompts)
    mxfp4 = all_row_logits(make_engine(quant_dir), prompts)
    for a, b in zip(dense, mxfp4, strict=True):
        assert rel_err(b, a) < 1e-6
        assert np.abs(a).max() > 0
