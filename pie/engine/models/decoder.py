"""The decoder-only transformer every family is built from.

Module names mirror Hugging Face's (`model.layers.N.self_attn...`) so the
checkpoint maps onto parameters by name; fused projections (qkv, gate_up) are
declared in `packed_modules_mapping`. Families subclass `CausalLM` and
override `decoder_spec` (config -> shapes and switches) and, where their math
differs, the small hooks: `DecoderLayer.make_mlp` / `make_attention`,
`rope_tables` / `ropes`, `batch_extras` (per-batch inputs from the host
layout), `map_checkpoint_name`, `load_custom_weight`, `supports_cuda_graphs`.

Tensor parallelism (`CausalLM(hf_config, tp)`, see `pie.engine.parallel`):
attention runs this rank's heads, the projections and vocabulary are the
sharded layers of `layers/sharded.py` (MoE experts split each expert the same
way, `layers/moe.py`); families with a `tp_refusal` (Gemma 4's per-layer shapes
and inputs, GPT-OSS's sinks) are refused by `check_tensor_parallel`.

What the spec switches cover (one flag each, no per-family copies):
- norms: (1 + w) Gemma RMSNorm, cast before/after the weight multiply;
- layer layout: pre-norm (Llama), sandwich (Gemma: norms before *and* after
  each block), post-norm (OLMo 3: norms after each block only);
- attention: q/k RMSNorm per head or over the whole projection, biases, the
  softmax scale, logit soft-capping, sinks, a sliding window per layer, RoPE
  tables per layer type;
- embeddings scaled by sqrt(hidden), final-logit soft-capping.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Literal, Self

import numpy as np
import torch
from torch import nn

from pie.engine.attention.base import AttentionLayerSpec, BatchLayout
from pie.engine.forward_context import ForwardContext
from pie.engine.layers.linear import dense_linear
from pie.engine.layers.lora import lora_of
from pie.engine.layers.mlp import GatedMLP
from pie.engine.layers.norm import RMSNorm
from pie.engine.layers.rotary import Rotary, apply_rotary, rope_inv_freq
from pie.engine.layers.sharded import (
    ShardedRMSNorm,
    column_linear,
    lm_head,
    row_linear,
    sharded_rms_norms,
    vocab_embedding,
)
from pie.engine.parallel import SINGLE, TPGroup
from pie.engine.state_pool import StateShape
from pie.engine.tensor_source import TensorSource
from pie.errors import ConfigError

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each [T, rotary_dim]
NormLayout = Literal["pre", "sandwich", "post"]
QKNorm = Literal["none", "head", "full"]
DEFAULT_ROPE = "default"


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
    qk_norm: QKNorm = "none"  # per head (Qwen 3, Gemma 3) or over the whole projection (OLMo 3)
    tie_word_embeddings: bool = False
    norm_offset: float = 0.0  # 1.0 for Gemma's (1 + w) RMSNorm
    norm_cast_before_weight: bool = True  # Llama casts to the input dtype before `* w`; Gemma/OLMo after
    norm_layout: NormLayout = "pre"
    attn_scale: float | None = None  # None = head_dim ** -0.5
    attn_softcap: float = 0.0  # Gemma 2 attention-logit soft-capping
    attn_sinks: bool = False  # GPT-OSS per-head sink logits
    layer_windows: tuple[int, ...] = ()  # window_left per layer (-1 = full attention); () = all full
    layer_rope: tuple[str, ...] = ()  # RoPE table key per layer; () = one table for all layers
    embed_scale: bool = False  # Gemma multiplies embeddings by sqrt(hidden_size)
    final_logit_softcap: float = 0.0
    fused_in_checkpoint: bool = False  # Phi-3 stores qkv_proj / gate_up_proj as single tensors
    # Llama-4-style query temperature (Ministral 3): q *= 1 + beta * log(1 + floor(pos / period)); 0 = off
    query_scale_beta: float = 0.0
    query_scale_period: int = 0
    # This rank's tensor-parallel group (set by CausalLM after `check_tensor_parallel`); heads, MLP columns and
    # vocabulary rows are split over it. The shapes above stay the checkpoint's (global) ones.
    tp: TPGroup = field(default=SINGLE, compare=False, repr=False)

    @property
    def num_local_heads(self) -> int:
        return self.num_heads // self.tp.size

    @property
    def kv_replicas(self) -> int:
        """Ranks holding each kv head: 1 when tp divides num_kv_heads, tp / num_kv_heads when tp exceeds it."""
        return max(1, self.tp.size // self.num_kv_heads)

    @property
    def num_kv_layers(self) -> int:
        """Layers with a KV cache: all of them here; hybrids count their full-attention layers only."""
        return self.num_layers

    @property
    def num_local_kv_heads(self) -> int:
        return self.num_kv_heads * self.kv_replicas // self.tp.size

    @classmethod
    def from_hf(cls, c: Any, **overrides: Any) -> Self:
        # Read lazily: heterogeneous configs (Gemma 4) raise on per-layer attributes the overrides replace.
        readers: dict[str, Callable[[], Any]] = {
            "vocab_size": lambda: c.vocab_size,
            "hidden_size": lambda: c.hidden_size,
            "num_layers": lambda: c.num_hidden_layers,
            "num_heads": lambda: c.num_attention_heads,
            "num_kv_heads": lambda: getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            "head_dim": lambda: getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            "intermediate_size": lambda: c.intermediate_size,
            "rms_norm_eps": lambda: c.rms_norm_eps,
            "hidden_act": lambda: getattr(c, "hidden_act", None) or getattr(c, "hidden_activation", "silu"),
            "tie_word_embeddings": lambda: bool(getattr(c, "tie_word_embeddings", False)),
            "layer_windows": lambda: layer_windows(c),
        }
        values = {name: overrides[name] if name in overrides else read() for name, read in readers.items()}
        values.update(overrides)
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    def norm(self, dim: int) -> RMSNorm:
        return RMSNorm(dim, self.rms_norm_eps, offset=self.norm_offset,
                       cast_before_weight=self.norm_cast_before_weight)

    def sharded_norm(self, full_dim: int, replicas: int = 1) -> ShardedRMSNorm:
        """This rank's block of a norm over `full_dim` features split over the ranks."""
        return ShardedRMSNorm(full_dim, self.rms_norm_eps, self.tp, offset=self.norm_offset,
                              cast_before_weight=self.norm_cast_before_weight, replicas=replicas)

    def tp_splits(self) -> list[tuple[int, str]]:
        """(size, config key) of every dimension split over the tensor-parallel ranks (kv heads: see check)."""
        return [(self.num_heads, "num_attention_heads"), (self.intermediate_size, "intermediate_size")]

    def window(self, layer_idx: int) -> int:
        return self.layer_windows[layer_idx] if self.layer_windows else -1

    def rope_key(self, layer_idx: int) -> str:
        return self.layer_rope[layer_idx] if self.layer_rope else DEFAULT_ROPE


