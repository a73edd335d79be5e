"""Phi-3 / Phi-3.5 / Phi-4-mini: fused qkv_proj and gate_up_proj in the checkpoint, partial RoPE, LongRoPE.

LongRoPE has two frequency sets. HF uses the long set for a whole sequence
once it is longer than `original_max_position_embeddings` (its generate even
recomputes the cache at the crossing). Here each request's new tokens use the
long set when the request's largest position + 1 passes the threshold: the
same as HF for prompts on either side of it and for every decode step after a
long prompt, independent of batch mates. One difference is left: when a
sequence crosses the threshold while decoding, the keys already cached keep
their short-factor rotation (the engine never rewrites cached KV).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from pie.engine.attention.base import BatchLayout
from pie.engine.forward_context import ForwardContext
from pie.engine.layers.rotary import Rotary, rope_inv_freq
from pie.engine.models.decoder import DEFAULT_ROPE, CausalLM, DecoderSpec, Rope, uniform_windows
from pie.engine.models.registry import register

LONG_ROWS = "phi3_longrope_long"  # ForwardContext.extras: [T] bool, the token's request is past the threshold


class LongRopeRotary(Rotary):
    """Short-factor frequencies, or long-factor ones for the rows `long` marks."""

    def __init__(self, short: torch.Tensor, long: torch.Tensor, scaling: float, original_max: int) -> None:
        super().__init__(short, scaling)
        self.long_inv_freq = long.float()
        self.original_max = original_max  # requests whose largest position + 1 exceeds this go long

    def cos_sin_long(self, positions: torch.Tensor, long: torch.Tensor,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        pos = positions.float()[:, None]
        freqs = torch.where(long[:, None], pos * self.long_inv_freq[None, :], pos * self.inv_freq[None, :])
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, rotary_dim]
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


@register("phi3")
class Phi3ForCausalLM(CausalLM):
    packed_modules_mapping: ClassVar[dict[str, tuple[str, int]]] = {}  # already fused in the checkpoint

    @classmethod
    def decoder_spec(cls, hf_config: Any) -> DecoderSpec:
        return DecoderSpec.from_hf(hf_config, fused_in_checkpoint=True, layer_windows=uniform_windows(hf_config))

    def rope_tables(self, device: torch.device) -> dict[str, Rotary]:
        params = self.hf_config.rope_parameters
        if params.get("rope_type") != "longrope":
            return super().rope_tables(device)
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        original_max = int(params["original_max_position_embeddings"])
        short, scaling = rope_inv_freq(self.hf_config, device)
        long, _ = ROPE_INIT_FUNCTIONS["longrope"](self.hf_config, device, seq_len=original_max + 1)
        return {DEFAULT_ROPE: LongRopeRotary(short, long.to(device), scaling, original_max)}

    def batch_extras(self, positions: np.ndarray, layout: BatchLayout, device: torch.device) -> dict[str, Any]:
        rotary = self.rotaries.get(DEFAULT_ROPE)
        if not isinstance(rotary, LongRopeRotary):
            return {}
        longest = np.maximum.reduceat(positions, layout.qo_indptr[:-1]) + 1  # per request: HF's "seq_len"
        long = np.repeat(longest > rotary.original_max, np.diff(layout.qo_indptr))
        return {LONG_ROWS: torch.from_numpy(long).to(device)}

    def ropes(self, fwd: ForwardContext, dtype: torch.dtype) -> dict[str, Rope]:
        rotary = self.rotaries[DEFAULT_ROPE]
        if not isinstance(rotary, LongRopeRotary):
            return super().ropes(fwd, dtype)
        # Without batch_extras (CUDA-graph decode replays) a row's own position decides: the same for decode rows.
        long = fwd.extras.get(LONG_ROWS)
        if long is None:
            long = fwd.positions >= rotary.original_max
        return {DEFAULT_ROPE: rotary.cos_sin_long(fwd.positions, long, dtype)}
