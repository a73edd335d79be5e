"""The language model of an image(-audio)-text checkpoint, and the image inputs its forward takes.

Mistral 3, Gemma 3/4, Qwen3-VL and Qwen 3.5 ship their text decoder inside a
multimodal wrapper. `TextPartOf` (mixed in before the text family's class)
takes the wrapper's `text_config`, maps the wrapper's tensor names onto the
text model's and skips everything else: the vision tower, the audio tower and
the multimodal projector are loaded apart (`pie.engine.vision`), or not at all
for families pie runs as text only.

A batch with images carries, in `ForwardContext.extras`, the rows that take
the tower's embeddings (`decoder.INPUT_EMBEDS`) and, for the families that
need them (`pie.engine.models.qwen3_vl`):
- `MROPE_POSITIONS`: [3, num_tokens] int64, every row's (t, h, w) positions
  (text rows: three times the 1-D position; image rows: from
  `PreparedImage.positions`);
- `DEEPSTACK`: a `DeepstackRows`, the image rows and one matrix per DeepStack
  level k, added to those rows' hidden states after decoder layer k.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from pie.engine.models.decoder import CausalLM, DecoderSpec

MROPE_POSITIONS = "mrope_positions"
DEEPSTACK = "deepstack"


@dataclass(frozen=True)
class DeepstackRows:
    rows: torch.Tensor  # [n] int64: batch rows of image tokens, in the order of the matrices' rows
    embeds: tuple[torch.Tensor, ...]  # k-th: [n, hidden], added after decoder layer k

    def __post_init__(self) -> None:
        assert all(e.shape[0] == self.rows.shape[0] for e in self.embeds), (
            self.rows.shape, [tuple(e.shape) for e in self.embeds])

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
