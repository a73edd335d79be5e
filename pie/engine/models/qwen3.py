"""Qwen 3 (the default model, Qwen/Qwen3-0.6B): per-head q/k RMSNorm, usually tied embeddings."""

from __future__ import annotations

from typing import Any

from pie.engine.models.decoder import CausalLM, DecoderSpec
from pie.engine.models.registry import register


@register("qwen3")
class Qwen3ForCausalLM(CausalLM):
    @classmethod
    def decoder_spec(cls, hf_config: Any) -> DecoderSpec:
        bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderSpec.from_hf(hf_config, qk_norm="head", qkv_bias=bias, o_bias=bias)
