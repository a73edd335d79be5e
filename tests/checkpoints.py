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
}


def config_for(model_type: str, **overrides: Any) -> Any:
    from transformers import AutoConfig

    values = {**_COMMON, **ARCHS.get(model_type, {}), **overrides}
    return AutoConfig.for_model(model_type, **values)


def tiny_checkpoint(directory: Path, model_type: str = "qwen3", *, seed: int = 0,
                    dtype: torch.dtype = torch.float32, **overrides: Any) -> Path:
    """Write a random checkpoint of `model_type` into `directory` and return it."""
    from transformers import AutoModelForCausalLM

    config = config_for(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random init leaves norms at 1 and some biases at 0; perturb so the test sees them.
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory, safe_serialization=True)
    write_tokenizer_files(directory, VOCAB)
    return directory


def load_reference(directory: Path, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="eager").eval()
