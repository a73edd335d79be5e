"""Hybrid decoders: Gated DeltaNet linear-attention layers between gated full-attention layers.

Qwen 3.5 and Qwen3-Next interleave them (`layer_types`, three linear to one
full by default). The full-attention layers run on the paged KV cache like
every other family, numbered among themselves (`HybridSpec.kv_index`: the KV
pool has one layer per full-attention layer). The linear layers keep their
per-sequence state in the `StatePool` (`pie.engine.state_pool`), addressed by
the batch's `RecurrentBatch` in `ForwardContext.extras[RECURRENT_EXTRAS]`,
numbered among themselves too (`HybridSpec.state_index`).

Shared here, per HF's modules (names mirror HF for loading):
- `GatedAttention`: q_proj emits the query and an output gate per head
  ([heads, 2 * head_dim], query first), per-head (1 + w) q/k norms, partial
  rotary, output * sigmoid(gate);
- `GatedDeltaNet`: in_proj (qkv | z | b | a, one fused matmul) -> causal conv
  (SiLU) over q|k|v -> gated delta rule -> RMSNorm gated by SiLU(z) ->
  out_proj; decay g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b);
- (1 + w) RMSNorms around the blocks (Gemma style, computed in float32).

The engine gives each request's slot (`Request.state_slot`) to the batch's
`RecurrentBatch`; the families register like every other (`@register`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pie.engine.attention.base import AttentionLayerSpec
from pie.engine.forward_context import ForwardContext
from pie.engine.layers.gated_delta import causal_conv1d, causal_conv1d_step, gated_delta_rule
from pie.engine.layers.lora import lora_of
from pie.engine.layers.mlp import GatedMLP, act_fn
from pie.engine.layers.rotary import apply_rotary
from pie.engine.layers.sharded import column_linear, row_linear
from pie.engine.models.decoder import CausalLM, DecoderSpec, Rope
from pie.engine.state_pool import RECURRENT_EXTRAS, RecurrentBatch, StateShape

LINEAR, FULL = "linear_attention", "full_attention"


@dataclass(frozen=True)
class HybridSpec(DecoderSpec):
    layer_types: tuple[str, ...] = ()
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel: int = 4

    @classmethod
    def from_hybrid_hf(cls, c: Any, **overrides: Any) -> HybridSpec:
        return cls.from_hf(
            c, layer_types=tuple(c.layer_types), linear_num_key_heads=c.linear_num_key_heads,
            linear_num_value_heads=c.linear_num_value_heads, linear_key_head_dim=c.linear_key_head_dim,
            linear_value_head_dim=c.linear_value_head_dim, linear_conv_kernel=c.linear_conv_kernel_dim,
            qk_norm="head", norm_offset=1.0, norm_cast_before_weight=False, layer_windows=(), **overrides)

    @property
    def linear_key_size(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_size(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.linear_key_size + self.linear_value_size

    def _ordinal(self, layer_idx: int, kind: str) -> int:
        assert self.layer_types[layer_idx] == kind, (layer_idx, self.layer_types[layer_idx], kind)
        return sum(1 for t in self.layer_types[:layer_idx] if t == kind)

    def kv_index(self, layer_idx: int) -> int:
        """The KV-pool layer of full-attention layer `layer_idx`."""
        return self._ordinal(layer_idx, FULL)

    def state_index(self, layer_idx: int) -> int:
        """The state-pool layer of linear-attention layer `layer_idx`."""
        return self._ordinal(layer_idx, LINEAR)

    @property
    def num_kv_layers(self) -> int:
        return self.layer_types.count(FULL)

    def state_shape(self, conv_dtype: torch.dtype) -> StateShape:
        return StateShape(num_layers=self.layer_types.count(LINEAR), conv_dim=self.conv_dim,
                          conv_kernel=self.linear_conv_kernel, num_heads=self.linear_num_value_heads,
                          dim_a=self.linear_key_head_dim, dim_b=self.linear_value_head_dim, conv_dtype=conv_dtype)


class GatedAttention(nn.Module):
    """Full attention with a sigmoid output gate; q/k normed per head, partial rotary."""

    def __init__(self, spec: HybridSpec, layer_idx: int) -> None:
        super().__init__()
        self.kv_layer = spec.kv_index(layer_idx)
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        # q_proj rows: per head [query (head_dim) | gate (head_dim)], as HF lays them out.
        self.qkv_proj = column_linear(spec.hidden_size, [2 * q_size, kv_size, kv_size], spec.tp, bias=spec.qkv_bias)
        self.o_proj = row_linear(q_size, spec.hidden_size, spec.tp, bias=spec.o_bias)
        self.q_norm, self.k_norm = spec.norm(spec.head_dim), spec.norm(spec.head_dim)

    def forward(self, x: torch.Tensor, rope: Rope, fwd: ForwardContext) -> torch.Tensor:
        t, lora = x.shape[0], lora_of(fwd)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qg, k, v = self.qkv_proj(x, lora).split([2 * q_size, kv_size, kv_size], dim=-1)
        q, gate = qg.reshape(t, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        q = apply_rotary(self.q_norm(q), *rope)
        k = apply_rotary(self.k_norm(k.reshape(t, self.num_kv_heads, self.head_dim)), *rope)
        o = fwd.attention(self.kv_layer, q, k, v.reshape(t, self.num_kv_heads, self.head_dim))
        o = o * torch.sigmoid(gate)
        return self.o_proj(o.reshape(t, q_size), lora)


class GatedRMSNorm(nn.Module):
    """RMSNorm(x) * w, then * SiLU(gate); normalised in float32, weighted in x's dtype (HF's order)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x32.to(dtype) * F.silu(gate.float())).to(dtype)