def layer_windows(c: Any) -> tuple[int, ...]:
    """window_left per layer from HF `layer_types` + `sliding_window`.

    HF's sliding mask keeps kv j for query i when i - sliding_window < j <= i,
    i.e. the last `sliding_window` slots including the query's own: window_left
    = sliding_window - 1. Configs without `layer_types` have no windows here;
    families that window every layer (Mistral, Phi-3) use `uniform_windows`.
    """
    types = getattr(c, "layer_types", None)
    window = getattr(c, "sliding_window", None)
    if not types or not window:
        return ()
    return tuple(window - 1 if t == "sliding_attention" else -1 for t in types)


def uniform_windows(c: Any) -> tuple[int, ...]:
    """Every layer windowed by `sliding_window` when it is set (Mistral 7B v0.1, Phi-3 mini)."""
    window = getattr(c, "sliding_window", None)
    return (window - 1,) * c.num_hidden_layers if window else ()


# ForwardContext.extras key: (rows [n] int64, values [n, hidden]) that replace those rows' token embeddings.
INPUT_EMBEDS = "input_embeds"


def place_input_embeds(x: torch.Tensor, fwd: ForwardContext) -> torch.Tensor:
    """The token embeddings with the rows a vision tower fills (an image's soft tokens) replaced."""
    placed = fwd.extras.get(INPUT_EMBEDS)
    if placed is None:
        return x
    rows, values = placed
    return x.index_copy(0, rows, values.to(x.dtype))


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap


