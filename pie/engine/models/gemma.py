"""Gemma 2 and Gemma 3 (text): the sandwich-norm decoder with Gemma's conventions.

- RMSNorm weights are stored as w - 1 and applied as x * (1 + w), in float32;
- embeddings are scaled by sqrt(hidden_size) (rounded to the weight dtype first, as HF does);
- every block has a norm before and after it (`norm_layout = "sandwich"`);
- the softmax scale is query_pre_attn_scalar ** -0.5;
- sliding-window and global layers alternate by `layer_types`.

Gemma 2 adds attention-logit and final-logit soft-capping. Gemma 3 adds
per-head q/k norms and a RoPE table per layer type (local base 10k, global
1M with optional scaling); HF's Gemma 3 ignores `attn_logit_softcapping`, so
this does too. `gemma3` is the image-text checkpoint: its language model.
"""

from __future__ import annotations

from typing import Any

from pie.engine.models.decoder import CausalLM, DecoderSpec
from pie.engine.models.multimodal import TextPartOf
from pie.engine.models.registry import register
from pie.errors import UnsupportedModelError


def gemma_spec(c: Any, **overrides: Any) -> DecoderSpec:
    if getattr(c, "use_bidirectional_attention", None):
        raise UnsupportedModelError("this Gemma checkpoint uses bidirectional attention (an embedding model); "
                                    "pie serves causal language models only")
    bias = bool(getattr(c, "attention_bias", False))
    return DecoderSpec.from_hf(c, norm_offset=1.0, norm_cast_before_weight=False, norm_layout="sandwich",
                               embed_scale=True, attn_scale=c.query_pre_attn_scalar ** -0.5, qkv_bias=bias,
                               o_bias=bias, final_logit_softcap=c.final_logit_softcapping or 0.0, **overrides)


@register("gemma2")
class Gemma2ForCausalLM(CausalLM):
    @classmethod
    def decoder_spec(cls, hf_config: Any) -> DecoderSpec:
        return gemma_spec(hf_config, attn_softcap=hf_config.attn_logit_softcapping or 0.0)


@register("gemma3_text")
class Gemma3ForCausalLM(CausalLM):
    @classmethod
    def decoder_spec(cls, hf_config: Any) -> DecoderSpec:
        return gemma_spec(hf_config, qk_norm="head", layer_rope=tuple(hf_config.layer_types))


@register("gemma3")
class Gemma3ForConditionalGeneration(TextPartOf, Gemma3ForCausalLM):
    """Gemma 3 4B/12B/27B image-text checkpoints; the SigLIP tower and projector are skipped."""
