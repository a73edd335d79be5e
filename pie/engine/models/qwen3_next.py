"""Qwen3-Next (80B-A3B): the Qwen 3.5 hybrid layers with a shared-expert MoE feed-forward.

Two differences from Qwen 3.5, both in loading and the MLP, none in the math
of the mixers:
- the linear layers' projections are stored fused and grouped by key head
  (`in_proj_qkvz`: per key head [q | k | v of its value heads | z of them];
  `in_proj_ba`: per key head [b | a]); they are regrouped at load into the
  shared `in_proj` layout (all q | all k | all v | all z | all b | all a);
- the feed-forward is Qwen2-MoE's: softmax-top-k experts plus a shared
  expert scaled by sigmoid(shared_expert_gate(x)); layers in
  `mlp_only_layers` or off the `decoder_sparse_step` grid keep a dense MLP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from pie.engine.layers.linear import Linear
from pie.engine.layers.lora import LoRABatch
from pie.engine.layers.mlp import GatedMLP
from pie.engine.layers.moe import TopKMoE, load_expert_weight
from pie.engine.models.decoder import DecoderSpec
from pie.engine.models.hybrid import GatedDeltaNet, HybridCausalLM, HybridLayer, HybridSpec
from pie.engine.models.registry import register
from pie.engine.tensor_source import TensorSource


@dataclass(frozen=True)
class Qwen3NextSpec(HybridSpec):
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    dense_layers: tuple[int, ...] = ()


class SharedExpertMoE(TopKMoE):
    """Routed experts (`gate`, `experts`) + sigmoid-gated `shared_expert`, HF's Qwen2-MoE block."""

    def __init__(self, spec: Qwen3NextSpec) -> None:
        super().__init__(spec.hidden_size, spec.moe_intermediate_size, spec.num_experts, spec.num_experts_per_tok,
                         spec.hidden_act, renormalize=spec.norm_topk_prob)
        self.shared_expert = GatedMLP(spec.hidden_size, spec.shared_expert_intermediate_size, spec.hidden_act)
        self.shared_expert_gate = Linear(spec.hidden_size, 1)

    def forward(self, x: torch.Tensor, lora: LoRABatch | None = None) -> torch.Tensor:
        return super().forward(x) + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class Qwen3NextLayer(HybridLayer):
    def make_mlp(self, spec: HybridSpec, layer_idx: int) -> nn.Module:
        assert isinstance(spec, Qwen3NextSpec)
        if layer_idx in spec.dense_layers:
            return super().make_mlp(spec, layer_idx)
        return SharedExpertMoE(spec)


# checkpoint projection -> the shared in_proj shards it fills, in its per-key-head order
_GROUPED: dict[str, tuple[int, ...]] = {"in_proj_qkvz": (0, 1), "in_proj_ba": (2, 3)}


@register("qwen3_next")
class Qwen3NextForCausalLM(HybridCausalLM):
    layer_cls = Qwen3NextLayer
    expert_pieces: ClassVar[dict[str, str]] = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}

    def supports_cuda_graphs(self) -> bool:
        return False  # Experts read per-expert token counts on the host

    @classmethod
    def decoder_spec(cls, c: Any) -> DecoderSpec:
        dense = tuple(i for i in range(c.num_hidden_layers)
                      if i in c.mlp_only_layers or c.num_experts == 0 or (i + 1) % c.decoder_sparse_step != 0)
        return Qwen3NextSpec.from_hybrid_hf(
            c, num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
            moe_intermediate_size=c.moe_intermediate_size,
            shared_expert_intermediate_size=c.shared_expert_intermediate_size, norm_topk_prob=c.norm_topk_prob,
            dense_layers=dense)

    def load_custom_weight(self, name: str, source: TensorSource) -> list[tuple[str, int | None]] | None:
        prefix, _, proj = name.removesuffix(".weight").rpartition(".")
        if proj not in _GROUPED:
            return load_expert_weight(self, name, source, self.expert_pieces)
        layer = self.get_submodule(prefix)
        assert isinstance(layer, GatedDeltaNet), name
        filled: list[tuple[str, int | None]] = []
        for shard, rows in zip(_GROUPED[proj], _regroup(layer, proj, source.full()), strict=True):
            layer.in_proj.load_shard("weight", rows, shard, source.name)
            filled.append((f"{prefix}.in_proj.weight", shard))
        return filled


def _regroup(layer: GatedDeltaNet, proj: str, w: torch.Tensor) -> list[torch.Tensor]:
    """Per-key-head rows [group 0 | group 1 | ...] -> one tensor per part with all heads' rows in order."""
    per = layer.hv // layer.hk  # value heads per key head
    if proj == "in_proj_qkvz":
        q, k, v, z = w.reshape(layer.hk, -1, w.shape[-1]).split(
            [layer.dk, layer.dk, per * layer.dv, per * layer.dv], dim=1)
        return [torch.cat([t.reshape(-1, w.shape[-1]) for t in (q, k, v)]), z.reshape(-1, w.shape[-1])]
    b, a = w.reshape(layer.hk, 2 * per, w.shape[-1]).split([per, per], dim=1)
    return [b.reshape(-1, w.shape[-1]), a.reshape(-1, w.shape[-1])]
