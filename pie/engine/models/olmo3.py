"""OLMo 3 (AI2): post-norm blocks, q/k RMSNorm over the whole projection, sliding and global layers.

Each block's output is normed before the residual add (no norm on its
input); q_norm / k_norm span all heads ([heads * head_dim]) before the
reshape; norms multiply by the weight in float32. RoPE may differ by layer
type (e.g. YaRN on the global layers only).
"""

from __future__ import annotations

from typing import Any

from pie.engine.models.decoder import CausalLM, DecoderSpec
from pie.engine.models.registry import register


@register("olmo3")
class Olmo3ForCausalLM(CausalLM):
    @classmethod
    def decoder_spec(cls, hf_config: Any) -> DecoderSpec:
        bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderSpec.from_hf(hf_config, norm_layout="post", qk_norm="full", norm_cast_before_weight=False,
                                   qkv_bias=bias, o_bias=bias, layer_rope=tuple(hf_config.layer_types))
