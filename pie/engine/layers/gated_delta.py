"""Gated DeltaNet kernels: the gated delta rule and the causal depthwise conv in front of it.

Every function takes the sequence's carried state explicitly and returns the
state after its tokens, so a prefill can stop after any chunk and resume from
a state slot, and decode continues a prefill exactly.

The recurrence, per value head (S: [key_dim, value_dim], float32):

    S <- exp(g_t) * S                       decay
    d_t = beta_t * (v_t - S^T k_t)          the delta rule's correction
    S <- S + k_t d_t^T                      write
    o_t = S^T q_t                           read

with q and k L2-normalised and q scaled by key_dim ** -0.5 (Qwen 3.5 /
Qwen3-Next). `recurrent_gated_delta_rule` runs it token by token (decode);
`chunk_gated_delta_rule` solves a chunk of C tokens at once: inside a chunk
with cumulative log-decay G_i = g_1 + ... + g_i and start state S_0,

    d_i + sum_{j<i} beta_i exp(G_i - G_j) (k_i . k_j) d_j = beta_i (v_i - exp(G_i) S_0^T k_i)

is a unit-lower-triangular system for the d's; then
o_i = exp(G_i) S_0^T q_i + sum_{j<=i} exp(G_i - G_j) (q_i . k_j) d_j and
S_C = exp(G_C) S_0 + sum_j exp(G_C - G_j) k_j d_j^T.

On CUDA, `flash-linear-attention` (`fla`) runs both forms when it is
installed (`use_fla`); the torch code is the reference and the fallback.

Layouts (batch first, like fla): q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv];
g, beta [B, T, Hv]; state [B, Hv, Dk, Dv] float32. Hv may be a multiple of
Hk (each key head serves Hv / Hk consecutive value heads).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 64
L2_EPS = 1e-6


def fla_available() -> bool:
    return importlib.util.find_spec("fla") is not None


def use_fla(device: torch.device) -> bool:
    """fla's Triton kernels run on CUDA only; everywhere else the torch reference does."""
    return device.type == "cuda" and fla_available()


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + L2_EPS)


