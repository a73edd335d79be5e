"""Qwen 2 and 2.5: biased q/k/v projections, unbiased o_proj."""

from __future__ import annotations

from typing import Any

from pie.engine.models.decoder import CausalLM, DecoderSpec
from pie.engine.models.registry import register


@register("qwen2")
class Qwen2ForCausalLM(CausalLM):
    @classmethod
    def decoder_spec(cls, hf_config: Any) -> DecoderSpec:
        return DecoderSpec.from_hf(hf_config, qkv_bias=True)
