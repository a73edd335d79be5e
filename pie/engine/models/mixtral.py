"""Mixtral 8x7B / 8x22B: Mistral attention (optional sliding window) with a top-2 sparse MoE feed-forward.

Routing is HF's: softmax over all experts in float32, top-k, renormalised to
sum to 1. Checkpoints name the block `block_sparse_moe` and the experts'
projections w1 (gate), w3 (up), w2 (down); the block is `mlp` here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from pie.engine.layers.moe import TopKMoE, load_expert_weight
from pie.engine.models.decoder import CausalLM, DecoderLayer, DecoderSpec, uniform_windows
from pie.engine.models.registry import register
from pie.engine.tensor_source import TensorSource


@dataclass(frozen=True)
class MoESpec(DecoderSpec):
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    dense_layers: tuple[int, ...] = ()  # layers with a plain MLP instead of experts (Qwen 3 MoE)

    def tp_splits(self) -> list[tuple[int, str]]:
        """Each expert's intermediate dimension is split over the ranks as well (every rank holds every expert)."""
        return [*super().tp_splits(), (self.moe_intermediate_size, "moe_intermediate_size")]


class MoELayer(DecoderLayer):
    def make_mlp(self, spec: DecoderSpec, layer_idx: int) -> nn.Module:
        assert isinstance(spec, MoESpec)
        if layer_idx in spec.dense_layers:
            return super().make_mlp(spec, layer_idx)
        return TopKMoE(spec.hidden_size, spec.moe_intermediate_size, spec.num_experts, spec.num_experts_per_tok,
                       spec.hidden_act, renormalize=spec.norm_topk_prob, tp=spec.tp)


@register("mixtral")
class MixtralForCausalLM(CausalLM):
    layer_cls = MoELayer
    expert_pieces: ClassVar[dict[str, str]] = {"w1": "gate", "w3": "up", "w2": "down"}

    def supports_cuda_graphs(self) -> bool:
        return False  # Experts read per-expert token counts on the host

    @classmethod
    def decoder_spec(cls, hf_config: Any) -> DecoderSpec:
        return MoESpec.from_hf(hf_config, num_experts=hf_config.num_local_experts,
                               num_experts_per_tok=hf_config.num_experts_per_tok,
                               moe_intermediate_size=hf_config.intermediate_size,
                               layer_windows=uniform_windows(hf_config))

    def map_checkpoint_name(self, name: str) -> str | None:
        return name.replace(".block_sparse_moe.", ".mlp.")

    def load_custom_weight(self, name: str, source: TensorSource) -> list[tuple[str, int | None]] | None:
        return load_expert_weight(self, name, source, self.expert_pieces)
