"""Qwen 3.5 (Qwen/Qwen3.5-0.8B ... 27B): the hybrid decoder of `models/hybrid.py` with dense MLPs.

`qwen3_5_text` is the language model alone (`Qwen3_5ForCausalLM`); `qwen3_5`
is the image-text checkpoint (`Qwen3_5ForConditionalGeneration`): its vision
tower is Qwen3-VL's without DeepStack (`pie/engine/vision/qwen3_vl.py`), and
its attention layers take M-RoPE positions as Qwen3-VL's do (`MRopeDeepstack`,
partial rotary). Text-only positions are the same on the three M-RoPE axes,
which makes HF's interleaved M-RoPE plain partial RoPE.
"""

from __future__ import annotations

from pie.engine.models.hybrid import HybridCausalLM
from pie.engine.models.qwen3_vl import MRopeDeepstack
from pie.engine.models.registry import register


@register("qwen3_5_text")
class Qwen3_5TextForCausalLM(HybridCausalLM):
    pass


@register("qwen3_5")
class Qwen3_5ForConditionalGeneration(MRopeDeepstack, Qwen3_5TextForCausalLM):
    default_mrope_section = (11, 11, 10)
