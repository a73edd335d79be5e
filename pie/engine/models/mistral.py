"""Mistral (7B v0.1-v0.3, Nemo, Small): Llama's math with an optional sliding window on every layer.

HF's MistralModel masks with `sliding_window` on all layers whenever the
config sets it (v0.1: 4096; later releases: null), so each layer gets the
same window here.
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
