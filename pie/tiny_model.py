"""The built-in tiny model `pie/tiny-random`: a real checkpoint with random weights.

It exists so that `pie run`, the installer and CI can exercise the whole stack
with no network. Everything is generated deterministically (a fixed corpus for
the tokenizer, a fixed numpy seed for the weights), so two machines produce
byte-identical files. The architecture is qwen3 (q/k norm, tied embeddings),
the default model's family.

Also used by the tests to build tokenizers for their own tiny checkpoints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

TINY_MODEL_ID = "pie/tiny-random"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, the format of the Qwen family, as a Hugging Face chat template.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_WORDS = (
    "the of and to in is was that for on it with as by at from his an were are which this be "
    "or have had one not but all they can there been if more when will would who so no she "
    "other its may these two what their time some her than into only first could new also "
    "after any many over such most made like where through between much before long years "
    "world people way work state life water number part well day place system program model "
    "token page cache batch forward sample context fork prompt answer question reason think "
    "tool call json value list string true false null agent search tree beam draft verify "
    "hello pie inferlet engine server client user assistant system message text story cat dog"
).split()


def _corpus() -> list[str]:
    """A fixed pseudo-English corpus: enough to train a small byte-level BPE deterministically."""
    rng = np.random.default_rng(1234)
    lines = []
    for _ in range(400):
        n = int(rng.integers(5, 20))
        words = [_WORDS[int(i)] for i in rng.integers(0, len(_WORDS), n)]
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]))
    lines += ['{"name": "pie", "value": 42, "items": [1, 2, 3], "ok": true}', "0123456789 +-*/=()[]{}<>"]
    return lines


def build_tokenizer(vocab_size: int = 512) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` with ChatML special tokens (ids 0..2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def write_tokenizer_files(directory: Path, vocab_size: int = 512) -> int:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json; return the vocab size."""
    tok = build_tokenizer(vocab_size)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "chat_template": CHATML_TEMPLATE,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return int(tok.get_vocab_size())


TINY_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "torch_dtype": "float32",
    "bos_token_id": 0,
    "eos_token_id": 2,
}


def _tiny_weights(cfg: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nq, nkv, v = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    out = {"model.embed_tokens.weight": w(v, h), "model.norm.weight": np.ones(h, np.float32)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out |= {
            p + "input_layernorm.weight": np.ones(h, np.float32),
            p + "post_attention_layernorm.weight": np.ones(h, np.float32),
            p + "self_attn.q_proj.weight": w(nq * d, h),
            p + "self_attn.k_proj.weight": w(nkv * d, h),
            p + "self_attn.v_proj.weight": w(nkv * d, h),
            p + "self_attn.o_proj.weight": w(h, nq * d),
            p + "self_attn.q_norm.weight": np.ones(d, np.float32),
            p + "self_attn.k_norm.weight": np.ones(d, np.float32),
            p + "mlp.gate_proj.weight": w(i, h),
            p + "mlp.up_proj.weight": w(i, h),
            p + "mlp.down_proj.weight": w(h, i),
        }
    return out


def tiny_model_dir(home: Path | None = None) -> Path:
    """Where the built-in model lives: $PIE_HOME/models/pie/tiny-random."""
    base = home or Path(os.environ.get("PIE_HOME", Path.home() / ".pie"))
    return base / "models" / TINY_MODEL_ID


def ensure_tiny_model(home: Path | None = None) -> Path:
    """Generate the built-in model on first use; return its directory. Safe to call concurrently."""
    from safetensors.numpy import save_file

    target = tiny_model_dir(home)
    if (target / "model.safetensors").exists():
        return target
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    vocab = write_tokenizer_files(tmp)
    cfg = dict(TINY_CONFIG, vocab_size=vocab)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = {"eos_token_id": [2, 0], "pad_token_id": 0, "do_sample": False}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    save_file(_tiny_weights(cfg, np.random.default_rng(0)), str(tmp / "model.safetensors"))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; its files are identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target
