"""Gemma 4 (E2B, E4B, 31B, 26B-A4B): Gemma's sandwich decoder with per-layer shapes and extras.

What differs from Gemma 3 (all read from transformers' modeling_gemma4):
- norms multiply by w (not 1 + w); values get a scale-free RMSNorm; the softmax scale is 1;
- global layers may have their own head_dim (`global_head_dim`) and kv heads
  (`num_global_key_value_heads`), and with `attention_k_eq_v` take V from the
  K projection (before k_norm / RoPE); global RoPE is "proportional" (rotates
  a fraction of the dims), local RoPE is plain;
- the last `num_kv_shared_layers` layers compute no K/V: each reads the cache
  of the last earlier layer of its type (`use_double_wide_mlp` doubles their MLP);
- per-layer embeddings (PLE, E2B/E4B): a second token embedding plus a projection
  of the input embedding give each layer a small vector, gated into the residual
  after the MLP;
- an optional MoE block beside the dense MLP (26B-A4B), with a normed router and
  per-expert output scales;
- every layer ends by multiplying the residual stream by its `layer_scalar`.

The paged KV cache has one [kv_heads, head_dim] shape for all layers, so
layers with fewer kv heads or a smaller head_dim are padded into it: kv heads
repeated (the GQA grouping stays exact), head dims zero-filled in q, k and v
(dot products and outputs unchanged; the padding is sliced off). Shared
layers keep (unused) cache pages of their own. Both cost KV memory, not accuracy.
`gemma4` is the image-audio-text checkpoint: its language model, which takes image and audio
embeddings at the rows the engine places them (`INPUT_EMBEDS`; their PLE reads the pad token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pie.engine.attention.base import AttentionLayerSpec
from pie.engine.forward_context import ForwardContext
from pie.engine.layers.linear import Linear
from pie.engine.layers.lora import lora_of
from pie.engine.layers.mlp import GatedMLP, act_fn
from pie.engine.layers.moe import Experts, gated, load_expert_weight, softmax_topk
from pie.engine.layers.rotary import Rotary, apply_rotary, rope_inv_freq
from pie.engine.models.decoder import (
    INPUT_EMBEDS,
    CausalLM,
    DecoderModel,
    DecoderSpec,
    Rope,
    place_input_embeds,
)
from pie.engine.models.multimodal import TextPartOf
from pie.engine.models.registry import register
from pie.engine.tensor_source import TensorSource
from pie.errors import UnsupportedModelError


@dataclass(frozen=True)
class Gemma4Spec(DecoderSpec):
    layer_head_dims: tuple[int, ...] = ()
    layer_kv_heads: tuple[int, ...] = ()
    k_eq_v: tuple[bool, ...] = ()  # per layer: V comes from the K projection
    kv_source: tuple[int, ...] = ()  # per layer: the layer whose KV cache it attends over (itself unless shared)
    mlp_sizes: tuple[int, ...] = ()  # per layer intermediate size (doubled on shared layers with double-wide MLP)
    ple_dim: int = 0  # hidden_size_per_layer_input; 0 = no per-layer embeddings
    ple_vocab: int = 0
    num_experts: int = 0  # 0 = no MoE block
    top_k_experts: int = 0
    moe_intermediate_size: int = 0

    def shared(self, layer_idx: int) -> bool:
        return self.kv_source[layer_idx] != layer_idx


def rms_unscaled(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma 4's RMSNorm without a weight (values, router input), in float32."""
    x32 = x.float()
    return (x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + eps, -0.5)).type_as(x)