def _heads_first(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                 beta: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """float32, [B, H, T, ...], keys/queries repeated to the value heads, normalised and scaled."""
    groups = v.shape[2] // k.shape[2]
    if groups > 1:
        q, k = q.repeat_interleave(groups, dim=2), k.repeat_interleave(groups, dim=2)
    q, k, v, g, beta = (x.transpose(1, 2).float() for x in (q, k, v, g, beta))
    q = _l2norm(q) * q.shape[-1] ** -0.5
    return q, _l2norm(k), v, g, beta


def _zero_state(v: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.zeros(v.shape[0], v.shape[2], k.shape[-1], v.shape[-1], dtype=torch.float32, device=v.device)


def recurrent_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                               beta: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token (decode: T = 1 for a batch of sequences) -> (out [B, T, Hv, Dv] in v's dtype, state)."""
    q32, k32, v32, g32, b32 = _heads_first(q, k, v, g, beta)
    s = _zero_state(v, q) if state is None else state.float().clone()
    bh, dk, dv = s.shape[0] * s.shape[1], s.shape[2], s.shape[3]
    flat = s.view(bh, dk, dv)
    outs = []
    for t in range(v.shape[1]):
        # In place on the state: at decode batch sizes it is the largest tensor by far (64 x 16 x 128 x 128).
        s.mul_(g32[:, :, t].exp()[..., None, None])
        kt = k32[:, :, t].reshape(bh, 1, dk)
        read = torch.bmm(kt, flat).view(v32.shape[0], v32.shape[1], dv)  # S^T k
        correction = (v32[:, :, t] - read) * b32[:, :, t, None]
        flat.baddbmm_(kt.transpose(1, 2), correction.reshape(bh, 1, dv))  # S += k d^T
        outs.append(torch.bmm(q32[:, :, t].reshape(bh, 1, dk), flat).view(v32.shape[0], v32.shape[1], dv))
    out = torch.stack(outs, dim=1)  # [B, T, H, Dv]
    return out.to(v.dtype), s


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                           beta: torch.Tensor, state: torch.Tensor | None,
                           chunk_size: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunks of `chunk_size` tokens solved at once (prefill) -> (out [B, T, Hv, Dv] in v's dtype, state)."""
    q32, k32, v32, g32, b32 = _heads_first(q, k, v, g, beta)
    s = _zero_state(v, q) if state is None else state.float()
    outs = []
    for start in range(0, v.shape[1], chunk_size):
        rows = slice(start, start + chunk_size)
        o, s = _chunk(q32[:, :, rows], k32[:, :, rows], v32[:, :, rows], g32[:, :, rows], b32[:, :, rows], s)
        outs.append(o)
    out = torch.cat(outs, dim=2).transpose(1, 2)  # [B, T, H, Dv]
    return out.to(v.dtype), s


def _chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
           s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk, [B, H, C, ...] float32 (module docstring's equations) -> (out [B, H, C, Dv], end state)."""
    c = g.shape[-1]
    cum = g.cumsum(-1)  # G_i, [B, H, C]
    causal = torch.ones(c, c, dtype=torch.bool, device=g.device).tril()  # j <= i
    # exp(G_i - G_j) for j <= i (<= 1); the upper triangle is masked before exp so it cannot overflow.
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    start_decay = cum.exp()[..., None]  # exp(G_i), [B, H, C, 1]
    lower = (beta[..., :, None] * (k @ k.transpose(-1, -2)) * decay).tril(-1)
    rhs = beta[..., None] * (v - start_decay * (k @ s))
    # The diagonal of `lower` is zero and unitriangular=True reads it as ones: (I + lower) d = rhs.
    d = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True)
    out = start_decay * (q @ s) + ((q @ k.transpose(-1, -2)) * decay) @ d
    end = cum[..., -1:]  # G_C, [B, H, 1]
    s = s * end.exp()[..., None] + (k * (end - cum).exp()[..., None]).transpose(-1, -2) @ d
    return out, s


GatedDeltaFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                         torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     state: torch.Tensor | None, *, decode: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's entry point: fla's kernel on CUDA where installed, else the torch reference.

    decode=True: the recurrent form (few tokens per sequence); False: the chunked form (prefill).
    """
    if use_fla(v.device):
        return _fla_gated_delta_rule(q, k, v, g, beta, state, decode=decode)
    fn: GatedDeltaFn = recurrent_gated_delta_rule if decode else chunk_gated_delta_rule
    return fn(q, k, v, g, beta, state)


def _fla_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                          state: torch.Tensor | None, *, decode: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_recurrent

    groups = v.shape[2] // k.shape[2]
    if groups > 1:  # fla versions differ in grouped-value support; repeating is always right
        q, k = q.repeat_interleave(groups, dim=2), k.repeat_interleave(groups, dim=2)
    fn = fla_recurrent if decode else fla_chunk
    init = None if state is None else state.float().contiguous()
    out, final = fn(q.contiguous(), k.contiguous(), v.contiguous(), g=g.float().contiguous(),
                    beta=beta.contiguous(), initial_state=init, output_final_state=True,
                    use_qk_l2norm_in_kernel=True)
    return out.to(v.dtype), final.float()


def causal_conv1d(x: torch.Tensor, window: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                  activation: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv over new inputs after a carried window (prefill, or a few decode tokens).

    x: [B, T, C]; window: [B, C, K - 1], the previous K - 1 inputs (None = a fresh sequence: zeros);
    weight: [C, K]. Returns (out [B, T, C], the last K - 1 inputs [B, C, K - 1]).
    """
    kernel = weight.shape[-1]
    xt = x.transpose(1, 2).to(weight.dtype)  # [B, C, T]
    if window is None:
        window = xt.new_zeros(xt.shape[0], xt.shape[1], kernel - 1)
    full = torch.cat([window.to(weight.dtype), xt], dim=-1)  # [B, C, K - 1 + T]
    out = F.conv1d(full, weight[:, None, :], bias, groups=weight.shape[0])  # [B, C, T]
    if activation is not None:
        out = activation(out)
    return out.transpose(1, 2).to(x.dtype), full[..., -(kernel - 1):]


def causal_conv1d_step(x: torch.Tensor, window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       activation: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode token per sequence: x [B, C], window [B, C, K - 1] -> (out [B, C], new window)."""
    full = torch.cat([window.to(weight.dtype), x.to(weight.dtype)[..., None]], dim=-1)  # [B, C, K]
    out = (full * weight).sum(-1)
    if bias is not None:
        out = out + bias
    if activation is not None:
        out = activation(out)
    return out.to(x.dtype), full[..., 1:]
