"""Qwen 3 MoE (30B-A3B, 235B-A22B): Qwen 3 attention with a softmax-top-k expert block.

Layers listed in `mlp_only_layers`, or off the `decoder_sparse_step` grid,
keep a dense MLP, as in HF. Top-k weights are renormalised only when
`norm_topk_prob` is set.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pie.engine.layers.moe import load_expert_weight
from pie.engine.models.decoder import CausalLM, DecoderSpec, uniform_windows
from pie.engine.models.mixtral import MoELayer, MoESpec
from pie.engine.models.registry import register
from pie.engine.tensor_source import TensorSource


@register("qwen3_moe")
class Qwen3MoeForCausalLM(CausalLM):
    layer_cls = MoELayer
    expert_pieces: ClassVar[dict[str, str]] = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}

    def supports_cuda_graphs(self) -> bool:
        return False  # Experts read per-expert token counts on the host

    @classmethod
    def decoder_spec(cls, c: Any) -> DecoderSpec:
        step = c.decoder_sparse_step
        dense = tuple(i for i in range(c.num_hidden_layers)
                      if i in c.mlp_only_layers or c.num_experts == 0 or (i + 1) % step != 0)
        bias = bool(getattr(c, "attention_bias", False))
        return MoESpec.from_hf(c, qk_norm="head", qkv_bias=bias, o_bias=bias, num_experts=c.num_experts,
                               num_experts_per_tok=c.num_experts_per_tok,
                               moe_intermediate_size=c.moe_intermediate_size, norm_topk_prob=c.norm_topk_prob,
                               dense_layers=dense, layer_windows=uniform_windows(c))

    def load_custom_weight(self, name: str, source: TensorSource) -> list[tuple[str, int | None]] | None:
        return load_expert_weight(self, name, source, self.expert_pieces)
