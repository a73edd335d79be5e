"""Batched samplers, penalties and probes, on the device, without a host sync.

Sampling is inverse-CDF with one uniform number per (row, draw). The uniform is
a hash of (seed, position, draw), not a draw from a shared generator, so a
request's tokens depend only on its own seed and positions, never on what else
is in the batch or in what order. Top-k, top-p and min-p are applied as masks
with per-row parameters, so one code path serves every mix of samplers; the
host passes only shapes and "is any row using this filter" flags, which it
knows from the batch, so nothing here reads a device value back.

FlashInfer's sampling kernels are not used on CUDA: they draw from one Philox
stream per call (a seed and offset per batch), so a row's token would depend
on its row index and companions, which this design rules out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF
# Positive temperatures below this are raised to it: logits / 1e-30 overflows float32 to inf and the
# softmax to NaN, while at 1e-6 the distribution is already one-hot to float precision.
MIN_TEMPERATURE = 1e-6


@dataclass
class SamplerInputs:
    """Per-row sampler parameters on the device (S sampler rows, D draws in all) and host flags."""

    temperature: torch.Tensor  # [S] float32; <= 0 = argmax
    top_k: torch.Tensor  # [S] int64; 0 = off
    top_p: torch.Tensor  # [S] float32; 1 = off
    min_p: torch.Tensor  # [S] float32; 0 = off
    seeds: torch.Tensor  # [S] int64
    positions: torch.Tensor  # [S] int64
    draw_row: torch.Tensor  # [D] int64: the sampler row of each draw
    draw_index: torch.Tensor  # [D] int64: the draw's number within its row
    max_top_k: int  # the largest top_k of any row (0 = no row uses top-k)
    any_top_p: bool
    any_min_p: bool
    any_greedy: bool
    any_random: bool


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) held in int64, without overflowing int64."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (lowbias32): good avalanche, cheap, identical on every device."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash_uniform(seeds: torch.Tensor, positions: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Uniform floats in [0, 1) as a pure function of (seed, position, draw); int64 inputs of equal shape."""
    h = _mix32((draws & _MASK32) ^ 0x9E3779B9)
    h = _mix32(h ^ (positions & _MASK32))
    h = _mix32(h ^ (seeds & _MASK32))
    h = _mix32(h ^ ((seeds >> 32) & _MASK32))
    return (h >> 8).float() / float(1 << 24)


def unpack_bits(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """[M, W] int32 words of little-endian bits (token 32 w + b is bit b of word w) -> bool [M, vocab]."""
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = (words[:, :, None] >> shifts) & 1
    return bits.reshape(words.shape[0], -1)[:, :vocab].bool()


def add_logit_bias(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor,
                   bias: torch.Tensor) -> torch.Tensor:
    """logits[rows[i], tokens[i]] += bias[i] (repeated pairs add up)."""
    return logits.index_put((rows, tokens), bias, accumulate=True)


def apply_penalties(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, presence: torch.Tensor,
                    frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """Penalties over the history pairs (rows[i] saw tokens[i]); presence/frequency/repetition are [S].

    Repetition (HF/vLLM): a seen token's logit is divided by r when positive, multiplied when not. Then
    presence (OpenAI): -p once if seen; frequency: -f per occurrence."""
    counts = torch.zeros_like(logits).index_put((rows, tokens), torch.ones_like(rows, dtype=logits.dtype),
                                                accumulate=True)
    seen = counts > 0
    r = repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    return logits - presence[:, None] * seen - frequency[:, None] * counts


def sample_tokens(logits: torch.Tensor, inp: SamplerInputs, allowed: torch.Tensor | None) -> torch.Tensor:
    """logits: [S, vocab] float32 (penalised); allowed: [S, vocab] bool or None. Returns [D] int64 tokens."""
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    tokens: torch.Tensor | None = None
    if inp.any_greedy:
        tokens = logits.argmax(dim=-1)[inp.draw_row]
    if not inp.any_random:
        assert tokens is not None
        return tokens
    random = inp.temperature > 0
    temp = torch.where(random, inp.temperature.clamp(min=MIN_TEMPERATURE), torch.ones_like(inp.temperature))
    probs = _filtered_probs(logits / temp[:, None], inp)
    drawn = _draw(probs, inp)
    return drawn if tokens is None else torch.where(random[inp.draw_row], drawn, tokens)


def _filtered_probs(scaled: torch.Tensor, inp: SamplerInputs) -> torch.Tensor:
    """softmax(scaled) with top-k, top-p and min-p applied per row (zeros outside the kept set)."""
    vocab = scaled.shape[-1]
    if inp.max_top_k > 0:
        k = inp.top_k.clamp(max=vocab)
        kth = scaled.topk(min(inp.max_top_k, vocab), dim=-1).values.gather(1, (k - 1).clamp(min=0)[:, None])
        scaled = scaled.masked_fill((k[:, None] > 0) & (scaled < kth), float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if inp.any_top_p:
        p = inp.top_p[:, None]
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly before each token
        # The first token is never dropped (before == 0); rows with p == 1 drop nothing, even
        # where float rounding pushes the running sum a hair over 1.
        drop_sorted = (before > p) & (p < 1.0)
        probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), 0.0)
    if inp.any_min_p:
        m = inp.min_p[:, None]
        probs = probs.masked_fill(probs < m * probs.max(dim=-1, keepdim=True).values, 0.0)
    return probs


def _draw(probs: torch.Tensor, inp: SamplerInputs) -> torch.Tensor:
    """Inverse-CDF draws: [D] tokens, draw d from row draw_row[d]."""
    u = hash_uniform(inp.seeds[inp.draw_row], inp.positions[inp.draw_row], inp.draw_index)
    cdf = probs.cumsum(dim=-1)[inp.draw_row]  # [D, vocab]
    target = (u * cdf[:, -1]).unsqueeze(1)
    # right=True picks the first token whose cdf exceeds the target: its probability is > 0.
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)


