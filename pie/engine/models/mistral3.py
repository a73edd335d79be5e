"""Mistral 3 (Mistral Small 3.1/3.2, Ministral 3 3B/8B/14B): the text decoder of the Pixtral-vision checkpoint.

The language model is Mistral's (`text_config.model_type == "mistral"`) or
Ministral 3's (`"ministral3"`, with its query temperature); the Pixtral vision
tower and the multimodal projector are skipped.
"""

from __future__ import annotations

from typing import Any

from pie.engine.models.decoder import DecoderSpec
from pie.engine.models.mistral import Ministral3ForCausalLM, MistralForCausalLM
from pie.engine.models.multimodal import TextPartOf
from pie.engine.models.registry import register


@register("mistral3")
class Mistral3ForConditionalGeneration(TextPartOf, MistralForCausalLM):
    @classmethod
    def decoder_spec(cls, hf_config: Any) -> DecoderSpec:
        text = cls.text_config(hf_config)
        if text.model_type == "ministral3":  # same decoder, plus the query temperature
            return TextPartOf.with_wrapper_tie(Ministral3ForCausalLM.decoder_spec(text), hf_config)
        return super().decoder_spec(hf_config)
