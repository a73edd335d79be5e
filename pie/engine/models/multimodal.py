"""The language model of an image(-audio)-text checkpoint, run as a text-only model.

Mistral 3, Gemma 3 and Gemma 4 ship their text decoder inside a multimodal
wrapper. `TextPartOf` (mixed in before the text family's class) takes the
wrapper's `text_config`, maps the wrapper's tensor names onto the text
model's and skips everything else: the vision tower, the audio tower and the
multimodal projector are not loaded here. The vision towers of the families
`pie.engine.vision` registers are loaded by the engine's `VisionEncoder` (which
puts their embeddings in place of the image rows' token embeddings); the others
serve text prompts only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from pie.engine.models.decoder import CausalLM, DecoderSpec

# wrapper prefix -> text-model prefix: transformers >= 5 names ("model.language_model.") and the
# older ones still used by most hub checkpoints ("language_model.model.").
_TEXT_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
)


class TextPartOf(CausalLM):
    text_prefixes: ClassVar[tuple[tuple[str, str], ...]] = _TEXT_PREFIXES

    @classmethod
    def text_config(cls, hf_config: Any) -> Any:
        return hf_config.get_text_config(decoder=True)

    @classmethod
    def decoder_spec(cls, hf_config: Any) -> DecoderSpec:
        return cls.with_wrapper_tie(super().decoder_spec(cls.text_config(hf_config)), hf_config)

    @staticmethod
    def with_wrapper_tie(spec: DecoderSpec, hf_config: Any) -> DecoderSpec:
        """HF ties the wrapper's lm_head by the wrapper's own flag, not the text config's."""
        tied = bool(getattr(hf_config, "tie_word_embeddings", spec.tie_word_embeddings))
        return dataclasses.replace(spec, tie_word_embeddings=tied)

    def map_checkpoint_name(self, name: str) -> str | None:
        for src, dst in self.text_prefixes:
            if name.startswith(src):
                return dst + name[len(src):]
        return None  # vision / audio towers, projectors
