"""Mamba-2 selective state space (SSD) kernels, state in / state out like `gated_delta`.

Per head (state h: [head_dim, state_size], float32), with dt > 0 (softplus'd,
biased, clamped by the caller) and A < 0:

    h <- exp(dt_t A) h + dt_t x_t B_t^T        y_t = h C_t   (+ D x_t, added by the caller)

`ssd_recurrent` runs it token by token (decode); `ssd_chunked` solves a chunk
at once: with cumulative log-decay L_i = A (dt_1 + ... + dt_i) and start
state h_0, y_i = exp(L_i) h_0 C_i + sum_{j<=i} exp(L_i - L_j) (C_i . B_j) dt_j x_j
and h_C = exp(L_C) h_0 + sum_j exp(L_C - L_j) dt_j x_j B_j^T.

Layouts: x [B, T, H, P]; dt [B, T, H]; A [H]; B, C [B, T, G, N] (G groups,
each shared by H / G consecutive heads); state [B, H, P, N] float32.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK = 128


def _expand(x: torch.Tensor, dt: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """float32, heads first ([B, H, T, ...]), B and C repeated to the heads."""
    groups = x.shape[2] // b.shape[2]
    b, c = b.repeat_interleave(groups, dim=2), c.repeat_interleave(groups, dim=2)
    return tuple(t.transpose(1, 2).float() for t in (x, dt, b, c))


def _zero_state(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.zeros(x.shape[0], x.shape[2], x.shape[3], b.shape[-1], dtype=torch.float32, device=x.device)


def ssd_recurrent(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                  state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token -> (y [B, T, H, P] float32, state)."""
    x32, dt32, b32, c32 = _expand(x, dt, b, c)
    h = _zero_state(x, b) if state is None else state.float().clone()
    ys = []
    for t in range(x.shape[1]):
        step = dt32[:, :, t]  # [B, H]
        h = h * (step * a.float()).exp()[..., None, None] + (step[..., None] * x32[:, :, t])[..., None] * \
            b32[:, :, t, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, c32[:, :, t]))
    return torch.stack(ys, dim=1), h


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                state: torch.Tensor | None, chunk_size: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunks solved at once (prefill) -> (y [B, T, H, P] float32, state)."""
    x32, dt32, b32, c32 = _expand(x, dt, b, c)
    h = _zero_state(x, b) if state is None else state.float()
    ys = []
    for start in range(0, x.shape[1], chunk_size):
        rows = slice(start, start + chunk_size)
        y, h = _chunk(x32[:, :, rows], dt32[:, :, rows], a.float(), b32[:, :, rows], c32[:, :, rows], h)
        ys.append(y)
    return torch.cat(ys, dim=2).transpose(1, 2), h


def _chunk(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
           h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk, [B, H, L, ...] float32 (module docstring's equations)."""
    n = dt.shape[-1]
    cum = (dt * a[None, :, None]).cumsum(-1)  # L_i, [B, H, L]
    causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    xdt = x * dt[..., None]  # dt_j x_j, [B, H, L, P]
    y = ((c @ b.transpose(-1, -2)) * decay) @ xdt + cum.exp()[..., None] * (c @ h.transpose(-1, -2))
    end = cum[..., -1:]
    h = h * end.exp()[..., None] + (xdt * (end - cum).exp()[..., None]).transpose(-1, -2) @ b
    return y, h
