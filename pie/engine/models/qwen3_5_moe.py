"""Qwen 3.5 MoE (35B-A3B ... 397B-A17B): Qwen 3.5's layers with Qwen3-Next's shared-expert MoE on every layer.

The linear layers store Qwen 3.5's separate projections (no regrouping), the
router always renormalises its top-k weights, and no layer is dense.
`qwen3_5_moe` is the image-text checkpoint: Qwen 3.5's vision tower and M-RoPE
(`pie.engine.models.qwen3_5`).
"""

from __future__ import annotations

from typing import Any

from pie.engine.models.decoder import DecoderSpec
from pie.engine.models.qwen3_next import Qwen3NextForCausalLM, Qwen3NextSpec
from pie.engine.models.qwen3_vl import MRopeDeepstack
from pie.engine.models.registry import register


@register("qwen3_5_moe_text")
class Qwen3_5MoeTextForCausalLM(Qwen3NextForCausalLM):
    @classmethod
    def decoder_spec(cls, c: Any) -> DecoderSpec:
        # The config has no dense intermediate_size (every layer is MoE); the shared value is never used.
        return Qwen3NextSpec.from_hybrid_hf(
            c, intermediate_size=c.moe_intermediate_size, num_experts=c.num_experts,
            num_experts_per_tok=c.num_experts_per_tok, moe_intermediate_size=c.moe_intermediate_size,
            shared_expert_intermediate_size=c.shared_expert_intermediate_size, norm_topk_prob=True, dense_layers=())


@register("qwen3_5_moe")
class Qwen3_5MoeForConditionalGeneration(MRopeDeepstack, Qwen3_5MoeTextForCausalLM):
    default_mrope_section = (11, 11, 10)