def _pad_heads(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """[T, h, d] -> [T, heads, head_dim]: heads repeated (h divides heads), dims zero-filled."""
    if x.shape[1] != heads:
        x = x.repeat_interleave(heads // x.shape[1], dim=1)
    return F.pad(x, (0, head_dim - x.shape[2])) if x.shape[2] != head_dim else x


class Gemma4Attention(nn.Module):
    def __init__(self, spec: Gemma4Spec, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx, self.eps = layer_idx, spec.rms_norm_eps
        self.head_dim, self.num_heads = spec.layer_head_dims[layer_idx], spec.num_heads
        self.num_kv_heads = spec.layer_kv_heads[layer_idx]
        self.cache_heads, self.cache_dim = spec.num_kv_heads, spec.head_dim
        self.kv_source, self.k_eq_v = spec.kv_source[layer_idx], spec.k_eq_v[layer_idx]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = Linear(spec.hidden_size, q_size, bias=spec.qkv_bias)
        self.q_norm = spec.norm(self.head_dim)
        if not spec.shared(layer_idx):
            self.k_proj = Linear(spec.hidden_size, kv_size, bias=spec.qkv_bias)
            if not self.k_eq_v:
                self.v_proj = Linear(spec.hidden_size, kv_size, bias=spec.qkv_bias)
            self.k_norm = spec.norm(self.head_dim)
        self.o_proj = Linear(q_size, spec.hidden_size, bias=spec.o_bias)

    def forward(self, x: torch.Tensor, rope: Rope, fwd: ForwardContext) -> torch.Tensor:
        t, lora = x.shape[0], lora_of(fwd)
        q = apply_rotary(self.q_norm(self.q_proj(x, lora).view(t, self.num_heads, self.head_dim)), *rope)
        q = _pad_heads(q, self.num_heads, self.cache_dim)
        if self.kv_source != self.layer_idx:  # reuse the source layer's cache, write nothing
            o = fwd.backend.run(self.layer_idx, q, fwd.kv.layers[self.kv_source])
        else:
            k_raw = self.k_proj(x, lora).view(t, self.num_kv_heads, self.head_dim)
            v = k_raw if self.k_eq_v else self.v_proj(x, lora).view(t, self.num_kv_heads, self.head_dim)
            k = apply_rotary(self.k_norm(k_raw), *rope)
            v = rms_unscaled(v, self.eps)
            o = fwd.attention(self.layer_idx, q, _pad_heads(k, self.cache_heads, self.cache_dim),
                              _pad_heads(v, self.cache_heads, self.cache_dim))
        o = o[..., :self.head_dim].reshape(t, self.num_heads * self.head_dim)
        return self.o_proj(o, lora)


class Gemma4Router(nn.Module):
    """RMS-normed, scaled input -> softmax over experts -> top k, renormalised, times per-expert scales."""

    def __init__(self, spec: Gemma4Spec) -> None:
        super().__init__()
        self.eps, self.top_k, self.root = spec.rms_norm_eps, spec.top_k_experts, spec.hidden_size ** -0.5
        self.proj = Linear(spec.hidden_size, spec.num_experts)
        self.scale = nn.Parameter(torch.empty(spec.hidden_size), requires_grad=False)
        self.per_expert_scale = nn.Parameter(torch.empty(spec.num_experts), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = rms_unscaled(x, self.eps) * self.scale * self.root
        weights, idx = softmax_topk(self.proj(h), self.top_k, renormalize=True)
        return weights * self.per_expert_scale[idx], idx


class Gemma4Layer(nn.Module):
    """Sandwich-normed attention and MLP (+ MoE beside it), then PLE, then `* layer_scalar`."""

    def __init__(self, spec: Gemma4Spec, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        h = spec.hidden_size
        self.input_layernorm, self.post_attention_layernorm = spec.norm(h), spec.norm(h)
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = spec.norm(h), spec.norm(h)
        self.self_attn = Gemma4Attention(spec, layer_idx)
        self.mlp = GatedMLP(h, spec.mlp_sizes[layer_idx], spec.hidden_act)
        self.layer_scalar = nn.Parameter(torch.empty(1), requires_grad=False)
        self.act = act_fn(spec.hidden_act)
        self.has_ple = spec.ple_dim > 0
        if self.has_ple:
            self.per_layer_input_gate = Linear(h, spec.ple_dim)
            self.per_layer_projection = Linear(spec.ple_dim, h)
            self.post_per_layer_input_norm = spec.norm(h)
        self.has_moe = spec.num_experts > 0
        if self.has_moe:
            self.router = Gemma4Router(spec)
            self.experts = Experts(spec.num_experts, h, spec.moe_intermediate_size, gated(spec.hidden_act))
            self.pre_feedforward_layernorm_2 = spec.norm(h)
            self.post_feedforward_layernorm_1, self.post_feedforward_layernorm_2 = spec.norm(h), spec.norm(h)

    def forward(self, x: torch.Tensor, rope: Rope, fwd: ForwardContext, ple: torch.Tensor | None) -> torch.Tensor:
        """x: [T, H]; ple: [T, ple_dim] this layer's per-layer input, or None."""
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, fwd))
        h = self.mlp(self.pre_feedforward_layernorm(x), lora_of(fwd))
        if self.has_moe:
            weights, idx = self.router(x)  # routed on the block input, like the dense MLP
            moe = self.experts(self.pre_feedforward_layernorm_2(x), idx, weights)
            h = self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(moe)
        x = x + self.post_feedforward_layernorm(h)
        if ple is not None:
            g = self.per_layer_projection(self.act(self.per_layer_input_gate(x)) * ple)
            x = x + self.post_per_layer_input_norm(g)
        return x * self.layer_scalar


class Gemma4Model(DecoderModel):
    """The decoder plus the per-layer-embedding (PLE) inputs of E2B/E4B."""

    def __init__(self, spec: DecoderSpec, layer_cls: type[nn.Module]) -> None:
        super().__init__(spec, layer_cls)
        assert isinstance(spec, Gemma4Spec)
        if spec.ple_dim:
            self.embed_tokens_per_layer = nn.Embedding(spec.ple_vocab, spec.num_layers * spec.ple_dim)
            self.per_layer_model_projection = Linear(spec.hidden_size, spec.num_layers * spec.ple_dim)
            self.per_layer_projection_norm = spec.norm(spec.ple_dim)


def gemma4_spec(c: Any) -> Gemma4Spec:
    if c.use_bidirectional_attention == "all":
        raise UnsupportedModelError("this Gemma 4 checkpoint attends bidirectionally (an embedding model); "
                                    "pie serves causal language models only")
    n, types = c.num_hidden_layers, list(c.layer_types)
    layers = [c.per_layer_config[i] for i in range(n)]
    first_shared = n - c.num_kv_shared_layers
    last_of_type = {t: max(j for j in range(first_shared) if types[j] == t) for t in set(types[first_shared:])}
    source = tuple(i if i < first_shared else last_of_type[types[i]] for i in range(n))
    double = bool(c.use_double_wide_mlp)
    return Gemma4Spec.from_hf(
        c, head_dim=max(lc.head_dim for lc in layers), num_kv_heads=max(lc.num_key_value_heads for lc in layers),
        norm_cast_before_weight=False, norm_layout="sandwich", embed_scale=True, attn_scale=1.0,
        qk_norm="head", layer_rope=tuple(types), final_logit_softcap=c.final_logit_softcapping or 0.0,
        qkv_bias=bool(c.attention_bias), o_bias=bool(c.attention_bias),
        layer_head_dims=tuple(lc.head_dim for lc in layers),
        layer_kv_heads=tuple(lc.num_key_value_heads for lc in layers),
        k_eq_v=tuple(bool(c.attention_k_eq_v) and t != "sliding_attention" for t in types),
        kv_source=source,
        mlp_sizes=tuple(c.intermediate_size * (2 if double and source[i] != i else 1) for i in range(n)),
        ple_dim=c.hidden_size_per_layer_input or 0, ple_vocab=c.vocab_size_per_layer_input,
        num_experts=(c.num_experts or 0) if c.enable_moe_block else 0, top_k_experts=c.top_k_experts or 0,
        moe_intermediate_size=c.moe_intermediate_size or 0)


@register("gemma4_text")
class Gemma4ForCausalLM(CausalLM):
    layer_cls = Gemma4Layer
    model_cls = Gemma4Model
    packed_modules_mapping: ClassVar[dict[str, tuple[str, int]]] = {"gate_proj": ("gate_up_proj", 0),
                                                                    "up_proj": ("gate_up_proj", 1)}
    tp_refusal = ("its layers differ in head_dim and kv heads (padded into one cache shape), the last layers "
                  "read earlier layers' KV, and per-layer embeddings and the MoE block have no sharded variant")

    @classmethod
    def decoder_spec(cls, hf_config: Any) -> DecoderSpec:
        return gemma4_spec(hf_config)

    def supports_cuda_graphs(self) -> bool:
        return self.gspec.num_experts == 0  # the MoE variant's experts read token counts on the host

    @property
    def gspec(self) -> Gemma4Spec:
        assert isinstance(self.spec, Gemma4Spec)
        return self.spec

    def load_custom_weight(self, name: str, source: TensorSource) -> list[tuple[str, int | None]] | None:
        return load_expert_weight(self, name, source, {})

    def attention_layer_specs(self) -> list[AttentionLayerSpec]:
        return [AttentionLayerSpec(scale=1.0, window_left=self.spec.window(i)) for i in range(self.spec.num_layers)]

    def rope_tables(self, device: torch.device) -> dict[str, Rotary]:
        """One table per layer type, each from that type's own head_dim (HF's per_layer_config)."""
        c = self.hf_config
        return {t: Rotary(*rope_inv_freq(c.per_layer_config[t], device, t)) for t in set(self.spec.layer_rope)}

    def per_layer_inputs(self, input_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """PLE: [T, layers, ple_dim] = (norm(proj(x) / sqrt(H)) + embed_ple(ids) * sqrt(P)) / sqrt(2)."""
        s, m = self.gspec, self.model
        assert isinstance(m, Gemma4Model)
        t = input_ids.shape[0]
        token = m.embed_tokens_per_layer(input_ids) * torch.tensor(math.sqrt(s.ple_dim), dtype=x.dtype)
        proj = m.per_layer_model_projection(x) * (s.hidden_size ** -0.5)
        proj = m.per_layer_projection_norm(proj.view(t, s.num_layers, s.ple_dim))
        return (proj + token.view(t, s.num_layers, s.ple_dim)) * (2.0 ** -0.5)

    def ple_ids(self, input_ids: torch.Tensor, fwd: ForwardContext) -> torch.Tensor:
        """The ids PLE looks up: rows that take a tower's embeddings read the pad token's, as transformers'
        Gemma4Model does for its multimodal placeholders (their projection half sees the embeddings)."""
        placed = fwd.extras.get(INPUT_EMBEDS)
        if placed is None:
            return input_ids
        return input_ids.index_fill(0, placed[0], int(self.hf_config.pad_token_id or 0))

    def forward(self, input_ids: torch.Tensor, fwd: ForwardContext) -> torch.Tensor:
        x = place_input_embeds(self.embed(input_ids), fwd)
        ple = self.per_layer_inputs(self.ple_ids(input_ids, fwd), x) if self.gspec.ple_dim else None
        ropes = self.ropes(fwd, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, ropes[self.spec.rope_key(i)], fwd, None if ple is None else ple[:, i])
        return self.model.norm(x)


@register("gemma4")
class Gemma4ForConditionalGeneration(TextPartOf, Gemma4ForCausalLM):
    """Gemma 4 image-audio-text checkpoints: the language model (the vision tower is
    `pie.engine.vision.gemma4`, the audio tower `pie.engine.vision.gemma4_audio`)."""
