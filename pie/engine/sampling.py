"""Batched samplers and probes, on the device.

Sampling is inverse-CDF with one uniform number per (row, draw). The uniform is
a hash of (seed, position, draw), not a draw from a shared generator, so a
request's tokens depend only on its own seed and positions, never on what else
is in the batch or in what order. Top-k, top-p and min-p are applied as masks
with per-row parameters, so one code path serves every mix of samplers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


@dataclass
class SamplerRows:
    """Per-row sampler parameters for `sample` (host lists; one entry per logits row)."""

    temperature: list[float]
    top_k: list[int]  # 0 = off
    top_p: list[float]  # 1.0 = off
    min_p: list[float]  # 0.0 = off
    seeds: list[int]
    positions: list[int]
    draws: list[int]


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


def sample(logits: torch.Tensor, rows: SamplerRows, allowed: torch.Tensor | None) -> list[list[int]]:
    """logits: [n, vocab] float32; allowed: [n, vocab] bool or None. Returns the drawn tokens of each row."""
    dev = logits.device
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    temp = torch.tensor(rows.temperature, dtype=torch.float32, device=dev)
    greedy_rows = [i for i, t in enumerate(rows.temperature) if t <= 0.0]
    random_rows = [i for i, t in enumerate(rows.temperature) if t > 0.0]
    out: list[list[int]] = [[] for _ in rows.temperature]
    if greedy_rows:
        idx = torch.tensor(greedy_rows, device=dev)
        tokens = logits[idx].argmax(dim=-1).tolist()
        for i, tok in zip(greedy_rows, tokens, strict=True):
            out[i] = [tok] * rows.draws[i]
    if random_rows:
        idx = torch.tensor(random_rows, device=dev)
        probs = _filtered_probs(logits[idx] / temp[idx, None], _select(rows, random_rows), dev)
        for i, toks in zip(random_rows, _draw(probs, _select(rows, random_rows), dev), strict=True):
            out[i] = toks
    return out


def _select(rows: SamplerRows, which: list[int]) -> SamplerRows:
    return SamplerRows(*([getattr(rows, f)[i] for i in which] for f in SamplerRows.__dataclass_fields__))


def _filtered_probs(scaled: torch.Tensor, rows: SamplerRows, dev: torch.device) -> torch.Tensor:
    """softmax(scaled) with top-k, top-p and min-p applied per row (zeros outside the kept set)."""
    vocab = scaled.shape[-1]
    if any(k > 0 for k in rows.top_k):
        k = torch.tensor(rows.top_k, device=dev).clamp(max=vocab)
        kth = scaled.topk(int(k.max()), dim=-1).values.gather(1, (k - 1).clamp(min=0)[:, None])
        scaled = scaled.masked_fill((k[:, None] > 0) & (scaled < kth), float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if any(p < 1.0 for p in rows.top_p):
        p = torch.tensor(rows.top_p, device=dev)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly before each token
        # The first token is never dropped (before == 0); rows with p == 1 drop nothing, even
        # where float rounding pushes the running sum a hair over 1.
        drop_sorted = (before > p[:, None]) & (p[:, None] < 1.0)
        probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), 0.0)
    if any(m > 0.0 for m in rows.min_p):
        m = torch.tensor(rows.min_p, device=dev)
        probs = probs.masked_fill(probs < m[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
    return probs


def _draw(probs: torch.Tensor, rows: SamplerRows, dev: torch.device) -> list[list[int]]:
    """Inverse-CDF draws: row i gets rows.draws[i] tokens."""
    repeat = torch.tensor(rows.draws, device=dev)
    row_of = torch.repeat_interleave(torch.arange(len(rows.draws), device=dev), repeat)
    draw_idx = torch.cat([torch.arange(d, device=dev) for d in rows.draws])
    seeds = torch.tensor(rows.seeds, dtype=torch.int64, device=dev)[row_of]
    positions = torch.tensor(rows.positions, dtype=torch.int64, device=dev)[row_of]
    u = hash_uniform(seeds, positions, draw_idx.to(torch.int64))
    cdf = probs.cumsum(dim=-1)[row_of]  # [num_draws, vocab]
    target = (u * cdf[:, -1]).unsqueeze(1)
    # right=True picks the first token whose cdf exceeds the target: its probability is > 0.
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)
    flat = tokens.tolist()
    out, start = [], 0
    for d in rows.draws:
        out.append(flat[start: start + d])
        start += d
    return out


def distribution(logits: torch.Tensor, temperature: float, k: int) -> tuple[list[int], list[float]]:
    """Top-k of softmax(logits / temperature) for one row; temperature 0 is the argmax one-hot."""
    if temperature <= 0.0:
        return [int(logits.argmax())], [1.0]
    probs = torch.softmax(logits / temperature, dim=-1)
    vals, ids = probs.topk(min(k, probs.shape[-1]))
    return ids.tolist(), vals.tolist()


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of log-probabilities; tokens with p == 0 contribute 0."""
    p = logprobs.exp()
    return -(p * logprobs.masked_fill(p == 0, 0.0)).sum(dim=-1)
