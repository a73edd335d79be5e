"""Mixture-of-experts feed-forward: routers and stacked experts run by expert, not by token.

`Experts` keeps every expert's weights stacked ([E, 2I, H] gate-then-up rows,
[E, H, I] down) and runs a batch by sorting its (token, slot) assignments by
expert: one gather, two matmuls and one `index_add_` per expert that got any
token. The loop is over experts (at most E iterations, one host sync for the
counts), never over tokens.

Checkpoints store experts either one tensor per expert and projection
(Mixtral's `experts.N.w1`, Qwen 3 MoE's `experts.N.gate_proj`) or packed
(GPT-OSS); `Experts.load_piece` / `load_packed` fill the stacks and report a
stacked parameter as loaded only once every piece of it arrived, so the
loader's missing-tensor check still covers each expert. Under tensor
parallelism each rank reads only its block of every expert's intermediate
dimension (see `Experts`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from pie.engine.layers.linear import Linear
from pie.engine.layers.lora import LoRABatch
from pie.engine.layers.mlp import act_fn
from pie.engine.layers.sharded import rank_block
from pie.engine.parallel import SINGLE, TPGroup
from pie.engine.tensor_source import TensorSource
from pie.errors import CheckpointError

Glu = Callable[[torch.Tensor], torch.Tensor]  # [n, 2I] gate-then-up -> [n, I]


def gated(act_name: str) -> Glu:
    """act(gate) * up, the gated activation of Mixtral / Qwen MoE / Gemma experts."""
    act = act_fn(act_name)

    def glu(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return act(gate) * up

    return glu


def clamped_swiglu(alpha: float, limit: float) -> Glu:
    """GPT-OSS: gate clamped above at `limit`, up to [-limit, limit]; (up + 1) * gate * sigmoid(alpha * gate)."""

    def glu(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))

    return glu


def softmax_topk(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral / Qwen MoE routing: softmax over all experts (float32), keep the top k, optionally renormalise.

    logits: [T, E] -> (weights [T, k] float32, expert ids [T, k]).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    weights, idx = torch.topk(probs, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, idx


def topk_softmax(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-OSS routing: top k logits first, softmax over those k only."""
    top, idx = torch.topk(logits, k, dim=-1)
    return torch.softmax(top.float(), dim=-1), idx