class Attention(nn.Module):
    """QKV projection (+ optional q/k RMSNorm) -> RoPE -> paged attention (+ sinks) -> O projection."""

    def __init__(self, spec: DecoderSpec, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx, self.tp = layer_idx, spec.tp
        # This rank's heads: with tensor parallelism, rank r owns query heads and kv heads block r.
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_local_heads, spec.num_local_kv_heads, spec.head_dim
        q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim  # global sizes
        reps = spec.kv_replicas  # > 1: this rank's one kv head is shared with tp / num_kv_heads - 1 other ranks
        self.qkv_proj = column_linear(spec.hidden_size, [q_size, kv_size, kv_size], spec.tp, bias=spec.qkv_bias,
                                      fused_source=spec.fused_in_checkpoint, replicas=[1, reps, reps])
        self.o_proj = row_linear(q_size, spec.hidden_size, spec.tp, bias=spec.o_bias)
        self.qk_norm = spec.qk_norm
        # A norm over the whole projection spans every rank's heads: its mean square is all-reduced.
        self.norm_across_ranks = spec.qk_norm == "full" and spec.tp.size > 1
        self.q_norm: RMSNorm
        self.k_norm: RMSNorm
        if self.norm_across_ranks:
            self.q_norm, self.k_norm = spec.sharded_norm(q_size), spec.sharded_norm(kv_size, reps)
        elif spec.qk_norm != "none":
            per_head = spec.qk_norm == "head"
            self.q_norm = spec.norm(spec.head_dim if per_head else q_size)
            self.k_norm = spec.norm(spec.head_dim if per_head else kv_size)
        self.sinks = nn.Parameter(torch.empty(self.num_heads), requires_grad=False) if spec.attn_sinks else None
        self.query_scale = (spec.query_scale_beta, spec.query_scale_period)

    def forward(self, x: torch.Tensor, rope: Rope, fwd: ForwardContext) -> torch.Tensor:
        t, lora = x.shape[0], lora_of(fwd)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x, lora).split([q_size, kv_size, kv_size], dim=-1)
        if self.norm_across_ranks:
            assert isinstance(self.q_norm, ShardedRMSNorm) and isinstance(self.k_norm, ShardedRMSNorm)
            q, k = sharded_rms_norms([(self.q_norm, q), (self.k_norm, k)], self.tp)
        elif self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        beta, period = self.query_scale
        if beta:
            scale = 1 + beta * torch.log1p(torch.floor(fwd.positions.float() / period))  # [t]
            q = q * scale[:, None, None].to(q.dtype)
        o = fwd.attention(self.layer_idx, q, k, v, self.sinks)  # [t, heads, head_dim]
        return self.o_proj(o.reshape(t, q_size), lora)


