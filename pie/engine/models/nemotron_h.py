"""Nemotron-H: Mamba-2 layers, full-attention layers and MLP layers, each its own pre-normed residual block.

`layers_block_type` names every block's single mixer: `linear_attention`
(Mamba-2: in_proj -> [gate z | conv input x|B|C | dt], causal conv + SiLU,
the SSD recurrence of `layers/mamba2.py` with D skip, RMSNorm over groups of
the SiLU(z)-gated output, out_proj), `full_attention` (no RoPE: the shared
`Attention` with identity rotary tables, which leaves q and k bit-identical),
`mlp` (up -> ReLU^2 -> down). The Mamba-2 state lives in the same
`StatePool` as Gated DeltaNet's: conv window [conv_dim, K - 1] and state
[heads, head_dim, state_size]. MoE blocks (`moe`, Nemotron 3) are refused.

HF names the blocks' parts `norm` / `mixer` and the model's `embeddings` /
`norm_f` (NVIDIA's own checkpoints put them under `backbone.`); they are
mapped onto the shared decoder's `embed_tokens` / `norm`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pie.engine.forward_context import ForwardContext
from pie.engine.layers.gated_delta import causal_conv1d, causal_conv1d_step
from pie.engine.layers.linear import Linear
from pie.engine.layers.lora import LoRABatch
from pie.engine.layers.mamba2 import ssd_chunked, ssd_recurrent
from pie.engine.models.decoder import DEFAULT_ROPE, Attention, CausalLM, DecoderSpec, Rope
from pie.engine.models.hybrid import (
    FULL,
    LINEAR,
    DepthwiseConvWeight,
    HybridCausalLM,
    HybridSpec,
)
from pie.engine.models.registry import register
from pie.engine.state_pool import RECURRENT_EXTRAS, RecurrentBatch, StateShape
from pie.errors import UnsupportedModelError


@dataclass(frozen=True)
class NemotronHSpec(HybridSpec):
    mamba_heads: int = 0
    mamba_head_dim: int = 0
    mamba_groups: int = 1
    ssm_state_size: int = 0
    mamba_bias: bool = False
    conv_bias: bool = True
    mamba_chunk: int = 128
    dt_limit: tuple[float, float] = (0.0, float("inf"))

    @property
    def mamba_inner(self) -> int:
        return self.mamba_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        return self.mamba_inner + 2 * self.mamba_groups * self.ssm_state_size

    def state_shape(self, conv_dtype: torch.dtype) -> StateShape:
        return StateShape(num_layers=self.layer_types.count(LINEAR), conv_dim=self.conv_dim,
                          conv_kernel=self.linear_conv_kernel, num_heads=self.mamba_heads,
                          dim_a=self.mamba_head_dim, dim_b=self.ssm_state_size, conv_dtype=conv_dtype)


class GroupGatedRMSNorm(nn.Module):
    """x * SiLU(gate), RMS-normed per group of `group_size` features in float32, then * w."""

    def __init__(self, dim: int, group_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.group_size, self.eps = group_size, eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float() * F.silu(gate.float())
        g = x32.reshape(*x32.shape[:-1], -1, self.group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.reshape(x32.shape).to(dtype)


class Mamba2Mixer(nn.Module):
    def __init__(self, spec: NemotronHSpec, layer_idx: int) -> None:
        super().__init__()
        self.state_layer = spec.state_index(layer_idx)
        self.h, self.p, self.g, self.n = spec.mamba_heads, spec.mamba_head_dim, spec.mamba_groups, spec.ssm_state_size
        self.splits = [spec.mamba_inner, spec.conv_dim, self.h]  # gate z | conv input | dt
        self.in_proj = Linear(spec.hidden_size, sum(self.splits), bias=spec.mamba_bias)
        self.conv1d = DepthwiseConvWeight(spec.conv_dim, spec.linear_conv_kernel, bias=spec.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.h), requires_grad=False)
        self.A_log = nn.Parameter(torch.empty(self.h), requires_grad=False)
        self.D = nn.Parameter(torch.empty(self.h), requires_grad=False)
        self.norm = GroupGatedRMSNorm(spec.mamba_inner, spec.mamba_inner // self.g, spec.rms_norm_eps)
        self.out_proj = Linear(spec.mamba_inner, spec.hidden_size, bias=spec.mamba_bias)
        self.chunk, self.dt_limit = spec.mamba_chunk, spec.dt_limit

    def forward(self, x: torch.Tensor, rope: Rope, fwd: ForwardContext) -> torch.Tensor:
        batch: RecurrentBatch = fwd.extras[RECURRENT_EXTRAS]
        z, xbc, dt = self.in_proj(x).split(self.splits, dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.dt_limit)  # [t, h]
        y = x.new_empty(x.shape[0], self.h, self.p)
        for group in batch.groups:
            y[group.rows] = self._run_group(batch, group.rows, group.slots, group.q_len, group.decode, xbc, dt)
        return self.out_proj(self.norm(y.reshape(x.shape[0], -1), z))

    def _run_group(self, batch: RecurrentBatch, rows: torch.Tensor, slots: torch.Tensor, q_len: int, decode: bool,
                   xbc: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        window, state = batch.pool.read(self.state_layer, slots)
        n, w, bias = slots.shape[0], self.conv1d.weight[:, 0], self.conv1d.bias
        if decode:
            mixed, window = causal_conv1d_step(xbc[rows], window, w, bias, F.silu)
        else:
            mixed, window = causal_conv1d(xbc[rows].reshape(n, q_len, -1), window, w, bias, F.silu)
        xs, bm, cm = mixed.reshape(n, q_len, -1).split([self.h * self.p, self.g * self.n, self.g * self.n], dim=-1)
        xs = xs.reshape(n, q_len, self.h, self.p)
        args = (xs, dt[rows].reshape(n, q_len, self.h), -self.A_log.float().exp(),
                bm.reshape(n, q_len, self.g, self.n), cm.reshape(n, q_len, self.g, self.n), state)
        out, state = ssd_recurrent(*args) if decode else ssd_chunked(*args, chunk_size=self.chunk)
        batch.pool.write(self.state_layer, slots, window, state)
        out = out + xs.float() * self.D.float()[:, None]  # D skip
        return out.to(xs.dtype).reshape(n * q_len, self.h, self.p)


class ReluSquaredMLP(nn.Module):
    def __init__(self, spec: NemotronHSpec) -> None:
        super().__init__()
        self.up_proj = Linear(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)
        self.down_proj = Linear(spec.intermediate_size, spec.hidden_size, bias=spec.mlp_bias)

    def forward(self, x: torch.Tensor, rope: Rope, fwd: ForwardContext, lora: LoRABatch | None = None) -> torch.Tensor:
        return self.down_proj(torch.relu(self.up_proj(x)).square())


class NemotronHBlock(nn.Module):
    def __init__(self, spec: DecoderSpec, layer_idx: int) -> None:
        super().__init__()
        assert isinstance(spec, NemotronHSpec)
        self.norm = spec.norm(spec.hidden_size)
        kind = spec.layer_types[layer_idx]
        self.mixer: nn.Module
        if kind == LINEAR:
            self.mixer = Mamba2Mixer(spec, layer_idx)
        elif kind == FULL:
            self.mixer = Attention(spec, spec.kv_index(layer_idx))  # its layer index is the KV layer's
        else:
            self.mixer = ReluSquaredMLP(spec)

    def forward(self, x: torch.Tensor, rope: Rope, fwd: ForwardContext) -> torch.Tensor:
        return x + self.mixer(self.norm(x), rope, fwd)


_NAMES = (("backbone.", "model."), ("model.embeddings.", "model.embed_tokens."), ("model.norm_f.", "model.norm."))


@register("nemotron_h")
class NemotronHForCausalLM(HybridCausalLM):
    layer_cls = NemotronHBlock
    # q/k/v fuse; the MLP's up_proj is not half of a gate_up pair here.
    packed_modules_mapping: ClassVar[dict[str, tuple[str, int]]] = {
        k: v for k, v in CausalLM.packed_modules_mapping.items() if k in ("q_proj", "k_proj", "v_proj")}

    @classmethod
    def decoder_spec(cls, c: Any) -> DecoderSpec:
        types = tuple(c.layers_block_type)
        if "moe" in types:
            raise UnsupportedModelError(f"nemotron_h checkpoints with MoE blocks ({types.count('moe')} of "
                                        f"{len(types)} layers) are not supported yet; only Mamba-2, attention and "
                                        f"MLP blocks are")
        return NemotronHSpec.from_hf(
            c, rms_norm_eps=c.layer_norm_epsilon, hidden_act=c.mlp_hidden_act, norm_cast_before_weight=False,
            qkv_bias=bool(c.attention_bias), o_bias=bool(c.attention_bias), mlp_bias=bool(c.mlp_bias),
            layer_types=types, layer_windows=(), linear_conv_kernel=c.conv_kernel, mamba_heads=c.mamba_num_heads,
            mamba_head_dim=c.mamba_head_dim, mamba_groups=c.n_groups, ssm_state_size=c.ssm_state_size,
            mamba_bias=bool(c.use_bias), conv_bias=bool(c.use_conv_bias), mamba_chunk=c.chunk_size,
            dt_limit=(float(c.time_step_limit[0]), float(c.time_step_limit[1])))

    def map_checkpoint_name(self, name: str) -> str | None:
        for src, dst in _NAMES:
            if name.startswith(src):
                name = dst + name[len(src):]
        return name

    def rope_tables(self, device: torch.device) -> dict[str, Any]:
        return {}  # no RoPE

    def ropes(self, fwd: ForwardContext, dtype: torch.dtype) -> dict[str, Rope]:
        """Identity rotary tables (cos 1, sin 0): the shared Attention then leaves q and k unchanged."""
        t, d = fwd.num_tokens, self.spec.head_dim
        ones = torch.ones(t, d, dtype=dtype, device=fwd.positions.device)
        return {DEFAULT_ROPE: (ones, torch.zeros_like(ones))}