class Experts(nn.Module):
    """E gated MLPs with stacked weights; forward(x, expert ids, weights) sums each token's k experts.

    Under tensor parallelism every rank holds every expert, a 1/tp slice of each: its block of the
    intermediate dimension (gate and up rows, down columns), like a dense MLP split over the ranks. Each rank's
    sum over its slices is partial; one all-reduce per layer, after the sum over experts, completes it.
    The down bias is replicated and added by rank 0 only, so the all-reduce adds it once.
    """

    PIECES = ("gate", "up", "down")

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, glu: Glu, *,
                 bias: bool = False, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.tp = tp
        e, h, i = num_experts, hidden_size, tp.split(intermediate_size, "the experts' intermediate size")
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h), requires_grad=False)  # [gate_r | up_r] rows
        self.down_proj = nn.Parameter(torch.empty(e, h, i), requires_grad=False)
        self.gate_up_proj_bias = nn.Parameter(torch.empty(e, 2 * i), requires_grad=False) if bias else None
        self.down_proj_bias = nn.Parameter(torch.empty(e, h), requires_grad=False) if bias else None
        self.glu = glu
        self._pieces_loaded: set[tuple[str, int]] = set()  # (piece, expert) filled so far

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: [T, H]; expert_ids, weights: [T, k] -> [T, H] = sum_k weights * expert_k(x)."""
        k = expert_ids.shape[1]
        flat = expert_ids.reshape(-1)  # assignment a = token * k + slot
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        flat_w = weights.reshape(-1)
        down_bias = self.down_proj_bias if self.tp.rank == 0 else None  # once over the ranks
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            assign = order[start:start + n]
            start += n
            tokens = assign // k
            b_gu = None if self.gate_up_proj_bias is None else self.gate_up_proj_bias[e]
            b_d = None if down_bias is None else down_bias[e]
            h = self.glu(F.linear(x.index_select(0, tokens), self.gate_up_proj[e], b_gu))  # [n, I / tp]
            y = F.linear(h, self.down_proj[e], b_d) * flat_w[assign, None]  # [n, H], partial under TP
            out.index_add_(0, tokens, y.to(out.dtype))
        return self.tp.all_reduce(out)  # no-op at tp = 1

    # -- loading: the checkpoint's full shapes are checked, then only this rank's block is read --

    def full_shape(self, name: str) -> tuple[int, ...]:
        """The checkpoint shape of stacked parameter `name` (HF's layout), before the TP split."""
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        return {"gate_up_proj": (e, 2 * i, h), "down_proj": (e, h, i), "gate_up_proj_bias": (e, 2 * i),
                "down_proj_bias": (e, h)}[name]

    def _read(self, source: TensorSource, dim: int, halves: int) -> torch.Tensor:
        """This rank's block of the intermediate dimension `dim` ([gate | up] when halves = 2); whole at tp = 1."""
        if self.tp.size == 1:
            return source.full()
        block, lead = rank_block(self.intermediate_size, self.tp), (slice(None),) * dim
        return torch.cat([source.read(*lead, slice(h * self.intermediate_size + block.start,
                                                   h * self.intermediate_size + block.stop))
                          for h in range(halves)], dim=dim)

    def load_piece(self, prefix: str, piece: str, expert: int, source: TensorSource) -> list[tuple[str, int | None]]:
        """Copy one expert's gate / up ([I, H]) or down ([H, I]) matrix; returns the params now complete."""
        if not 0 <= expert < self.num_experts:
            raise CheckpointError(f"tensor {source.name!r} names expert {expert}, but the config has "
                                  f"{self.num_experts} experts (0..{self.num_experts - 1})")
        h, i, local = self.hidden_size, self.intermediate_size, self.down_proj.shape[2]
        if piece == "down":
            source.check_shape((h, i))
            self.down_proj.data[expert].copy_(self._read(source, 1, 1))
        else:
            source.check_shape((i, h))
            rows = slice(0, local) if piece == "gate" else slice(local, 2 * local)
            self.gate_up_proj.data[expert][rows].copy_(self._read(source, 0, 1))
        self._pieces_loaded.add((piece, expert))
        return self._completed(prefix, "down_proj" if piece == "down" else "gate_up_proj")

    def load_packed(self, prefix: str, name: str, source: TensorSource) -> list[tuple[str, int | None]]:
        """Read a whole stacked parameter in HF's layout (`gate_up_proj` [E, 2I, H] gate-then-up,
        `down_proj` [E, H, I], biases [E, 2I] / [E, H]), this rank's block of I only."""
        if name not in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias") \
                or getattr(self, name) is None:
            raise CheckpointError(f"unexpected tensor {source.name!r}: these experts have no {name!r}")
        source.check_shape(self.full_shape(name))
        if name == "down_proj_bias":  # replicated
            local = source.full()
        else:
            local = self._read(source, dim=2 if name == "down_proj" else 1, halves=2 if "gate_up" in name else 1)
        return self.set_packed(prefix, name, local)

    def set_packed(self, prefix: str, name: str, local: torch.Tensor) -> list[tuple[str, int | None]]:
        """Copy this rank's block of stacked parameter `name`, already in the local layout (GPT-OSS converts)."""
        param = getattr(self, name)
        assert tuple(local.shape) == tuple(param.shape), (name, tuple(local.shape), tuple(param.shape))
        param.data.copy_(local)
        return [(f"{prefix}.{name}", None)]

    def _completed(self, prefix: str, name: str) -> list[tuple[str, int | None]]:
        pieces = ("gate", "up") if name == "gate_up_proj" else ("down",)
        done = all((p, e) in self._pieces_loaded for p in pieces for e in range(self.num_experts))
        return [(f"{prefix}.{name}", None)] if done else []


class TopKMoE(nn.Module):
    """Router (`gate`, a bias-free Linear to E logits) + experts with softmax-then-top-k routing.

    Mixtral (renormalize=True) and Qwen 3 MoE (`norm_topk_prob`).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, act: str, *,
                 renormalize: bool, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.gate = Linear(hidden_size, num_experts)  # replicated: every rank routes every token the same way
        self.experts = Experts(num_experts, hidden_size, intermediate_size, gated(act), tp=tp)

    def forward(self, x: torch.Tensor, lora: LoRABatch | None = None) -> torch.Tensor:
        """x: [T, H]. LoRA never targets experts (adapter loading refuses such targets)."""
        weights, idx = softmax_topk(self.gate(x), self.top_k, self.renormalize)
        return self.experts(x, idx, weights)


_PER_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")
_PACKED = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<param>(gate_up|down)_proj(_bias)?)$")


def load_expert_weight(model: nn.Module, name: str, source: TensorSource,
                       piece_of: Mapping[str, str]) -> list[tuple[str, int | None]] | None:
    """Route an expert tensor to its `Experts` module; None when `name` is not an expert tensor.

    piece_of maps the checkpoint's per-expert projection names to pieces, e.g.
    Mixtral {"w1": "gate", "w3": "up", "w2": "down"}. Packed tensors in HF's own
    layout (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]) load as one stacked parameter.
    """
    if m := _PER_EXPERT.match(name):
        if m["proj"] not in piece_of:
            return None
        experts = model.get_submodule(m["prefix"])
        assert isinstance(experts, Experts), name
        return experts.load_piece(m["prefix"], piece_of[m["proj"]], int(m["expert"]), source)
    if m := _PACKED.match(name):
        experts = model.get_submodule(m["prefix"])
        assert isinstance(experts, Experts), name
        return experts.load_packed(m["prefix"], m["param"], source)
    return None
