"""Tiny random Hugging Face checkpoints, built with transformers' own config classes.

Real files (config.json, model.safetensors, tokenizer.json, tokenizer_config.json
with a chat template) written by `save_pretrained`; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pie.tiny_model import write_tokenizer_files

VOCAB = 512

# Small shapes shared by every family; each entry only adds what the family needs.
_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

ARCHS: dict[str, dict[str, Any]] = {
    "llama": {"head_dim": 16, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024}},
    "qwen2": {},
    "qwen3": {"head_dim": 16, "tie_word_embeddings": True},
    # Windows (8-10) shorter than prompt + generation, so the sliding layers really slide in the tests.
    "mistral": {"head_dim": 16, "sliding_window": 10},
    "ministral": {"head_dim": 16, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
    "qwen2:sliding": {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
    "qwen3:sliding": {"head_dim": 16, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
    # Partial rotary + LongRoPE whose short/long switch (16) falls inside a 32-token generation.
    "phi3": {"partial_rotary_factor": 0.5, "sliding_window": 12, "original_max_position_embeddings": 16,
             "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6],
                              "long_factor": [1.5, 2.0, 3.0, 4.0]}},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 10},
    "qwen3_moe": {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "norm_topk_prob": True, "mlp_only_layers": [1]},
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 8,
               "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0},
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 8,
                    "layer_types": ["sliding_attention", "full_attention"], "rope_parameters": {
                        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0}}},
    "olmo3": {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"], "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 500_000.0},
        "full_attention": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                           "rope_theta": 500_000.0}}},
    # Ministral 3's query temperature steps at positions 4, 8, ... (original_max 4).
    "ministral3": {"head_dim": 16, "max_position_embeddings": 16, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 1_000_000.0, "factor": 4.0, "original_max_position_embeddings": 4,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1}},
    # E2B-like: per-layer embeddings, wider global heads, the last two layers reuse the first two's KV.
    "gemma4_text": {"head_dim": 16, "global_head_dim": 32, "sliding_window": 8, "num_kv_shared_layers": 2,
                    "num_hidden_layers": 4, "layer_types": ["sliding_attention", "full_attention"] * 2,
                    "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": VOCAB,
                    "use_double_wide_mlp": True, "final_logit_softcapping": 3.0, "tie_word_embeddings": True},
    # 26B-A4B-like: an MoE block beside the MLP, K = V on global layers with a single kv head.
    "gemma4_text:moe": {"head_dim": 16, "global_head_dim": 32, "sliding_window": 8,
                        "layer_types": ["sliding_attention", "full_attention"], "hidden_size_per_layer_input": 0,
                        "enable_moe_block": True, "num_experts": 4, "top_k_experts": 2,
                        "moe_intermediate_size": 32, "attention_k_eq_v": True, "num_global_key_value_heads": 1},
    "gpt_oss": {"head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 8,
                "rope_parameters": {"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                    "truncate": False, "original_max_position_embeddings": 512,
                                    "rope_theta": 150_000.0}},
    # Hybrids: three Gated DeltaNet layers to one gated full-attention layer, grouped values (4 v heads on 2 k heads).
    "qwen3_5_text": {"head_dim": 16, "num_hidden_layers": 4, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                     "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_conv_kernel_dim": 4},
    # The same hybrid with grouped fused projections and a shared-expert MoE; layer 1 keeps a dense MLP.
    "qwen3_next": {"head_dim": 16, "num_hidden_layers": 4, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                   "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_conv_kernel_dim": 4,
                   "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "shared_expert_intermediate_size": 48, "norm_topk_prob": True, "mlp_only_layers": [1]},
    "qwen3_5_moe_text": {"head_dim": 16, "num_hidden_layers": 4, "linear_num_key_heads": 2,
                         "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
                         "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                         "shared_expert_intermediate_size": 48},
    # Mamba-2 on the same state pool: 2 Mamba blocks (4 heads of 8, 2 groups, state 8), attention, MLPs;
    # chunk 16, so the longer prompts span several SSD chunks.
    "nemotron_h": {"head_dim": 16, "num_hidden_layers": 5, "layers_block_type": [
        "linear_attention", "mlp", "linear_attention", "full_attention", "mlp"], "mamba_num_heads": 4,
        "mamba_head_dim": 8, "n_groups": 2, "ssm_state_size": 8, "chunk_size": 16},
}


# Image-text checkpoints; pie runs their text part. name -> (ARCHS entry of the text config, wrapper extras).
_PIXTRAL = {"model_type": "pixtral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "head_dim": 16, "image_size": 32, "patch_size": 8}
_SIGLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
           "image_size": 32, "patch_size": 8}
_GEMMA4_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                  "num_key_value_heads": 2, "head_dim": 16}
_QWEN3_5_VISION = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                   "patch_size": 8, "num_position_embeddings": 16}
WRAPPERS: dict[str, tuple[str, dict[str, Any]]] = {
    "mistral3": ("ministral3", {"vision_config": _PIXTRAL}),
    "mistral3:mistral": ("mistral", {"vision_config": _PIXTRAL}),
    "gemma3": ("gemma3_text", {"vision_config": _SIGLIP, "mm_tokens_per_image": 4}),
    "gemma4": ("gemma4_text", {"vision_config": _GEMMA4_VISION, "audio_config": None}),
    "qwen3_5": ("qwen3_5_text", {"vision_config": _QWEN3_5_VISION}),
    "qwen3_5_moe": ("qwen3_5_moe_text", {"vision_config": _QWEN3_5_VISION}),
}


def config_for(arch: str, **overrides: Any) -> Any:
    """`arch` is a model_type, optionally with a ":variant" suffix naming another ARCHS / WRAPPERS entry."""
    from transformers import AutoConfig

    model_type = arch.split(":")[0]
    if arch in WRAPPERS:
        text_arch, extras = WRAPPERS[arch]
        text = {**_COMMON, **ARCHS[text_arch], **overrides, "model_type": text_arch.split(":")[0]}
        return AutoConfig.for_model(model_type, text_config=text, tie_word_embeddings=text["tie_word_embeddings"],
                                    **extras)
    values = {**_COMMON, **ARCHS.get(arch, {}), **overrides}
    return AutoConfig.for_model(model_type, **values)


def _auto_class(arch: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if arch in WRAPPERS else AutoModelForCausalLM


def tiny_checkpoint(directory: Path, model_type: str = "qwen3", *, seed: int = 0,
                    dtype: torch.dtype = torch.float32, **overrides: Any) -> Path:
    """Write a random checkpoint of `model_type` (an ARCHS or WRAPPERS name) into `directory` and return it."""
    config = config_for(model_type, **overrides)
    torch.manual_seed(seed)
    model = _auto_class(model_type).from_config(config, dtype=dtype)
    # Random init leaves norms at 1 and some biases at 0; perturb so the test sees them.
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory, safe_serialization=True)
    write_tokenizer_files(directory, VOCAB)
    return directory


def load_reference(directory: Path, dtype: torch.dtype = torch.float32) -> Any:
    """The checkpoint through transformers (eager attention), for comparisons."""
    import json

    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    model_type = json.loads((directory / "config.json").read_text())["model_type"]
    cls = AutoModelForImageTextToText if model_type in WRAPPERS else AutoModelForCausalLM
    return cls.from_pretrained(directory, dtype=dtype, attn_implementation="eager").eval()
