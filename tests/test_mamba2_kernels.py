"""Mamba-2 SSD kernels against transformers' torch implementations (nemotron_h, float32), with carried state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.nemotron_h import modeling_nemotron_h as ref

from pie.engine.layers.mamba2 import ssd_chunked, ssd_recurrent

ATOL = 1e-5


def _inputs(b: int, t: int, h: int = 4, p: int = 6, g: int = 2, n: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, h, p, generator=gen)
    dt = F.softplus(torch.randn(b, t, h, generator=gen))
    a = -torch.rand(h, generator=gen) * 2 - 0.1
    bm, cm = (torch.randn(b, t, g, n, generator=gen) for _ in range(2))
    state = torch.randn(b, h, p, n, generator=gen) * 0.1
    return x, dt, a, bm, cm, state


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Relative to the scale once it passes 1 (unnormalised SSM outputs reach ~50 over 130 steps)."""
    err = (a.float() - b.float()).abs().max().item() / max(1.0, b.float().abs().max().item())
    assert err < ATOL, f"max scaled error {err:.3g} >= {ATOL}"


@pytest.mark.parametrize("t", [1, 9, 130])
def test_chunked_matches_transformers(t: int) -> None:
    x, dt, a, bm, cm, state = _inputs(2, t)
    y, final = ssd_chunked(x, dt, a, bm, cm, state, chunk_size=64)
    ref_y, ref_final = ref.mamba2_chunk_scan(x, dt, a, bm, cm, chunk_size=64, initial_states=state,
                                             return_final_states=True)
    _close(y, ref_y)
    _close(final, ref_final)


def test_recurrent_step_matches_transformers() -> None:
    x, dt, a, bm, cm, state = _inputs(3, 1, seed=1)
    y, final = ssd_recurrent(x, dt, a, bm, cm, state)
    ref_state = state.clone()  # updated in place by transformers
    p, n = x.shape[-1], bm.shape[-1]
    ref_y = ref.mamba2_selective_state_update(ref_state, x[:, 0], dt[:, 0, :, None].expand(-1, -1, p),
                                              a[:, None, None].expand(-1, p, n), bm[:, 0], cm[:, 0])
    _close(y[:, 0], ref_y)
    _close(final, ref_state)


def test_prefill_pieces_and_decode_equal_one_prefill() -> None:
    x, dt, a, bm, cm, _ = _inputs(2, 50, seed=2)
    whole, h_whole = ssd_chunked(x, dt, a, bm, cm, None, chunk_size=16)
    first, h = ssd_chunked(*(v[:, :21] for v in (x, dt)), a, *(v[:, :21] for v in (bm, cm)), None, chunk_size=16)
    outs = [first]
    second, h = ssd_chunked(*(v[:, 21:40] for v in (x, dt)), a, *(v[:, 21:40] for v in (bm, cm)), h, chunk_size=16)
    outs.append(second)
    for t in range(40, 50):
        y, h = ssd_recurrent(*(v[:, t:t + 1] for v in (x, dt)), a, *(v[:, t:t + 1] for v in (bm, cm)), h)
        outs.append(y)
    _close(torch.cat(outs, dim=1), whole)
    _close(h, h_whole)