class DecoderLayer(nn.Module):
    """attention + MLP, each wrapped by the norms of `spec.norm_layout`.

    pre:      x += attn(input_layernorm(x));  x += mlp(post_attention_layernorm(x))
    sandwich: x += post_attention_layernorm(attn(input_layernorm(x)));
              x += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))
    post:     x += post_attention_layernorm(attn(x));  x += post_feedforward_layernorm(mlp(x))
    """

    # layout -> (norm before attn, after attn, before mlp, after mlp); HF's module names
    _NORMS: ClassVar[dict[str, tuple[str | None, ...]]] = {
        "pre": ("input_layernorm", None, "post_attention_layernorm", None),
        "sandwich": ("input_layernorm", "post_attention_layernorm",
                     "pre_feedforward_layernorm", "post_feedforward_layernorm"),
        "post": (None, "post_attention_layernorm", None, "post_feedforward_layernorm"),
    }

    def __init__(self, spec: DecoderSpec, layer_idx: int) -> None:
        super().__init__()
        self.norm_names = self._NORMS[spec.norm_layout]
        for name in self.norm_names:
            if name is not None:
                self.add_module(name, spec.norm(spec.hidden_size))
        self.self_attn = self.make_attention(spec, layer_idx)
        self.mlp = self.make_mlp(spec, layer_idx)

    def make_attention(self, spec: DecoderSpec, layer_idx: int) -> nn.Module:
        return Attention(spec, layer_idx)

    def make_mlp(self, spec: DecoderSpec, layer_idx: int) -> nn.Module:
        """The feed-forward block; MoE families return their expert block here."""
        return GatedMLP(spec.hidden_size, spec.intermediate_size, spec.hidden_act, bias=spec.mlp_bias,
                        fused_in_checkpoint=spec.fused_in_checkpoint, tp=spec.tp)

    def _norm(self, i: int, x: torch.Tensor) -> torch.Tensor:
        name = self.norm_names[i]
        return x if name is None else getattr(self, name)(x)

    def forward(self, x: torch.Tensor, rope: Rope, fwd: ForwardContext) -> torch.Tensor:
        if self.norm_names[1] is None and self.norm_names[2] is not None:  # pre-norm: the add and norm fuse
            h, x = getattr(self, self.norm_names[2]).add_and_norm(self.self_attn(self._norm(0, x), rope, fwd), x)
            return x + self._norm(3, self.mlp(h, lora_of(fwd)))
        x = x + self._norm(1, self.self_attn(self._norm(0, x), rope, fwd))
        return x + self._norm(3, self.mlp(self._norm(2, x), lora_of(fwd)))


