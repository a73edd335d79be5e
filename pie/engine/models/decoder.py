"""The dense decoder-only transformer shared by the Llama, Qwen 2 and Qwen 3 families.

Module names mirror Hugging Face's (`model.layers.N.self_attn...`) so the
checkpoint maps onto parameters by name; fused projections (qkv, gate_up) are
declared in `packed_modules_mapping`. Families subclass `CausalLM` and
override `decoder_spec` (config -> shapes and switches) and, where their math
differs, the small hook methods.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from pie.engine.attention.base import AttentionLayerSpec
from pie.engine.forward_context import ForwardContext
from pie.engine.layers.linear import Linear
from pie.engine.layers.mlp import GatedMLP
from pie.engine.layers.norm import RMSNorm
from pie.engine.layers.rotary import Rotary, apply_rotary, rope_inv_freq


@dataclass(frozen=True)
class DecoderSpec:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf(cls, c: Any, **overrides: Any) -> DecoderSpec:
        values = {
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size,
            "num_layers": c.num_hidden_layers,
            "num_heads": c.num_attention_heads,
            "num_kv_heads": getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            "intermediate_size": c.intermediate_size,
            "rms_norm_eps": c.rms_norm_eps,
            "hidden_act": getattr(c, "hidden_act", "silu"),
            "tie_word_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
        }
        values.update(overrides)
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


class Attention(nn.Module):
    """QKV projection (+ optional per-head q/k RMSNorm) -> RoPE -> paged attention -> O projection."""

    def __init__(self, spec: DecoderSpec, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.qkv_proj = Linear(spec.hidden_size, q_size + 2 * kv_size, bias=spec.qkv_bias,
                               shard_sizes=[q_size, kv_size, kv_size])
        self.o_proj = Linear(q_size, spec.hidden_size, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
        self.qk_norm = spec.qk_norm

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], fwd: ForwardContext) -> torch.Tensor:
        t = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        o = fwd.attention(self.layer_idx, q, k, v)  # [t, heads, head_dim]
        return self.o_proj(o.reshape(t, q_size))


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, layer_idx)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = GatedMLP(spec.hidden_size, spec.intermediate_size, spec.hidden_act, bias=spec.mlp_bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], fwd: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, fwd)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, spec: DecoderSpec, layer_cls: type[nn.Module] = DecoderLayer) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList([layer_cls(spec, i) for i in range(spec.num_layers)])
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class CausalLM(nn.Module):
    """A decoder with an LM head; the unit the engine loads, plans attention for and runs."""

    # checkpoint sub-name -> (fused parameter sub-name, shard index)
    packed_modules_mapping: ClassVar[dict[str, tuple[str, int]]] = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    # regexes of checkpoint tensors that are legitimately present but unused
    ignored_checkpoint_keys: ClassVar[tuple[str, ...]] = (r"\.rotary_emb\.inv_freq$",)
    layer_cls: ClassVar[type[nn.Module]] = DecoderLayer

    def __init__(self, hf_config: Any) -> None:
        super().__init__()
        self.hf_config = hf_config
        self.spec = self.decoder_spec(hf_config)
        self.model = DecoderModel(self.spec, self.layer_cls)
        if not self.spec.tie_word_embeddings:
            self.lm_head = Linear(self.spec.hidden_size, self.spec.vocab_size)
        self.rotary: Rotary | None = None

    @classmethod
    def decoder_spec(cls, hf_config: Any) -> DecoderSpec:
        return DecoderSpec.from_hf(hf_config)

    def load_custom_weight(self, name: str, tensor: torch.Tensor) -> list[tuple[str, int | None]] | None:
        """Hook for checkpoint tensors that need more than a name mapping (e.g. packed MoE experts).

        Return the (parameter, shard) slots filled, or None to use the default by-name loading.
        """
        return None

    def attention_layer_specs(self) -> list[AttentionLayerSpec]:
        scale = self.spec.head_dim ** -0.5
        return [AttentionLayerSpec(scale=scale) for _ in range(self.spec.num_layers)]

    def prepare(self, device: torch.device) -> None:
        """Build the non-checkpoint state (RoPE tables) once the weights are on `device`."""
        self.rotary = Rotary(*rope_inv_freq(self.hf_config, device))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, fwd: ForwardContext) -> torch.Tensor:
        """input_ids: [num_tokens] -> final hidden states [num_tokens, hidden] (after the last norm)."""
        assert self.rotary is not None, "prepare() must run before forward"
        x = self.embed(input_ids)
        rope = self.rotary.cos_sin(fwd.positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, rope, fwd)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [n, hidden] -> float32 logits [n, vocab]."""
        weight = self.model.embed_tokens.weight if self.spec.tie_word_embeddings else self.lm_head.weight
        return torch.matmul(hidden, weight.t()).float()
