"""Mistral (7B v0.1-v0.3, Nemo, Small), Ministral 8B and Ministral 3: Llama's math plus windows / q temperature.

- `mistral`: HF masks every layer with `sliding_window` whenever the config
  sets it (v0.1: 4096; later releases: null).
- `ministral`: the window applies to the layers `layer_types` marks sliding.
- `ministral3`: no window by default; queries are scaled by Llama 4's
  position-dependent temperature 1 + beta * log(1 + floor(pos / original_max)).
"""

from __future__ import annotations

from typing import Any

from pie.engine.models.decoder import CausalLM, DecoderSpec, uniform_windows
from pie.engine.models.registry import register


@register("mistral")
class MistralForCausalLM(CausalLM):
    @classmethod
    def decoder_spec(cls, hf_config: Any) -> DecoderSpec:
        return DecoderSpec.from_hf(hf_config, layer_windows=uniform_windows(hf_config))


@register("ministral")
class MinistralForCausalLM(CausalLM):
    """Windows from `layer_types` (the DecoderSpec default)."""


@register("ministral3")
class Ministral3ForCausalLM(CausalLM):
    @classmethod
    def decoder_spec(cls, hf_config: Any) -> DecoderSpec:
        rope = hf_config.rope_parameters
        beta = rope.get("llama_4_scaling_beta") or 0.0
        return DecoderSpec.from_hf(hf_config, layer_windows=uniform_windows(hf_config), query_scale_beta=beta,
                                   query_scale_period=int(rope.get("original_max_position_embeddings") or 0))
