"""Llama 2/3.x (incl. llama3-scaled RoPE)."""

from __future__ import annotations

from typing import Any

from pie.engine.models.decoder import CausalLM, DecoderSpec
from pie.engine.models.registry import register


@register("llama")
class LlamaForCausalLM(CausalLM):
    @classmethod
    def decoder_spec(cls, hf_config: Any) -> DecoderSpec:
        bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderSpec.from_hf(hf_config, qkv_bias=bias, o_bias=bias,
                                   mlp_bias=bool(getattr(hf_config, "mlp_bias", False)))
