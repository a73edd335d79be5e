"""The gated delta rule and causal conv kernels against transformers' own torch implementations (float32).

transformers' functions are the reference (`modeling_qwen3_next`); ours carry the state explicitly, so the
tests also check that a prefill split in pieces, or a prefill followed by decode steps, equals one prefill.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3_next import modeling_qwen3_next as ref

from pie.engine.layers.gated_delta import (
    causal_conv1d,
    causal_conv1d_step,
    chunk_gated_delta_rule,
    fla_available,
    gated_delta_rule,
    recurrent_gated_delta_rule,
)

ATOL = 1e-5


def _inputs(b: int, t: int, hk: int = 2, hv: int = 4, dk: int = 8, dv: int = 6,
            seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, t, hk, dk, generator=gen) for _ in range(2))
    v = torch.randn(b, t, hv, dv, generator=gen)
    g = -F.softplus(torch.randn(b, t, hv, generator=gen))  # log decay <= 0
    beta = torch.rand(b, t, hv, generator=gen)
    state = torch.randn(b, hv, dk, dv, generator=gen) * 0.1
    return tuple(x.to(device) for x in (q, k, v, g, beta, state))


def _ref_chunk(q, k, v, g, beta, state):  # type: ignore[no-untyped-def]
    return ref.torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=state, output_final_state=True,
                                            use_qk_l2norm_in_kernel=True)


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a.float() - b.float()).abs().max().item()
    assert err < atol, f"max abs error {err:.3g} >= {atol}"


@pytest.mark.parametrize("t", [1, 5, 64, 150])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_transformers(t: int, with_state: bool) -> None:
    q, k, v, g, beta, state = _inputs(2, t)
    init = state if with_state else None
    out, final = chunk_gated_delta_rule(q, k, v, g, beta, init, chunk_size=64)
    ref_out, ref_final = _ref_chunk(q, k, v, g, beta, init)
    _close(out, ref_out)
    _close(final, ref_final)


@pytest.mark.parametrize("t", [1, 7])
def test_recurrent_matches_transformers(t: int) -> None:
    q, k, v, g, beta, state = _inputs(3, t, seed=1)
    out, final = recurrent_gated_delta_rule(q, k, v, g, beta, state)
    ref_out, ref_final = ref.torch_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=state,
                                                              output_final_state=True, use_qk_l2norm_in_kernel=True)
    _close(out, ref_out)
    _close(final, ref_final)
    assert not torch.equal(state, final)  # the input state is not modified in place


def test_chunked_equals_recurrent() -> None:
    q, k, v, g, beta, state = _inputs(1, 40, seed=2)
    a, sa = chunk_gated_delta_rule(q, k, v, g, beta, state, chunk_size=16)
    b, sb = recurrent_gated_delta_rule(q, k, v, g, beta, state)
    _close(a, b)
    _close(sa, sb)


def test_prefill_in_two_pieces_equals_one() -> None:
    q, k, v, g, beta, _ = _inputs(1, 100, seed=3)
    whole, s_whole = chunk_gated_delta_rule(q, k, v, g, beta, None)
    cut = 37  # not a chunk boundary
    first, s_mid = chunk_gated_delta_rule(*(x[:, :cut] for x in (q, k, v, g, beta)), None)
    second, s_end = chunk_gated_delta_rule(*(x[:, cut:] for x in (q, k, v, g, beta)), s_mid)
    _close(torch.cat([first, second], dim=1), whole)
    _close(s_end, s_whole)


def test_prefill_then_decode_equals_one_prefill() -> None:
    q, k, v, g, beta, _ = _inputs(2, 30, seed=4)
    whole, s_whole = chunk_gated_delta_rule(q, k, v, g, beta, None)
    prompt = 20
    outs, s = [], None
    out, s = chunk_gated_delta_rule(*(x[:, :prompt] for x in (q, k, v, g, beta)), s)
    outs.append(out)
    for t in range(prompt, 30):
        out, s = recurrent_gated_delta_rule(*(x[:, t:t + 1] for x in (q, k, v, g, beta)), s)
        outs.append(out)
    _close(torch.cat(outs, dim=1), whole)
    _close(s, s_whole)


def _conv_inputs(b: int, t: int, c: int = 12, kernel: int = 4, seed: int = 5) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, c, generator=gen), torch.randn(c, kernel, generator=gen)


@pytest.mark.parametrize("t", [1, 3, 20])
def test_conv_prefill_matches_transformers(t: int) -> None:
    x, w = _conv_inputs(2, t)
    out, window = causal_conv1d(x, None, w, None, F.silu)
    expected = ref.causal_conv1d_fn(x.transpose(1, 2), w, None, activation="silu").transpose(1, 2)
    _close(out, expected)
    padded = torch.cat([torch.zeros(2, 3, 12), x], dim=1)
    _close(window, padded[:, -3:].transpose(1, 2))


def test_conv_decode_matches_transformers_update() -> None:
    x, w = _conv_inputs(3, 6)
    _, window = causal_conv1d(x[:, :5], None, w, None, F.silu)
    ref_state = window.clone()  # transformers updates its state in place
    expected = ref.causal_conv1d_update(x[:, 5:6].transpose(1, 2), ref_state, w, None, "silu")
    out, new_window = causal_conv1d_step(x[:, 5], window, w, None, F.silu)
    _close(out, expected[:, :, 0])
    _close(new_window, ref_state)


def test_conv_pieces_and_steps_equal_one_prefill() -> None:
    x, w = _conv_inputs(2, 16)
    bias = torch.randn(12)
    whole, w_whole = causal_conv1d(x, None, w, bias, F.silu)
    a, window = causal_conv1d(x[:, :2], None, w, bias, F.silu)  # shorter than the window
    b, window = causal_conv1d(x[:, 2:9], window, w, bias, F.silu)
    steps = []
    for t in range(9, 16):
        out, window = causal_conv1d_step(x[:, t], window, w, bias, F.silu)
        steps.append(out[:, None])
    _close(torch.cat([a, b, *steps], dim=1), whole)
    _close(window, w_whole)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not fla_available(), reason="needs CUDA and fla")
@pytest.mark.parametrize("decode", [False, True])
def test_fla_matches_the_torch_reference(decode: bool) -> None:
    t = 1 if decode else 100
    q, k, v, g, beta, state = _inputs(2, t, hk=2, hv=4, dk=64, dv=64, seed=6, device="cuda")
    out, final = gated_delta_rule(q, k, v, g, beta, state, decode=decode)
    fn = recurrent_gated_delta_rule if decode else chunk_gated_delta_rule
    ref_out, ref_final = fn(q, k, v, g, beta, state)
    _close(out, ref_out, atol=2e-3)
    _close(final, ref_final, atol=2e-3)