class DecoderModel(nn.Module):
    def __init__(self, spec: DecoderSpec, layer_cls: type[nn.Module] = DecoderLayer) -> None:
        super().__init__()
        self.embed_tokens = vocab_embedding(spec.vocab_size, spec.hidden_size, spec.tp)
        self.layers = nn.ModuleList([layer_cls(spec, i) for i in range(spec.num_layers)])
        self.norm = spec.norm(spec.hidden_size)


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
    model_cls: ClassVar[type[DecoderModel]] = DecoderModel
    # Why this family cannot run with tensor_parallel_size > 1 (None: it can); named in the ConfigError.
    tp_refusal: ClassVar[str | None] = None

    def __init__(self, hf_config: Any, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.hf_config = self.text_config(hf_config)
        spec = self.decoder_spec(hf_config)
        if tp.size > 1:
            self.check_tensor_parallel(spec, tp)
            spec = replace(spec, tp=tp)
        self.spec = spec
        self.model = self.model_cls(self.spec, self.layer_cls)
        if not self.spec.tie_word_embeddings:
            self.lm_head = lm_head(self.spec.hidden_size, self.spec.vocab_size, tp)
        self.rotaries: dict[str, Rotary] = {}

    @classmethod
    def check_tensor_parallel(cls, spec: DecoderSpec, tp: TPGroup) -> None:
        """A ConfigError naming what cannot be split over `tp.size` ranks; sharding it anyway would mis-compute."""
        fix = "set tensor_parallel_size = 1 (each device then serves a full copy of the model)"
        # Layers other than the shared ones (and their MLP hook) have no sharded variant unless the family says so.
        reason = cls.tp_refusal
        if reason is None and not (issubclass(cls.layer_cls, DecoderLayer) and issubclass(cls.model_cls, DecoderModel)):
            reason = "its layers are not the shared decoder layers, and have no sharded variant"
        if reason is not None:
            raise ConfigError(f"tensor_parallel_size = {tp.size} is not supported for {cls.__name__}: {reason}; "
                              f"{fix}")
        for total, what in spec.tp_splits():
            tp.split(total, what)
        kv = spec.num_kv_heads
        if tp.size > kv and tp.size % kv:  # more ranks than kv heads: each kv head on tp / kv ranks
            raise ConfigError(f"tensor_parallel_size = {tp.size} is neither a divisor nor a multiple of "
                              f"num_key_value_heads = {kv} (kv heads are split, or replicated when there are more "
                              f"ranks than kv heads); use a tensor_parallel_size that divides or is a multiple "
                              f"of {kv}")
        if tp.size <= kv:
            tp.split(kv, "num_key_value_heads")

    @classmethod
    def text_config(cls, hf_config: Any) -> Any:
        """The config of the language model (multimodal wrappers return their `text_config`)."""
        return hf_config

    @classmethod
    def decoder_spec(cls, hf_config: Any) -> DecoderSpec:
        return DecoderSpec.from_hf(hf_config)

    def map_checkpoint_name(self, name: str) -> str | None:
        """Checkpoint tensor name -> this model's naming, or None to skip the tensor (e.g. a vision tower)."""
        return name

    def load_custom_weight(self, name: str, source: TensorSource) -> list[tuple[str, int | None]] | None:
        """Hook for checkpoint tensors that need more than a name mapping (e.g. packed MoE experts).

        Read `source` whole (`full()`), or only this rank's block under tensor parallelism. Return the
        (parameter, shard) slots filled, or None to use the default by-name loading.
        """
        return None

    def supports_cuda_graphs(self) -> bool:
        """False when forward syncs with the host (MoE expert token counts), which graph capture forbids."""
        return True

    def state_shape(self, conv_dtype: torch.dtype) -> StateShape | None:
        """The per-sequence recurrent state of a hybrid family (`pie.engine.state_pool`); None: KV only."""
        return None

    def attention_layer_specs(self) -> list[AttentionLayerSpec]:
        s = self.spec
        scale = s.attn_scale if s.attn_scale is not None else s.head_dim ** -0.5
        return [AttentionLayerSpec(scale=scale, window_left=s.window(i), softcap=s.attn_softcap, sinks=s.attn_sinks)
                for i in range(s.num_layers)]

    def rope_tables(self, device: torch.device) -> dict[str, Rotary]:
        """RoPE tables by key (`spec.layer_rope`); one table unless the family varies it by layer type."""
        keys = set(self.spec.layer_rope) or {DEFAULT_ROPE}
        return {k: Rotary(*rope_inv_freq(self.hf_config, device, None if k == DEFAULT_ROPE else k)) for k in keys}

    def batch_extras(self, positions: np.ndarray, layout: BatchLayout, device: torch.device) -> dict[str, Any]:
        """Per-batch inputs the family derives from the host-side layout (ForwardContext.extras); none by default."""
        return {}

    def prepare(self, device: torch.device) -> None:
        """Build the non-checkpoint state (RoPE tables) once the weights are on `device`."""
        self.rotaries = self.rope_tables(device)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        if self.spec.embed_scale:
            # HF rounds sqrt(hidden) to the weight dtype first (55.4256 -> 55.5 in bf16); do the same.
            x = x * torch.tensor(math.sqrt(self.spec.hidden_size), dtype=x.dtype)
        return x

    def ropes(self, fwd: ForwardContext, dtype: torch.dtype) -> dict[str, Rope]:
        """(cos, sin) of this batch's positions for every RoPE table."""
        assert self.rotaries, "prepare() must run before forward"
        return {k: r.cos_sin(fwd.positions, dtype, fwd.max_position) for k, r in self.rotaries.items()}

    def forward(self, input_ids: torch.Tensor, fwd: ForwardContext) -> torch.Tensor:
        """input_ids: [num_tokens] -> final hidden states [num_tokens, hidden] (after the last norm)."""
        x = place_input_embeds(self.embed(input_ids), fwd)
        ropes = self.ropes(fwd, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, ropes[self.spec.rope_key(i)], fwd)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [n, hidden] -> float32 logits [n, vocab] (soft-capped where the family does)."""
        weight = self.model.embed_tokens.weight if self.spec.tie_word_embeddings else self.lm_head.weight
        logits = dense_linear(hidden, weight)
        if self.spec.tp.size > 1:  # each rank holds a vocabulary block (the last one padded)
            logits = self.spec.tp.all_gather_last(logits)[:, :self.spec.vocab_size]
        logits = logits.float()
        cap = self.spec.final_logit_softcap
        return softcap(logits, cap) if cap > 0.0 else logits
