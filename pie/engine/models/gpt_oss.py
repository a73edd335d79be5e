"""GPT-OSS (20B, 120B): attention sinks, alternating sliding/full layers, YaRN RoPE, top-k-then-softmax MoE.

The experts use a clamped SwiGLU ((up + 1) * gate * sigmoid(1.702 * gate),
gate <= 7, |up| <= 7) with biases. Checkpoints pack each layer's experts in
one tensor per parameter, gate and up interleaved column by column
(`gate_up_proj` [E, H, 2I]); they are de-interleaved and transposed into
`Experts`' [E, 2I, H] gate-then-up layout on load. OpenAI's releases store
the expert matrices in MXFP4 (`*_blocks` + `*_scales`), dequantized on load
with transformers' own routine.

Under tensor parallelism the experts split like every MoE family's (each
rank a block of every expert's intermediate dimension) and the sinks split
like the query heads; bf16 expert tensors are read by block, MXFP4 ones
whole (dequantized, then sliced).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pie.engine.layers.linear import Linear
from pie.engine.layers.lora import LoRABatch
from pie.engine.layers.moe import Experts, clamped_swiglu, topk_softmax
from pie.engine.layers.sharded import rank_block
from pie.engine.models.decoder import CausalLM, DecoderLayer, DecoderSpec
from pie.engine.models.mixtral import MoESpec
from pie.engine.models.registry import register
from pie.engine.parallel import SINGLE, TPGroup
from pie.engine.tensor_source import MemoryTensor, TensorSource

_EXPERT_PARAM = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<param>(gate_up|down)_proj)(?P<kind>_bias|_blocks|_scales)?$")


@dataclass(frozen=True)
class GptOssSpec(MoESpec):
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0


class GptOssMoE(nn.Module):
    def __init__(self, spec: GptOssSpec) -> None:
        super().__init__()
        self.top_k = spec.num_experts_per_tok
        self.router = Linear(spec.hidden_size, spec.num_experts, bias=True)  # replicated on every rank
        self.experts = Experts(spec.num_experts, spec.hidden_size, spec.moe_intermediate_size,
                               clamped_swiglu(spec.swiglu_alpha, spec.swiglu_limit), bias=True, tp=spec.tp)

    def forward(self, x: torch.Tensor, lora: LoRABatch | None = None) -> torch.Tensor:
        """x: [T, H]; LoRA never targets experts (adapter loading refuses such targets)."""
        weights, idx = topk_softmax(self.router(x), self.top_k)
        return self.experts(x, idx, weights)


class GptOssLayer(DecoderLayer):
    def make_mlp(self, spec: DecoderSpec, layer_idx: int) -> nn.Module:
        assert isinstance(spec, GptOssSpec)
        return GptOssMoE(spec)


def _deinterleave(t: torch.Tensor) -> torch.Tensor:
    """Rows g0 u0 g1 u1 ... of dim 1 -> g0 g1 ... u0 u1 ... (gate block, then up block)."""
    return torch.cat((t[:, 0::2], t[:, 1::2]), dim=1)


@register("gpt_oss", "gptoss")
class GptOssForCausalLM(CausalLM):
    layer_cls = GptOssLayer

    def __init__(self, hf_config: Any, tp: TPGroup = SINGLE) -> None:
        super().__init__(hf_config, tp)
        self._mxfp4_parts: dict[str, dict[str, torch.Tensor]] = {}  # blocks/scales waiting for their pair

    def supports_cuda_graphs(self) -> bool:
        return False  # Experts read per-expert token counts on the host

    @classmethod
    def decoder_spec(cls, c: Any) -> DecoderSpec:
        bias = bool(getattr(c, "attention_bias", True))
        return GptOssSpec.from_hf(c, qkv_bias=bias, o_bias=bias, attn_sinks=True, norm_cast_before_weight=False,
                                  num_experts=c.num_local_experts, num_experts_per_tok=c.num_experts_per_tok,
                                  moe_intermediate_size=c.intermediate_size, swiglu_alpha=c.swiglu_alpha,
                                  swiglu_limit=c.swiglu_limit)

    def load_custom_weight(self, name: str, source: TensorSource) -> list[tuple[str, int | None]] | None:
        if name.endswith(".self_attn.sinks") and self.spec.tp.size > 1:
            return self._load_sinks(name, source)
        m = _EXPERT_PARAM.match(name)
        if m is None:
            return None
        prefix, param, kind = m["prefix"], m["param"], m["kind"] or ""
        experts = self.get_submodule(prefix)
        assert isinstance(experts, Experts), name
        if kind in ("_blocks", "_scales"):
            parts = self._mxfp4_parts.setdefault(f"{prefix}.{param}", {})
            parts[kind] = source.full()  # MXFP4 is dequantized whole; each rank then keeps its block
            if len(parts) < 2:
                return []
            from transformers.integrations.mxfp4 import convert_moe_packed_tensors

            del self._mxfp4_parts[f"{prefix}.{param}"]
            # FP4 codes times powers of two are exact in bf16 and fp32: dequantize straight to the weight
            # dtype (a bf16 model holds 4x the MXFP4 bytes for its experts).
            dtype = experts.gate_up_proj.dtype
            dense = convert_moe_packed_tensors(parts["_blocks"], parts["_scales"], dtype=dtype)
            source, kind = MemoryTensor(dense, f"{prefix}.{param}"), ""
        return experts.set_packed(prefix, param + kind, self._read_stacked(experts, param, kind, source))

    def _load_sinks(self, name: str, source: TensorSource) -> list[tuple[str, int | None]]:
        """This rank's query heads' sink logits (per head, so split like the heads)."""
        source.check_shape((self.spec.num_heads,))
        sinks = self.get_parameter(name)
        sinks.data.copy_(source.read(rank_block(self.spec.num_heads, self.spec.tp)))
        return [(name, None)]

    @staticmethod
    def _read_stacked(experts: Experts, param: str, kind: str, source: TensorSource) -> torch.Tensor:
        """GPT-OSS's [E, H, 2I] interleaved gate_up / [E, I, H] down -> this rank's block of Experts' layout.

        Interleaved gate/up columns g0 u0 g1 u1 ...: rank r's gate and up columns are one contiguous run
        (2 * block), de-interleaved into [gate_r | up_r]; down's rows are split by block of I.
        """
        e, h, i = experts.num_experts, experts.hidden_size, experts.intermediate_size
        block, tp = rank_block(i, experts.tp), experts.tp
        whole = tp.size == 1
        pairs = slice(2 * block.start, 2 * block.stop)
        if param == "gate_up_proj" and kind == "_bias":
            source.check_shape((e, 2 * i))
            return _deinterleave(source.full() if whole else source.read(slice(None), pairs))
        if param == "gate_up_proj":
            source.check_shape((e, h, 2 * i))
            return _deinterleave((source.full() if whole else source.read(slice(None), slice(None), pairs))
                                 .transpose(1, 2))
        if kind == "_bias":  # down bias: replicated (rank 0 adds it)
            source.check_shape((e, h))
            return source.full()
        source.check_shape((e, i, h))
        return (source.full() if whole else source.read(slice(None), block)).transpose(1, 2)
