"""Qwen3-VL (dense 2B-32B, MoE 30B-A3B / 235B-A22B): the text decoder of the image-text checkpoint,
with M-RoPE and DeepStack inputs.

The language model is Qwen 3's (per-head q/k norms) or Qwen 3 MoE's. Its rotary embedding is M-RoPE: each frequency
turns with one of three positions (temporal, height, width), interleaved -- frequency f follows the
height position when f % 3 == 1 and f < 3 * mrope_section[1], the width when f % 3 == 2 and
f < 3 * mrope_section[2], the temporal one otherwise. A text token has three equal positions, so
text runs with the plain 1-D positions and the standard RoPE: text-only prompts need nothing more,
and neither do the tokens after an image, whose 1-D position is the M-RoPE one (the image advances
the counter by `PreparedImage.position_span`, not by its token count).

A batch with image tokens carries two extras (`ForwardContext.extras`, `pie.engine.models.multimodal`),
both made by the engine's image path (`VisionEncoder.place`):
- `MROPE_POSITIONS`: [3, num_tokens] int64, the batch's (t, h, w) positions (text rows: three times
  the 1-D position; image rows: from `PreparedImage.positions`);
- `DEEPSTACK`: a `DeepstackRows` -- the batch rows of image tokens and, per DeepStack level k, the
  vision tower's k-th matrix (`Qwen3VLVisionTower.embed_images`), added to those rows after decoder layer k.
The vision tower itself is `pie/engine/vision/qwen3_vl.py`; its tensors are skipped here.
"""

from __future__ import annotations

import copy
import re
from typing import Any, ClassVar

import torch

from pie.engine.forward_context import ForwardContext
from pie.engine.layers.moe import Experts
from pie.engine.layers.rotary import Rotary, rope_inv_freq
from pie.engine.models.decoder import DEFAULT_ROPE, DecoderSpec, Rope, place_input_embeds
from pie.engine.models.multimodal import DEEPSTACK, MROPE_POSITIONS, DeepstackRows, TextPartOf
from pie.engine.models.qwen3 import Qwen3ForCausalLM
from pie.engine.models.qwen3_moe import Qwen3MoeForCausalLM
from pie.engine.models.registry import register
from pie.engine.tensor_source import TensorSource


class MRotary(Rotary):
    """The standard table for 1-D positions, and cos/sin of (t, h, w) positions per interleaved section."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float, section: list[int]) -> None:
        super().__init__(inv_freq, attention_scaling)
        n = inv_freq.numel()
        if len(section) != 3:
            raise ValueError(f"mrope_section {section} must have three parts (temporal, height, width)")
        # Sections reaching past the rotary_dim / 2 = n frequencies are cut there, as transformers' slices
        # cut them (Qwen 3.5's default [11, 11, 10] on a smaller partial rotary).
        axis = torch.zeros(n, dtype=torch.long, device=inv_freq.device)  # which position turns frequency f
        axis[1:3 * section[1]:3] = 1
        axis[2:3 * section[2]:3] = 2
        self.axis = axis

    def cos_sin_3d(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [3, T] -> cos, sin [T, rotary_dim]."""
        per_freq = positions.float()[self.axis].T  # [T, rotary_dim // 2]: each frequency's own position
        freqs = per_freq * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


class MRopeDeepstack(TextPartOf):
    """M-RoPE positions and DeepStack additions from `ForwardContext.extras`; mixed in before the text family."""

    default_mrope_section: ClassVar[tuple[int, int, int]] = (24, 20, 20)  # transformers' default when unset

    def rope_tables(self, device: torch.device) -> dict[str, Rotary]:
        params = getattr(self.hf_config, "rope_parameters", None) or {}
        section = list(params.get("mrope_section") or self.default_mrope_section)
        return {DEFAULT_ROPE: MRotary(*rope_inv_freq(self.hf_config, device), section)}

    def ropes(self, fwd: ForwardContext, dtype: torch.dtype) -> dict[str, Rope]:
        positions = fwd.extras.get(MROPE_POSITIONS)
        if positions is None:  # text only: three equal positions turn every frequency alike
            return super().ropes(fwd, dtype)
        rotary = self.rotaries[DEFAULT_ROPE]
        assert isinstance(rotary, MRotary) and tuple(positions.shape) == (3, fwd.num_tokens), positions.shape
        return {DEFAULT_ROPE: rotary.cos_sin_3d(positions, dtype)}

    def forward(self, input_ids: torch.Tensor, fwd: ForwardContext) -> torch.Tensor:
        deep: DeepstackRows | None = fwd.extras.get(DEEPSTACK)
        if deep is None:
            return super().forward(input_ids, fwd)
        # CausalLM.forward, plus the DeepStack additions after the first len(deep.embeds) layers
        x = place_input_embeds(self.embed(input_ids), fwd)
        rope = self.ropes(fwd, x.dtype)[DEFAULT_ROPE]
        for i, layer in enumerate(self.model.layers):
            x = layer(x, rope, fwd)
            if i < len(deep.embeds):
                x = x.index_add(0, deep.rows, deep.embeds[i].to(x.dtype))
        return self.model.norm(x)


@register("qwen3_vl")
class Qwen3VLForConditionalGeneration(MRopeDeepstack, Qwen3ForCausalLM):
    pass


class _SwapLastTwo(TensorSource):
    """A stacked [E, a, b] checkpoint tensor seen as [E, b, a] (reads map their slices across)."""

    def __init__(self, inner: TensorSource) -> None:
        self.inner, self.name = inner, inner.name

    @property
    def shape(self) -> tuple[int, ...]:
        e, a, b = self.inner.shape
        return (e, b, a)

    def full(self) -> torch.Tensor:
        return self.inner.full().transpose(1, 2).contiguous()

    def read(self, *index: slice) -> torch.Tensor:
        first, second, third = (*index, *[slice(None)] * (3 - len(index)))
        return self.inner.read(first, third, second).transpose(1, 2).contiguous()


_PACKED_EXPERTS = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<param>gate_up_proj|down_proj)$")


@register("qwen3_vl_moe")
class Qwen3VLMoeForConditionalGeneration(MRopeDeepstack, Qwen3MoeForCausalLM):
    """Qwen3-VL 30B-A3B / 235B-A22B: Qwen 3 MoE decoder; every layer sparse, top-k weights always renormalised.

    Qwen's own checkpoints store the stacked experts transposed (`gate_up_proj` [E, H, 2I], `down_proj`
    [E, I, H]); transformers >= 5 saves [E, 2I, H] / [E, H, I]. Either loads: a tensor whose last two
    dimensions are swapped relative to the expected shape is read transposed (as transformers does).
    """

    def load_custom_weight(self, name: str, source: TensorSource) -> list[tuple[str, int | None]] | None:
        if m := _PACKED_EXPERTS.match(name):
            experts = self.get_submodule(m["prefix"])
            assert isinstance(experts, Experts), name
            e, a, b = experts.full_shape(m["param"])
            if a != b and tuple(source.shape) == (e, b, a):
                source = _SwapLastTwo(source)
        return super().load_custom_weight(name, source)

    @classmethod
    def decoder_spec(cls, hf_config: Any) -> DecoderSpec:
        text = copy.copy(cls.text_config(hf_config))
        text.norm_topk_prob = True  # Qwen3-VL-MoE's router renormalises and its config has no such flag
        return cls.with_wrapper_tie(Qwen3MoeForCausalLM.decoder_spec(text), hf_config)