class DepthwiseConvWeight(nn.Module):
    """Holds HF's `conv1d.weight` [channels, 1, kernel] (and `bias`); the conv itself is `causal_conv1d`."""

    def __init__(self, channels: int, kernel: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(channels), requires_grad=False) if bias else None


class GatedDeltaNet(nn.Module):
    def __init__(self, spec: HybridSpec, layer_idx: int) -> None:
        super().__init__()
        self.state_layer = spec.state_index(layer_idx)
        self.hk, self.hv = spec.linear_num_key_heads, spec.linear_num_value_heads
        self.dk, self.dv = spec.linear_key_head_dim, spec.linear_value_head_dim
        key, value = spec.linear_key_size, spec.linear_value_size
        self.splits = [2 * key + value, value, self.hv, self.hv]  # qkv (conv input) | z | b | a
        self.in_proj = column_linear(spec.hidden_size, self.splits, spec.tp)
        self.conv1d = DepthwiseConvWeight(spec.conv_dim, spec.linear_conv_kernel)
        self.dt_bias = nn.Parameter(torch.empty(self.hv), requires_grad=False)
        self.A_log = nn.Parameter(torch.empty(self.hv), requires_grad=False)
        self.norm = GatedRMSNorm(self.dv, spec.rms_norm_eps)
        self.out_proj = row_linear(value, spec.hidden_size, spec.tp)
        self.act: Callable[[torch.Tensor], torch.Tensor] = act_fn(spec.hidden_act)

    def forward(self, x: torch.Tensor, rope: Rope, fwd: ForwardContext) -> torch.Tensor:
        del rope  # position-free: order is carried by the state
        batch: RecurrentBatch = fwd.extras[RECURRENT_EXTRAS]
        t = x.shape[0]
        qkv, z, b, a = self.in_proj(x).split(self.splits, dim=-1)
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())  # log decay, [t, hv]
        core = x.new_empty(t, self.hv, self.dv)
        for group in batch.groups:
            core[group.rows] = self._run_group(batch, group.rows, group.slots, group.q_len, group.decode,
                                               qkv, g, beta)
        out = self.norm(core, z.reshape(t, self.hv, self.dv)).reshape(t, self.hv * self.dv)
        return self.out_proj(out)

    def _run_group(self, batch: RecurrentBatch, rows: torch.Tensor, slots: torch.Tensor, q_len: int, decode: bool,
                   qkv: torch.Tensor, g: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """Conv + delta rule for requests of `q_len` rows each, their states read from and written to the pool."""
        window, state = batch.pool.read(self.state_layer, slots)
        n, w = slots.shape[0], self.conv1d.weight[:, 0]
        if decode:
            mixed, window = causal_conv1d_step(qkv[rows], window, w, None, self.act)
        else:
            mixed, window = causal_conv1d(qkv[rows].reshape(n, q_len, -1), window, w, None, self.act)
        mixed = mixed.reshape(n, q_len, -1)
        key = self.hk * self.dk
        q, k, v = mixed.split([key, key, self.hv * self.dv], dim=-1)
        out, state = gated_delta_rule(
            q.reshape(n, q_len, self.hk, self.dk), k.reshape(n, q_len, self.hk, self.dk),
            v.reshape(n, q_len, self.hv, self.dv), g[rows].reshape(n, q_len, self.hv),
            beta[rows].reshape(n, q_len, self.hv), state, decode=decode)
        batch.pool.write(self.state_layer, slots, window, state)
        return out.reshape(n * q_len, self.hv, self.dv)


class HybridLayer(nn.Module):
    """Pre-norm block whose token mixer is `linear_attn` (Gated DeltaNet) or `self_attn` (gated attention)."""

    def __init__(self, spec: DecoderSpec, layer_idx: int) -> None:
        super().__init__()
        assert isinstance(spec, HybridSpec)
        self.is_linear = spec.layer_types[layer_idx] == LINEAR
        self.input_layernorm = spec.norm(spec.hidden_size)
        self.post_attention_layernorm = spec.norm(spec.hidden_size)
        self.mixer_name = "linear_attn" if self.is_linear else "self_attn"  # HF's module names
        mixer = GatedDeltaNet(spec, layer_idx) if self.is_linear else GatedAttention(spec, layer_idx)
        self.add_module(self.mixer_name, mixer)
        self.mlp = self.make_mlp(spec, layer_idx)

    def make_mlp(self, spec: HybridSpec, layer_idx: int) -> nn.Module:
        """The feed-forward block; MoE families (Qwen3-Next) return their expert block here."""
        return GatedMLP(spec.hidden_size, spec.intermediate_size, spec.hidden_act, tp=spec.tp)

    def forward(self, x: torch.Tensor, rope: Rope, fwd: ForwardContext) -> torch.Tensor:
        x = x + getattr(self, self.mixer_name)(self.input_layernorm(x), rope, fwd)
        return x + self.mlp(self.post_attention_layernorm(x), lora_of(fwd))


class HybridCausalLM(CausalLM):
    layer_cls: ClassVar[type[nn.Module]] = HybridLayer
    packed_modules_mapping: ClassVar[dict[str, tuple[str, int]]] = {
        **CausalLM.packed_modules_mapping,
        "in_proj_qkv": ("in_proj", 0),
        "in_proj_z": ("in_proj", 1),
        "in_proj_b": ("in_proj", 2),
        "in_proj_a": ("in_proj", 3),
    }
    # HF's multi-token-prediction head ships in the checkpoints; pie does not run it.
    ignored_checkpoint_keys: ClassVar[tuple[str, ...]] = (*CausalLM.ignored_checkpoint_keys, r"^mtp\.")
    tp_refusal = ("its recurrent layers (Gated DeltaNet / Mamba-2: in_proj, conv channels and state heads) are not "
                  "split over ranks, and the state pool holds every head on one device")
    spec: HybridSpec

    @classmethod
    def decoder_spec(cls, hf_config: Any) -> DecoderSpec:
        return HybridSpec.from_hybrid_hf(hf_config)

    def attention_layer_specs(self) -> list[AttentionLayerSpec]:
        """One spec per full-attention layer: the attention backend's (and the KV pool's) layers."""
        return [AttentionLayerSpec(scale=self.spec.head_dim ** -0.5) for _ in range(self.spec.num_kv_layers)]

    def state_shape(self, conv_dtype: torch.dtype) -> StateShape | None:
        """None when no layer is recurrent (a config of full-attention layers only runs on KV alone)."""
        shape = self.spec.state_shape(conv_dtype)
        return shape if shape.num_layers else None

    def supports_cuda_graphs(self) -> bool:
        """False: a decode group's slots are read through index tensors built per batch, not a static buffer."""
        return False