def distributions(logits: torch.Tensor, temperature: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (ids, probs) of softmax(logits / temperature) per row ([n, k] each); temperature <= 0 is the
    argmax one-hot, so its first entry is (argmax, 1.0)."""
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature.clamp(min=MIN_TEMPERATURE))[:, None]
    probs = torch.softmax(scaled, dim=-1)
    one_hot = torch.zeros_like(probs).scatter(1, logits.argmax(dim=-1, keepdim=True), 1.0)
    probs = torch.where(greedy[:, None], one_hot, probs)
    vals, ids = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return ids, vals


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of log-probabilities; tokens with p == 0 contribute 0."""
    p = logprobs.exp()
    return -(p * logprobs.masked_fill(p == 0, 0.0)).sum(dim=-1)


@dataclass
class SamplerRows:
    """Host lists of per-row parameters (one entry per logits row), for `sample`."""

    temperature: list[float]
    top_k: list[int]  # 0 = off
    top_p: list[float]  # 1.0 = off
    min_p: list[float]  # 0.0 = off
    seeds: list[int]
    positions: list[int]
    draws: list[int]


def sample(logits: torch.Tensor, rows: SamplerRows, allowed: torch.Tensor | None) -> list[list[int]]:
    """`sample_tokens` from host lists, for direct use (tests, tools); the engine step uses `sample_tokens`."""
    dev = logits.device
    draw_row = [i for i, d in enumerate(rows.draws) for _ in range(d)]
    inp = SamplerInputs(
        temperature=torch.tensor(rows.temperature, dtype=torch.float32, device=dev),
        top_k=torch.tensor(rows.top_k, dtype=torch.int64, device=dev),
        top_p=torch.tensor(rows.top_p, dtype=torch.float32, device=dev),
        min_p=torch.tensor(rows.min_p, dtype=torch.float32, device=dev),
        seeds=torch.tensor(rows.seeds, dtype=torch.int64, device=dev),
        positions=torch.tensor(rows.positions, dtype=torch.int64, device=dev),
        draw_row=torch.tensor(draw_row, dtype=torch.int64, device=dev),
        draw_index=torch.tensor([j for d in rows.draws for j in range(d)], dtype=torch.int64, device=dev),
        max_top_k=max(rows.top_k, default=0), any_top_p=any(p < 1.0 for p in rows.top_p),
        any_min_p=any(m > 0.0 for m in rows.min_p), any_greedy=any(t <= 0.0 for t in rows.temperature),
        any_random=any(t > 0.0 for t in rows.temperature))
    flat = sample_tokens(logits, inp, allowed).tolist()
    out, start = [], 0
    for d in rows.draws:
        out.append(flat[start:start + d])
        start += d
    return out
